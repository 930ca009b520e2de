"""The fetcher's layer table: footer + TOC fetch and verification, and on-disk layer metadata.

A layer is opened once per digest (concurrent opens share the work) and its
verified TOC is persisted under ``<root>/layers/<algo>-<hex>/`` (``meta.json`` +
``toc.json``) so that workers can load it and a restarted fetcher can serve
adopted mounts without the registry; ``counters.json`` keeps the layer's fetch
counters across restarts (saved every few seconds and on stop).  Next to it goes ``inodes.msgpack``: the
worker's inode table, built once here while the TOC is parsed, so that a worker
mounts a layer without parsing its TOC again (it falls back to ``toc.json``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lazyd.api.messages import (
    ANNOTATION_TOC_DIGEST,
    DIGEST_MISMATCH,
    FETCH_FAILED,
    INTERNAL,
    NOT_ESTARGZ,
    NOT_FOUND,
    UNAUTHORIZED,
    UNREACHABLE,
    ApiError,
    LayerStats,
)
from lazyd.estargz import (
    TOC,
    Chunk,
    EStargzError,
    FooterError,
    TOCDigestMismatch,
    decode_toc_member,
    read_footer,
)
from lazyd.fuse.inodes import InodeTable, InodeTableError
from lazyd.registry import (
    Descriptor,
    DigestMismatchError,
    Image,
    NotFoundError,
    Reference,
    RegistryClient,
    RegistryError,
    UnauthorizedError,
    UnreachableError,
)

INODES_FILE = "inodes.msgpack"
COUNTERS_FILE = "counters.json"
PERSISTED_COUNTERS = ("demand_bytes", "prefetch_bytes", "background_bytes", "registry_requests", "verify_errors")
RECENT_IMAGES = 64
MAX_KNOWN_SIZES = 4096
log = logging.getLogger(__name__)

TAIL_SIZE = 64 * 1024
"""Fewest bytes read from the end of a blob in the first request (footer and, usually, the TOC)."""
MAX_TAIL_SIZE = 512 * 1024
TAIL_FRACTION = 128
"""The first request reads ``blob_size // TAIL_FRACTION`` bytes (within the bounds above): an eStargz
TOC is about 1/150 of its blob (debian: 349 KB of 51 MB, 93 KB of 17 MB), so footer and TOC
usually come in one GET.  A bigger TOC costs a second GET of only the bytes still missing."""


def tail_size(blob_size: int) -> int:
    """How many bytes to read from the end of a ``blob_size``-byte blob first."""
    return min(blob_size, max(TAIL_SIZE, min(MAX_TAIL_SIZE, blob_size // TAIL_FRACTION)))


def registry_error(exc: RegistryError) -> ApiError:
    """Translate a registry error into an API error with the matching code."""
    if isinstance(exc, NotFoundError):
        return ApiError(NOT_FOUND, str(exc))
    if isinstance(exc, UnauthorizedError):
        return ApiError(UNAUTHORIZED, str(exc))
    if isinstance(exc, UnreachableError):
        return ApiError(UNREACHABLE, str(exc))
    if isinstance(exc, DigestMismatchError):
        return ApiError(DIGEST_MISMATCH, str(exc))
    return ApiError(FETCH_FAILED, str(exc))


@dataclass(frozen=True)
class Member:
    """One gzip member of the blob and the chunks decoded from it."""

    blob_offset: int
    blob_end: int
    chunks: tuple[Chunk, ...]

    @property
    def size(self) -> int:
        return self.blob_end - self.blob_offset


@dataclass
class LayerCounters:
    """Mutable per-layer fetch counters (shown by ``status``)."""

    demand_bytes: int = 0
    prefetch_bytes: int = 0
    background_bytes: int = 0
    registry_requests: int = 0
    in_flight: int = 0
    verify_errors: int = 0
    prefetch_state: str = "none"
    background_state: str = "none"
    last_error: str | None = None

    def add_bytes(self, priority: str, n: int) -> None:
        setattr(self, f"{priority}_bytes", getattr(self, f"{priority}_bytes") + n)

    def totals(self) -> dict[str, int]:
        """The cumulative counters, as ``counters.json`` keeps them across fetcher restarts."""
        return {name: getattr(self, name) for name in PERSISTED_COUNTERS}

    def restore(self, saved: object) -> None:
        """Start from counters saved by ``totals`` (ignoring anything malformed)."""
        if isinstance(saved, dict):
            for name in PERSISTED_COUNTERS:
                value = saved.get(name)
                if type(value) is int and value >= 0:
                    setattr(self, name, value)

    @property
    def fetched_bytes(self) -> int:
        return self.demand_bytes + self.prefetch_bytes + self.background_bytes

    def stats(self, layer_size: int, cached_bytes: int) -> LayerStats:
        """The counters as the ``status`` message carries them."""
        return LayerStats(layer_size=layer_size, fetched_bytes=self.fetched_bytes, cached_bytes=cached_bytes,
                          **asdict(self))


@dataclass(frozen=True)
class LayerMeta:
    """What is persisted about a layer (no credentials)."""

    ref: str
    layer_digest: str
    toc_digest: str
    blob_size: int
    toc_offset: int


@dataclass
class Layer:
    """An opened, verified eStargz layer."""

    meta: LayerMeta
    toc: TOC
    toc_path: Path
    members: list[Member]
    by_chunk: dict[tuple[int, int], Member]
    counters: LayerCounters = field(default_factory=LayerCounters)
    inodes_path: Path | None = None

    @property
    def digest(self) -> str:
        return self.meta.layer_digest

    @property
    def ref(self) -> Reference:
        return Reference.parse(self.meta.ref)

    @classmethod
    def build(cls, meta: LayerMeta, toc: TOC, toc_path: Path, inodes_path: Path | None = None) -> Layer:
        groups: dict[int, list[Chunk]] = {}
        for chunk in toc.chunks:
            groups.setdefault(chunk.blob_offset, []).append(chunk)
        members = []
        by_chunk: dict[tuple[int, int], Member] = {}
        for offset in sorted(groups):
            chunks = tuple(groups[offset])
            end = chunks[0].blob_end if chunks[0].blob_end is not None else meta.toc_offset
            member = Member(offset, end, chunks)
            members.append(member)
            for chunk in chunks:
                by_chunk[(chunk.blob_offset, chunk.inner_offset)] = member
        return cls(meta, toc, toc_path, members, by_chunk, inodes_path=inodes_path)


def layer_dir(root: Path, digest: str) -> Path:
    return root / "layers" / digest.replace(":", "-")


class LayerTable:
    """Opened layers by digest; opens from the registry or from ``<root>/layers``."""

    def __init__(self, root: Path, client: RegistryClient) -> None:
        self.root = root
        self.client = client
        self._layers: dict[str, Layer] = {}
        self._opening: dict[str, asyncio.Future[Layer]] = {}
        # Recently resolved images by (registry, repository, manifest digest): immutable, so a
        # mount of a digest-pinned ref right after a ``resolve`` needs no registry request.
        self._images: OrderedDict[tuple[str, str, str], Image] = OrderedDict()
        # One TOC parse at a time: two interleaved under the GIL would both finish late,
        # while in turn the first layer (the one a container waits for) is ready sooner.
        self._parse_lock = asyncio.Lock()
        self._saved: dict[str, dict[str, int]] = {}  # counters as last written, by layer digest
        self._warming: set[asyncio.Future[Layer]] = set()  # opens started by warm(), kept referenced
        self._sizes: dict[tuple[str, str, str], int] = {}  # (registry, repository, digest) -> size, from warm()

    def remember(self, image: Image) -> None:
        """Keep ``image`` (its ref is pinned to the manifest digest) for TOC-digest lookups."""
        if image.ref.digest:
            key = (image.ref.registry, image.ref.repository, image.ref.digest)
            self._images[key] = image
            self._images.move_to_end(key)
            while len(self._images) > RECENT_IMAGES:
                self._images.popitem(last=False)

    def warm(self, ref: Reference, layers: Sequence[Descriptor], timeout: float) -> None:
        """Start opening every eStargz layer in ``layers`` (of the manifest ``ref`` pins) in the background.

        The snapshotter's mounts, which follow a pull's resolve, then find the footer and
        TOC fetched (or on their way) instead of fetching them one Prepare after another.
        Failures are only logged: the mount that needs the layer opens it again and reports.
        """
        for desc in layers:
            if desc.size > 0:
                self._sizes[(ref.registry, ref.repository, desc.digest)] = desc.size
        if len(self._sizes) > MAX_KNOWN_SIZES:
            self._sizes.clear()
        below: asyncio.Future[Layer] | None = None
        for desc in layers:
            toc_digest = desc.annotations.get(ANNOTATION_TOC_DIGEST)
            if not toc_digest or desc.digest in self._layers or desc.digest in self._opening:
                continue
            task = asyncio.ensure_future(self.open(ref, desc.digest, str(toc_digest), timeout, parse_after=below))
            self._warming.add(task)
            task.add_done_callback(self._warmed)
            below = task

    def _warmed(self, task: asyncio.Future[Layer]) -> None:
        self._warming.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("opening a layer ahead of its mount failed: %s", task.exception())

    def get(self, digest: str) -> Layer | None:
        """An open layer, loading persisted metadata if needed; None if unknown."""
        layer = self._layers.get(digest)
        if layer is None:
            layer = self._load(digest)
            if layer is not None:
                self._layers[digest] = layer
        return layer

    def all(self) -> list[Layer]:
        return list(self._layers.values())

    def save_counters(self) -> None:
        """Write ``counters.json`` of every layer whose counters changed since the last save."""
        for layer in list(self._layers.values()):
            totals = layer.counters.totals()
            if totals != self._saved.get(layer.digest):
                try:
                    atomic_write(layer.toc_path.with_name(COUNTERS_FILE), json.dumps(totals).encode(), sync=False)
                except OSError as exc:
                    log.warning("cannot save the counters of layer %s: %s", layer.digest, exc)
                    continue
                self._saved[layer.digest] = totals

    async def open(self, ref: Reference, digest: str, toc_digest: str | None, timeout: float,
                   parse_after: asyncio.Future[Layer] | None = None) -> Layer:
        """The layer, fetching and verifying its footer and TOC if it is not open yet.

        ``parse_after``: parse this TOC only once that open has ended (``warm`` parses the
        layers of an image bottom-up, so the first layer a pull mounts is not held up
        behind an upper layer whose smaller TOC arrived first).
        """
        layer = self.get(digest)
        if layer is not None:
            if toc_digest is not None and toc_digest != layer.meta.toc_digest:
                raise ApiError(DIGEST_MISMATCH, f"layer {digest} has TOC digest {layer.meta.toc_digest}, "
                                                f"not {toc_digest}")
            return layer
        pending = self._opening.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._open(ref, digest, toc_digest, timeout, parse_after))
            self._opening[digest] = pending
            pending.add_done_callback(lambda _f: self._opening.pop(digest, None))
        return await asyncio.shield(pending)

    async def _open(self, ref: Reference, digest: str, toc_digest: str | None, timeout: float,
                    parse_after: asyncio.Future[Layer] | None = None) -> Layer:
        try:
            return await asyncio.wait_for(self._fetch_toc(ref, digest, toc_digest, parse_after), timeout)
        except asyncio.TimeoutError:
            raise ApiError("timeout", f"opening layer {digest} of {ref} took longer than {timeout}s") from None
        except RegistryError as exc:
            raise registry_error(exc) from None

    def _known_size(self, ref: Reference, digest: str) -> int | None:
        """The layer's size from a remembered manifest of ``ref``'s repository (saves a HEAD)."""
        size = self._sizes.get((ref.registry, ref.repository, digest))
        if size:
            return size
        for (registry, repository, _), image in reversed(self._images.items()):
            if (registry, repository) == (ref.registry, ref.repository):
                for desc in image.layers:
                    if desc.digest == digest and desc.size > 0:
                        return desc.size
        return None

    async def _toc_digest_from_manifest(self, ref: Reference, digest: str) -> str:
        image = self._images.get((ref.registry, ref.repository, ref.digest)) if ref.digest else None
        if image is None:
            image = await self.client.resolve(ref)
            self.remember(image)
        for desc in image.layers:
            if desc.digest == digest:
                value = desc.annotations.get(ANNOTATION_TOC_DIGEST)
                if not value:
                    raise ApiError(NOT_ESTARGZ, f"layer {digest} of {ref} has no {ANNOTATION_TOC_DIGEST} annotation")
                return str(value)
        raise ApiError(NOT_FOUND, f"layer {digest} is not in the manifest of {ref}")

    async def _fetch_toc(self, ref: Reference, digest: str, toc_digest: str | None,
                         parse_after: asyncio.Future[Layer] | None = None) -> Layer:
        if toc_digest is None:
            toc_digest = await self._toc_digest_from_manifest(ref, digest)
        blob_size = self._known_size(ref, digest) or await self.client.blob_size(ref, digest)
        counters = LayerCounters()
        tail_len = tail_size(blob_size)
        if tail_len == 0:
            raise ApiError(NOT_ESTARGZ, f"layer {digest} is empty")
        (tail,) = await self.client.fetch_ranges(ref, digest, [(blob_size - tail_len, tail_len)])
        counters.registry_requests += 1
        try:
            footer = read_footer(tail, blob_size)
        except FooterError as exc:
            raise ApiError(NOT_ESTARGZ, f"layer {digest} of {ref}: {exc}") from None
        toc_end = blob_size - footer.size
        tail_start = blob_size - tail_len
        if footer.toc_offset >= tail_start:
            member = tail[footer.toc_offset - tail_start : toc_end - tail_start]
        else:  # the tail holds the TOC's end: fetch only its beginning
            (head,) = await self.client.fetch_ranges(ref, digest, [(footer.toc_offset, tail_start - footer.toc_offset)])
            counters.registry_requests += 1
            member = head + tail[: toc_end - tail_start]
        if parse_after is not None:
            await asyncio.wait([parse_after])  # its outcome is its own mount's business
        started = time.monotonic()
        try:
            async with self._parse_lock:
                json_bytes, toc, inodes = await asyncio.to_thread(_parse_toc, member, toc_digest, footer.toc_offset)
        except TOCDigestMismatch as exc:
            raise ApiError(DIGEST_MISMATCH, f"layer {digest} of {ref}: {exc}") from None
        except (EStargzError, InodeTableError) as exc:
            raise ApiError(NOT_ESTARGZ, f"layer {digest} of {ref}: {exc}") from None
        log.debug("layer %s: TOC of %d entries verified, parsed and turned into inodes in %.3fs", digest,
                  len(toc.entries), time.monotonic() - started)
        meta = LayerMeta(str(ref), digest, toc_digest, blob_size, footer.toc_offset)
        toc_path = self._persist(meta, json_bytes, inodes)
        layer = Layer.build(meta, toc, toc_path, toc_path.with_name(INODES_FILE))
        layer.counters = counters
        self._layers[digest] = layer
        return layer

    def _persist(self, meta: LayerMeta, json_bytes: bytes, inodes: bytes) -> Path:
        d = layer_dir(self.root, meta.layer_digest)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(d / "toc.json", json_bytes)
        # A derived cache: a worker checks it and falls back to toc.json, so no fsync.
        atomic_write(d / INODES_FILE, inodes, sync=False)
        atomic_write(d / "meta.json", json.dumps(asdict(meta)).encode())
        return d / "toc.json"

    def _load(self, digest: str) -> Layer | None:
        d = layer_dir(self.root, digest)
        try:
            meta = LayerMeta(**json.loads((d / "meta.json").read_bytes()))
            json_bytes = (d / "toc.json").read_bytes()
        except (OSError, ValueError, TypeError):
            return None
        if meta.layer_digest != digest:
            return None
        try:
            toc = TOC.parse(json_bytes, meta.toc_digest, meta.toc_offset)
        except EStargzError as exc:
            raise ApiError(INTERNAL, f"persisted TOC of layer {digest} is invalid: {exc}") from None
        inodes = d / INODES_FILE
        layer = Layer.build(meta, toc, d / "toc.json", inodes if inodes.exists() else None)
        try:
            layer.counters.restore(json.loads((d / COUNTERS_FILE).read_bytes()))
        except (OSError, ValueError):
            pass  # never saved (or damaged): the counters start from zero
        self._saved[digest] = layer.counters.totals()
        return layer


def _parse_toc(member: bytes, toc_digest: str, toc_offset: int) -> tuple[bytes, TOC, bytes]:
    """(JSON bytes, verified TOC, dumped inode table) of a TOC member; runs in a thread."""
    json_bytes = decode_toc_member(member)
    toc = TOC.parse(json_bytes, toc_digest, toc_offset)
    return json_bytes, toc, InodeTable.from_toc(toc).dumps(toc_digest)


def atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so that readers see the old or the new file;
    ``sync`` makes it durable first."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
