"""Whole-image conversion to eStargz: pull each layer, convert, push blobs, config and manifest(s).

Layers are downloaded concurrently and converted in worker processes (one per CPU,
spawned rather than forked from the event loop), so a multi-layer image converts in parallel.  Layers that already are eStargz are kept,
unless ``rebuild`` (``lazyctl image optimize``: every layer gets its own priority list, ``layer_prioritized``).
The result is an ordinary OCI image (gzip layers) that any runtime can pull.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lazyd.registry import Descriptor, Image, Platform, Reference, RegistryClient, select_platform
from lazyd.registry.client import digest_of
from lazyd.registry.types import (ANNOTATION_UNCOMPRESSED_SIZE, GZIP_LAYER_TYPES, INDEX_TYPES, MANIFEST_TYPES,
                                  MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_LAYER, MEDIA_OCI_LAYER_GZIP,
                                  MEDIA_OCI_MANIFEST)

from .layer import LayerBuild, build_layer, converted_descriptor, is_estargz

log = logging.getLogger(__name__)

_CONVERTIBLE = (*GZIP_LAYER_TYPES, MEDIA_OCI_LAYER, "application/vnd.docker.image.rootfs.diff.tar")


class ConvertError(Exception):
    """The source image cannot be converted (unsupported layer type, bad config, ...)."""


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert: platform choice and eStargz writer settings."""

    platform: str | None = None          # os/arch[/variant]; None: the host's
    all_platforms: bool = False          # convert every platform of an index and push an index
    chunk_size: int | None = None        # eStargz chunk size (None: the writer's default)
    prioritized: list[str] | None = None  # files to put first (before the prefetch landmark)
    workers: int = 0                     # layers converted at once, each in its own process (0: one per CPU)
    threads: int | None = None           # compression threads per layer (None: one per CPU)
    work_dir: str | None = None          # where layers are staged (None: the system temp dir)
    # Per layer index: files to put first in that layer (``optimize``); a layer without an entry
    # gets ``.no.prefetch.landmark``.  Replaces ``prioritized``; single-platform images only.
    layer_prioritized: dict[int, list[str]] | None = None
    rebuild: bool = False                # rebuild layers that already are eStargz too


@dataclass
class LayerResult:
    source_digest: str
    digest: str
    size: int
    toc_digest: str | None
    uncompressed_size: int | None
    action: str                          # "converted" or "kept"
    prioritized: int = 0                 # files placed before the landmark (as asked; ``missing`` were absent)
    landmark: str | None = None          # "prefetch" or "no-prefetch" for a built layer, None when kept
    missing: list[str] = field(default_factory=list)  # prioritized paths this layer does not have


@dataclass
class ManifestResult:
    platform: str
    source_digest: str
    digest: str
    size: int
    layers: list[LayerResult] = field(default_factory=list)


@dataclass
class ConvertResult:
    source: str
    destination: str
    digest: str
    media_type: str
    manifests: list[ManifestResult]
    seconds: float = 0.0
    missing_prioritized: list[str] = field(default_factory=list)  # prioritized paths found in no layer

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[int], None]


