"""Remote pull into containerd (what ctr-remote's ``images rpull`` does).

1. Resolve the manifest (through lazyd's ``resolve`` op, or with a registry client).
2. Under a lease, write index, manifest and config into containerd's content store with
   the gc labels containerd's own pull sets (concurrently with step 3: the lease protects
   both, and nothing in the snapshot chain needs them).
3. Build the snapshot chain through containerd's snapshot service, layer by layer, with
   the remote labels stargz-snapshotter understands. ``ALREADY_EXISTS`` on Prepare means
   the snapshotter mounted the layer lazily. Otherwise (fallback) the layer blob is fetched
   into the content store and applied with the diff service onto the prepared snapshot,
   then committed under its chain ID, as containerd's unpacker does.
4. Label the config with the snapshot chain and create (or update) the image record.
   Like containerd's client, the record is created after the unpack, so a failed pull
   leaves no half-usable image behind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lazyd.registry.reference import Reference
from lazyd.registry.types import Descriptor, Image

from . import labels as L
from .client import WRITE_CHUNK, ContainerdClient, ImageRecord
from .errors import AlreadyExistsError, ContainerdError, NotFoundError

TOC_DIGEST_ANNOTATION = L.STARGZ_TOC_DIGEST
log = logging.getLogger(__name__)


class PullError(Exception):
    """The image could not be pulled; the message names the layer or object and why."""


@dataclass
class LayerResult:
    """What happened to one layer."""

    index: int
    digest: str
    size: int
    chain_id: str
    mode: str  # "lazy" (remote snapshot), "full" (fetched + applied), "present" (snapshot existed)
    reason: str | None = None  # why a layer was pulled in full
    seconds: float = 0.0


@dataclass
class PullResult:
    """The outcome of one rpull, printable as JSON."""

    image: str
    target_digest: str
    manifest_digest: str
    config_digest: str
    snapshotter: str
    chain_id: str
    layers: list[LayerResult] = field(default_factory=list)
    bytes_fetched: int = 0
    seconds: float = 0.0
    resolved_by: str = ""  # "lazyd" or "registry" (see lazyd.containerd.source)

    @property
    def full_layers(self) -> list[LayerResult]:
        return [layer for layer in self.layers if layer.mode == "full"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ImageSource(Protocol):
    """Resolves images and downloads whole blobs (``RegistryClient``, ``LazydSource``)."""

    async def resolve(self, ref: Reference) -> Image: ...
    async def fetch_blob(self, ref: Reference, digest: str, path: str, progress: Callable[[int], None],
                         size: int | None = None) -> int: ...


class PullObserver(Protocol):
    """Progress callbacks (the CLI draws its bar from these)."""

    def resolved(self, image: Image) -> None: ...
    def layer_started(self, index: int, desc: Descriptor) -> None: ...
    def fetched(self, nbytes: int) -> None: ...
    def layer_done(self, result: LayerResult) -> None: ...


class _NoObserver:
    def resolved(self, image: Image) -> None:
        pass

    def layer_started(self, index: int, desc: Descriptor) -> None:
        pass

    def fetched(self, nbytes: int) -> None:
        pass

    def layer_done(self, result: LayerResult) -> None:
        pass


def _unique_part() -> str:
    """containerd's unpacker key randomness: ``<nanoseconds>-<base64 of 3 random bytes>``."""
    return f"{time.time_ns() % 1_000_000_000}-{base64.urlsafe_b64encode(secrets.token_bytes(3)).decode()}"


def _ingest_ref(kind: str, digest: str) -> str:
    """containerd's remotes.MakeRefKey: ``manifest-sha256:...``, ``layer-sha256:...``."""
    return f"{kind}-{digest}"


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(WRITE_CHUNK):
            yield piece


FallbackReasons = Callable[[str], Awaitable[str | None]]
"""layer digest -> why the snapshotter fell back for it (e.g. from lazyd's ``status``), or None."""


