"""Build eStargz images from layer tars (with ``lazyd.estargz.build``) and push them to a test registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lazyd.estargz import BuildOptions, build
from lazyd.registry import Reference, RegistryClient, RegistryConfig

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_ANNOTATION = "io.containers.estargz.uncompressed-size"


@dataclass(frozen=True)
class EStargzLayer:
    """One converted layer: the source tar and the eStargz blob made from it."""

    tar: Path
    blob: Path
    digest: str
    size: int
    toc_digest: str
    diff_id: str
    uncompressed_size: int


@dataclass(frozen=True)
class EStargzImage:
    ref: str
    manifest_digest: str
    layers: list[EStargzLayer]


def build_layers(tars: list[Path], out: Path, options: BuildOptions | None = None) -> list[EStargzLayer]:
    """Convert each tar to an eStargz blob in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    layers = []
    for i, tar in enumerate(tars):
        blob = out / f"layer{i}.estargz"
        r = build(tar, blob, options)
        layers.append(EStargzLayer(tar, blob, r.blob_digest, r.blob_size, r.toc_digest, r.diff_id,
                                   r.uncompressed_size))
    return layers


async def _push(ref: Reference, layers: list[EStargzLayer]) -> str:
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "config": {},
    }).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest, "size": layer.size,
                    "annotations": {TOC_ANNOTATION: layer.toc_digest,
                                    UNCOMPRESSED_ANNOTATION: str(layer.uncompressed_size)}}
                   for layer in layers],
    }).encode()
    async with RegistryClient(RegistryConfig()) as client:
        for layer in layers:
            await client.push_blob(ref, layer.digest, layer.blob)
        await client.push_blob(ref, config_digest, config)
        return await client.put_manifest(ref, manifest, MANIFEST_MEDIA_TYPE)


def busybox_layers(tars: list[Path], out: Path) -> list[EStargzLayer]:
    """The two layer tars of ``build_busybox(..., with_deletions=True)`` as eStargz under ``out``: layer 0
    with /bin/busybox prioritized, layer 1 (with its 9 MiB random file) in 256 KiB chunks."""
    layers = build_layers(tars[:1], out / "0", BuildOptions(prioritized=["bin/busybox"], allow_missing=True))
    layers += build_layers(tars[1:], out / "1", BuildOptions(chunk_size=256 * 1024))
    return layers


def push_layers(registry_host: str, name: str, layers: list[EStargzLayer]) -> EStargzImage:
    """Push blobs, config and an OCI manifest (with TOC-digest annotations) as ``host/name``."""
    ref = Reference.parse(f"{registry_host}/{name}")
    digest = asyncio.run(_push(ref, layers))
    return EStargzImage(str(ref), digest, layers)