class _Converter:
    def __init__(self, client: RegistryClient, src: Reference, dst: Reference, options: ConvertOptions,
                 pool: ProcessPoolExecutor, work: Path, progress: ProgressFn | None) -> None:
        self.client, self.src, self.dst, self.options = client, src, dst, options
        self.pool, self.work, self.progress = pool, work, progress
        self._layer_tasks: dict[tuple[str, int], asyncio.Task[tuple[Descriptor, str, LayerResult]]] = {}
        self.missing: list[set[str]] = []  # prioritized paths absent from each converted layer

    async def manifest(self, image: Image, tagged: bool) -> ManifestResult:
        """Convert one single-platform image; push its layers, config and manifest (by tag or by digest)."""
        diff_ids = image.config.get("rootfs", {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(image.layers):
            raise ConvertError(f"config of {image.ref} has {len(diff_ids or [])} diff_ids for {len(image.layers)} layers")
        tasks = [self._layer(desc, diff_id, i) for i, (desc, diff_id) in enumerate(zip(image.layers, diff_ids))]
        done = await asyncio.gather(*tasks)
        config = dict(image.config)
        config["rootfs"] = {**config["rootfs"], "diff_ids": [d for _, d, _ in done]}
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        config_digest = digest_of(config_bytes)
        await self.client.push_blob(self.dst, config_digest, config_bytes)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": [desc.to_json() for desc, _, _ in done],
        }
        if image.manifest.get("annotations"):
            manifest["annotations"] = image.manifest["annotations"]
        body = json.dumps(manifest, separators=(",", ":")).encode()
        target = self.dst if tagged else Reference(self.dst.registry, self.dst.repository, None, digest_of(body))
        digest = await self.client.put_manifest(target, body, MEDIA_OCI_MANIFEST)
        return ManifestResult(image.platform, image.manifest_digest, digest, len(body), [r for _, _, r in done])

    def _layer(self, desc: Descriptor, diff_id: str, index: int) -> "asyncio.Task[tuple[Descriptor, str, LayerResult]]":
        # The same layer in several platforms (or twice in one image) is converted once; with
        # per-layer priority lists, once per position (each position has its own list).
        key = (desc.digest, index if self.options.layer_prioritized is not None else -1)
        if key not in self._layer_tasks:
            self._layer_tasks[key] = asyncio.ensure_future(self._convert_layer(desc, diff_id, key[1]))
        return self._layer_tasks[key]

    def _prioritized(self, index: int) -> list[str] | None:
        if self.options.layer_prioritized is not None:
            return list(self.options.layer_prioritized.get(index, []))
        return self.options.prioritized

    async def _convert_layer(self, desc: Descriptor, diff_id: str, index: int) -> tuple[Descriptor, str, LayerResult]:
        if desc.urls:
            raise ConvertError(f"layer {desc.digest} of {self.src} is a foreign layer (urls); not supported")
        if desc.media_type not in _CONVERTIBLE:
            raise ConvertError(f"layer {desc.digest} of {self.src} has unsupported media type {desc.media_type}")
        if (not self.options.rebuild and desc.media_type in GZIP_LAYER_TYPES
                and await is_estargz(self.client, self.src, desc)):
            await self._copy_blob(desc)
            kept = Descriptor(MEDIA_OCI_LAYER_GZIP, desc.digest, desc.size, dict(desc.annotations))
            if self.progress:
                self.progress(desc.size)
            return kept, diff_id, LayerResult(desc.digest, desc.digest, desc.size, desc.toc_digest,
                                              _int(desc.annotations.get(ANNOTATION_UNCOMPRESSED_SIZE)),
                                              "kept")
        stem = desc.digest.replace(':', '-') + (f"-{index}" if index >= 0 else "")
        src_path = self.work / f"{stem}.src"
        dst_path = self.work / f"{stem}.estargz"
        await self.client.fetch_blob(self.src, desc.digest, src_path, progress=self.progress, size=desc.size)
        loop = asyncio.get_running_loop()
        prioritized = self._prioritized(index)
        built: LayerBuild = await loop.run_in_executor(self.pool, build_layer, str(src_path), str(dst_path),
                                                       self.options.chunk_size, prioritized,
                                                       self.options.threads)
        self.missing.append(set(built.missing_prioritized))
        src_path.unlink(missing_ok=True)
        await self.client.push_blob(self.dst, built.blob_digest, dst_path)
        dst_path.unlink(missing_ok=True)
        new = converted_descriptor(desc, built, MEDIA_OCI_LAYER_GZIP)
        log.debug("layer %s -> %s (toc %s)", desc.digest, built.blob_digest, built.toc_digest)
        return new, built.diff_id, LayerResult(desc.digest, built.blob_digest, built.blob_size, built.toc_digest,
                                               built.uncompressed_size, "converted", len(prioritized or []),
                                               "prefetch" if prioritized else "no-prefetch",
                                               list(built.missing_prioritized))

    async def _copy_blob(self, desc: Descriptor) -> None:
        if await self.client.blob_exists(self.dst, desc.digest):
            return
        if await self.client.mount_blob(self.dst, desc.digest, self.src):
            return
        path = self.work / f"{desc.digest.replace(':', '-')}.copy"
        await self.client.fetch_blob(self.src, desc.digest, path, size=desc.size)
        await self.client.push_blob(self.dst, desc.digest, path)
        path.unlink(missing_ok=True)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def convert_image(client: RegistryClient, src: Reference, dst: Reference, options: ConvertOptions,
                        progress: ProgressFn | None = None, total: Callable[[int], None] | None = None) -> ConvertResult:
    """Convert ``src`` to eStargz and push it as ``dst``; ``total`` is told the bytes to download."""
    started = time.monotonic()
    if dst.tag is None:
        raise ConvertError(f"destination {dst} needs a tag")
    if options.layer_prioritized is not None and options.all_platforms:
        raise ConvertError("per-layer priority lists apply to one platform's image, not to --all-platforms")
    body, media_type, digest = await client.get_manifest(src)
    images: list[tuple[Image, dict[str, Any] | None]] = []
    if media_type in INDEX_TYPES:
        index = json.loads(body)
        if options.all_platforms:
            for entry in index.get("manifests", []):
                d = Descriptor.from_json(entry, f"index of {src}")
                if d.media_type not in MANIFEST_TYPES:
                    continue
                if (d.platform or {}).get("os") == "unknown":  # attestation manifests
                    continue
                images.append((await client.resolve(src.with_digest(d.digest)), d.platform))
        else:
            chosen = select_platform(index, options.platform, str(src))
            images.append((await client.resolve(src.with_digest(chosen.digest)), chosen.platform))
    else:
        image = await client.resolve(src.with_digest(digest) if not src.digest else src)
        if options.platform and not Platform.parse(options.platform).matches(
                {"os": image.config.get("os"), "architecture": image.config.get("architecture"),
                 "variant": image.config.get("variant")}):
            raise ConvertError(f"{src} is a single-platform image for {image.platform}, not {options.platform}")
        images.append((image, None))
    if total:
        seen: dict[str, int] = {}
        for image, _ in images:
            for layer in image.layers:
                seen[layer.digest] = layer.size
        total(sum(seen.values()))
    workers = options.workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="lazyd-convert-", dir=options.work_dir) as tmp, \
            ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        conv = _Converter(client, src, dst, options, pool, Path(tmp), progress)
        as_index = media_type in INDEX_TYPES and options.all_platforms
        results = await asyncio.gather(*(conv.manifest(image, tagged=not as_index) for image, _ in images))
    missing = (sorted(set.intersection(*conv.missing))
               if conv.missing and options.prioritized and options.layer_prioritized is None else [])
    if as_index:
        entries = []
        for (image, platform), res in zip(images, results):
            entries.append({"mediaType": MEDIA_OCI_MANIFEST, "digest": res.digest, "size": res.size,
                            "platform": platform or {"os": image.config.get("os"),
                                                     "architecture": image.config.get("architecture")}})
        index_body = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": entries},
                                separators=(",", ":")).encode()
        top = await client.put_manifest(dst, index_body, MEDIA_OCI_INDEX)
        top_type = MEDIA_OCI_INDEX
    else:
        top, top_type = results[0].digest, MEDIA_OCI_MANIFEST
    return ConvertResult(str(src), str(dst), top, top_type, list(results), round(time.monotonic() - started, 3),
                         missing)