class RemotePuller:
    """Pull one image into containerd through ``snapshotter``."""

    def __init__(self, containerd: ContainerdClient, registry: ImageSource, snapshotter: str,
                 observer: PullObserver | None = None, workdir: str | None = None,
                 fallback_reasons: FallbackReasons | None = None) -> None:
        self.containerd = containerd
        self.registry = registry
        self.snapshotter = snapshotter
        self.observer: PullObserver = observer or _NoObserver()
        self.workdir = workdir
        self.fallback_reasons = fallback_reasons
        self._downloads: dict[str, asyncio.Task[int]] = {}

    async def pull(self, ref: Reference, name: str | None = None) -> PullResult:
        """Pull ``ref``; the image record is called ``name`` (default: the canonical reference)."""
        started = time.monotonic()
        image = await self.registry.resolve(ref)
        log.debug("pull %s: resolved %s in %.3fs", ref, image.manifest_digest, time.monotonic() - started)
        self.observer.resolved(image)
        diff_ids = [str(d) for d in (image.config.get("rootfs") or {}).get("diff_ids") or []]
        layers = [d for d in image.layers if L.is_layer(d.media_type)]
        if len(diff_ids) != len(layers):
            raise PullError(f"{ref}: config {image.config_digest} lists {len(diff_ids)} diff IDs "
                            f"but manifest {image.manifest_digest} has {len(layers)} layers")
        chain = L.chain_ids(diff_ids)
        image_name = name or str(ref)
        result = PullResult(image=image_name, target_digest=image.index_digest or image.manifest_digest,
                            manifest_digest=image.manifest_digest, config_digest=image.config_digest,
                            snapshotter=self.snapshotter, chain_id=chain[-1] if chain else "")
        async with self.containerd.lease():
            metadata = asyncio.create_task(self._write_metadata(image))
            parent = ""
            try:
                for i, desc in enumerate(layers):
                    self.observer.layer_started(i, desc)
                    # Above a layer that was not there, none is (a chain ID names its parents): no Stat.
                    absent = i > 0 and result.layers[-1].mode != "present"
                    layer = await self._unpack_layer(image, i, desc, layers, diff_ids[i], chain[i], parent, result,
                                                     absent)
                    log.debug("pull %s: layer %d %s in %.3fs (at %.3fs)", ref, i, layer.mode, layer.seconds,
                              time.monotonic() - started)
                    result.layers.append(layer)
                    self.observer.layer_done(layer)
                    parent = chain[i]
                target = await metadata
            finally:
                pending = [metadata, *self._downloads.values()]
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                self._downloads.clear()
            if chain:
                await self.containerd.content_update_labels(
                    image.config_digest, {L.GC_REF_SNAPSHOT_PREFIX + self.snapshotter: chain[-1]})
            await self.containerd.put_image(ImageRecord(name=image_name, target=target))
            log.debug("pull %s: image record %s at %.3fs", ref, image_name, time.monotonic() - started)
        result.target_digest = target.digest
        result.seconds = time.monotonic() - started
        return result

    async def _write_metadata(self, image: Image) -> Descriptor:
        """Write config, manifest and (when there is one) index at once, each with containerd's labels.

        Returns the image's target: the index, or else the manifest.
        """
        ref = image.ref
        if not image.manifest_bytes or not image.config_bytes or (image.index_digest and not image.index_bytes):
            raise PullError(f"{ref}: the registry client returned no raw index/manifest/config bytes")
        config = Descriptor(image.config_media_type, image.config_digest, len(image.config_bytes))
        manifest_labels = {L.GC_REF_CONFIG: image.config_digest}
        n = 0
        for d in image.layers:
            if L.is_layer(d.media_type):
                manifest_labels[f"{L.GC_REF_LAYER_PREFIX}{n}"] = d.digest
                n += 1
        manifest = Descriptor(image.manifest_media_type, image.manifest_digest, len(image.manifest_bytes))
        writes = [self._write_small("config", config, image.config_bytes, {}, ref),
                  self._write_small("manifest", manifest, image.manifest_bytes, manifest_labels, ref)]
        target = manifest
        if image.index_digest:
            index_labels: dict[str, str] = {}
            for i, child in enumerate(json.loads(image.index_bytes).get("manifests") or []):
                index_labels[f"{L.GC_REF_MANIFEST_PREFIX}{i}"] = str(child.get("digest"))
            target = Descriptor(image.index_media_type or "", image.index_digest, len(image.index_bytes))
            writes.append(self._write_small("index", target, image.index_bytes, index_labels, ref))
        await asyncio.gather(*writes)
        return target

    async def _write_small(self, kind: str, desc: Descriptor, data: bytes, labels: dict[str, str],
                           ref: Reference) -> None:
        """Write one small blob, merging the distribution-source label with what the store has."""
        src_key, _ = L.distribution_source(ref.registry, ref.repository)
        existing = ""
        try:
            existing = (await self.containerd.content_info(desc.digest)).labels.get(src_key, "")
        except NotFoundError:
            pass
        merged = dict(labels)
        merged[src_key] = L.distribution_source(ref.registry, ref.repository, existing)[1]
        await self.containerd.write_content(_ingest_ref(kind, desc.digest), desc, data, merged)

    async def _unpack_layer(self, image: Image, i: int, desc: Descriptor, layers: list[Descriptor],
                            diff_id: str, chain_id: str, parent: str, result: PullResult,
                            absent: bool = False) -> LayerResult:
        started = time.monotonic()
        out = LayerResult(index=i, digest=desc.digest, size=desc.size, chain_id=chain_id, mode="present")
        cd, sn = self.containerd, self.snapshotter
        if not absent:
            try:
                await cd.stat(sn, chain_id)
                out.seconds = time.monotonic() - started
                return out
            except NotFoundError:
                pass
        labels = L.remote_snapshot_labels(
            ref=str(image.ref), chain_id=chain_id, layer_digest=desc.digest, layer_annotations=desc.annotations,
            later_layer_digests=[d.digest for d in layers[i:]], urls=desc.urls)
        mounts = None
        key = ""
        for _ in range(3):
            key = f"extract-{_unique_part()} {chain_id}"
            try:
                mounts = await cd.prepare(sn, key, parent, labels)
                break
            except AlreadyExistsError:
                try:
                    await cd.stat(sn, chain_id)
                except NotFoundError:
                    continue  # the extraction key collided; try another
                out.mode = "lazy"
                out.seconds = time.monotonic() - started
                return out
        if mounts is None:
            raise PullError(f"layer {i} ({desc.digest}): could not prepare snapshot {chain_id} on {sn}")
        out.mode = "full"
        try:
            out.reason = await self._fallback_reason(desc)
            self._start_downloads(image, desc, layers[i + 1:])
            result.bytes_fetched += await self._downloads.pop(desc.digest)
            applied = await cd.apply(desc, mounts)
            if applied.digest != diff_id:
                raise PullError(f"layer {i} ({desc.digest}): applied diff is {applied.digest}, "
                                f"the image config says {diff_id}")
            try:
                await cd.commit(sn, chain_id, key, labels)
            except AlreadyExistsError:
                await cd.remove(sn, key)  # someone else committed the same chain meanwhile
            await cd.content_update_labels(desc.digest, {L.UNCOMPRESSED: applied.digest})
        except BaseException:
            try:
                await cd.remove(sn, key)
            except ContainerdError:
                pass
            raise
        out.seconds = time.monotonic() - started
        return out

    def _start_downloads(self, image: Image, desc: Descriptor, above: list[Descriptor]) -> None:
        """Download ``desc`` now, and the non-eStargz layers above it meanwhile (they will fall back too).

        containerd's unpacker likewise fetches the remaining layers in parallel once one needs fetching.
        """
        for d in [desc, *(d for d in above if TOC_DIGEST_ANNOTATION not in d.annotations)]:
            if d.digest not in self._downloads:
                self._downloads[d.digest] = asyncio.create_task(self._fetch_layer(image, d))

    async def _fallback_reason(self, desc: Descriptor) -> str:
        """Why the snapshotter handed back a normal snapshot for this layer."""
        if TOC_DIGEST_ANNOTATION not in desc.annotations:
            return f"not eStargz: the layer has no {TOC_DIGEST_ANNOTATION} annotation"
        reason = f"snapshotter {self.snapshotter!r} did not mount it lazily"
        detail = await self.fallback_reasons(desc.digest) if self.fallback_reasons else None
        return f"{reason}: {detail}" if detail else f"{reason} (see its log)"

    async def _fetch_layer(self, image: Image, desc: Descriptor) -> int:
        """Put the layer blob into containerd's content store; returns the bytes downloaded."""
        cd = self.containerd
        src_key, src_val = L.distribution_source(image.ref.registry, image.ref.repository)
        try:
            info = await cd.content_info(desc.digest)
        except NotFoundError:
            pass
        else:  # already in the store (e.g. pulled before): only add this source
            merged = L.distribution_source(image.ref.registry, image.ref.repository, info.labels.get(src_key, ""))
            await cd.content_update_labels(desc.digest, {merged[0]: merged[1]})
            return 0
        with tempfile.TemporaryDirectory(prefix="lazyctl-rpull-", dir=self.workdir) as tmp:
            path = Path(tmp) / "blob"
            await self.registry.fetch_blob(image.ref, desc.digest, str(path), progress=self.observer.fetched,
                                           size=desc.size)
            size = os.path.getsize(path)
            await cd.write_content(_ingest_ref("layer", desc.digest), desc, _file_chunks(path), {src_key: src_val})
        return size
