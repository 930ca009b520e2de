"""One layer's conversion: recognise eStargz blobs, run the eStargz writer in a worker process."""

from __future__ import annotations

from dataclasses import dataclass

from lazyd.registry import Descriptor, Reference, RegistryClient, RegistryError
from lazyd.registry.types import ANNOTATION_TOC_DIGEST, ANNOTATION_UNCOMPRESSED_SIZE


@dataclass(frozen=True)
class LayerBuild:
    """What the eStargz writer produced for one layer."""

    toc_digest: str
    diff_id: str
    blob_digest: str
    blob_size: int
    uncompressed_size: int
    missing_prioritized: tuple[str, ...] = ()


async def is_estargz(client: RegistryClient, ref: Reference, desc: Descriptor) -> bool:
    """True when ``desc`` carries a TOC digest annotation and the blob ends in a valid eStargz footer."""
    from lazyd import estargz

    if not desc.annotations.get(ANNOTATION_TOC_DIGEST) or desc.size < estargz.LEGACY_FOOTER_SIZE:
        return False
    tail_len = min(desc.size, estargz.FOOTER_SIZE)
    try:
        (tail,) = await client.fetch_ranges(ref, desc.digest, [(desc.size - tail_len, tail_len)])
        estargz.parse_footer(tail, desc.size)
    except (estargz.EStargzError, RegistryError):
        return False
    return True


def build_layer(src: str, dst: str, chunk_size: int | None, prioritized: list[str] | None,
                threads: int | None) -> LayerBuild:
    """Convert the layer tarball ``src`` (gzip or plain tar) to an eStargz blob at ``dst``.

    Runs in a worker process (module-level so it can be pickled).  Prioritized paths that
    are not in this layer are allowed (they may be in another layer) and reported.
    """
    from lazyd import estargz

    options = estargz.BuildOptions(prioritized=list(prioritized or []), allow_missing=True, workers=threads)
    if chunk_size is not None:
        options.chunk_size = chunk_size
    result = estargz.build(src, dst, options)
    return LayerBuild(result.toc_digest, result.diff_id, result.blob_digest, result.blob_size,
                      result.uncompressed_size, tuple(result.missing_prioritized))


def converted_descriptor(source: Descriptor, built: LayerBuild, media_type: str) -> Descriptor:
    """The descriptor of a converted layer: gzip media type and the two eStargz annotations."""
    annotations = {k: v for k, v in source.annotations.items()
                   if k not in (ANNOTATION_TOC_DIGEST, ANNOTATION_UNCOMPRESSED_SIZE)}
    annotations[ANNOTATION_TOC_DIGEST] = built.toc_digest
    annotations[ANNOTATION_UNCOMPRESSED_SIZE] = str(built.uncompressed_size)
    return Descriptor(media_type=media_type, digest=built.blob_digest, size=built.blob_size, annotations=annotations)
