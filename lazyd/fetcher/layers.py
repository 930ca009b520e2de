"""The fetcher's layer table: footer + TOC fetch and verification, and on-disk layer metadata.

A layer is opened once per digest (concurrent opens share the work) and its
verified TOC is persisted under ``<root>/layers/<algo>-<hex>/`` (``meta.json`` +
``toc.json``) so that workers can load it and a restarted fetcher can serve
adopted mounts without the registry; ``counters.json`` keeps the layer's fetch
counters across restarts (saved every few seconds and on stop).  Next to it goes ``inodes.msgpack``: the
worker's inode table, built once here while the TOC is parsed, so that a worker
mounts a layer without parsing its TOC again (it falls back to ``toc.json``).

Memory: the fetcher keeps no TOC.  The TOC is fetched, verified and parsed in a thread, and
of it only a ``ChunkIndex`` stays: members and chunks in flat columns (about 70 bytes per
chunk plus its file's name), persisted as ``chunks.index`` so that loading a layer again
parses nothing.  ``Member`` objects are views made on access.  ``LayerTable.collect`` forgets
layers no mount uses and deletes their directories once the store holds none of their chunks.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import shutil
import struct
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, overload

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
from lazyd.cache.store import ChunkKey
from lazyd.estargz import (
    TOC,
    Chunk,
    EStargzError,
    FooterError,
    Payload,
    TOCDigestMismatch,
    decode_toc_member,
    parse_payload,
    read_footer,
)
from lazyd.atomicfile import atomic_write
from lazyd.estargz.toc import MAX_TOC_MEMBER_SIZE
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

if TYPE_CHECKING:
    from lazyd.metrics import Metrics

INODES_FILE = "inodes.msgpack"
INDEX_FILE = "chunks.index"
TOC_FILE = "toc.json"
META_FILE = "meta.json"
COUNTERS_FILE = "counters.json"
PERSISTED_COUNTERS = ("demand_bytes", "prefetch_bytes", "background_bytes", "registry_requests", "verify_errors")
RECENT_IMAGES = 64
MAX_KNOWN_SIZES = 4096
MAX_UNUSED_LAYERS = 64
"""Layers no mount uses that ``LayerTable.collect`` leaves in memory (the most recently used)."""
COLLECT_IDLE = 600.0
"""Seconds a layer must be unused (not opened or loaded) before ``collect`` forgets it: a pull
opens its layers (``warm``) a little before it mounts them."""
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


class ChunkIndexError(Exception):
    """A persisted chunk index is unreadable or belongs to another TOC."""


_INDEX_MAGIC = b"lazyd-chunk-index\n"
_INDEX_VERSION = 1
_INDEX_HEAD = struct.Struct("<IIQQQqB")  # version, digest length, members, chunks, names, prefetch end, flags
_Q = "q"  # 64-bit columns
_I = "i"  # 32-bit columns (name numbers)


class ChunkIndex:
    """What the fetcher keeps of a layer's TOC, packed into flat columns (no object per entry).

    Members (gzip members with payload) in blob order: ``m_off`` and ``m_end`` (blob
    extent), ``m_first`` (their first chunk; one more than members, ending with the chunk
    count).  Chunks in blob order: ``c_inner``, ``c_size``, ``c_file_off``, ``c_name``
    (number of the file's name) and ``digests`` (32 raw sha256 bytes each).  File names,
    kept for error messages only, are ``names`` (UTF-8) cut at ``name_off``.  About 70 bytes
    per chunk plus the name: a ``Chunk`` object is made only while a member is decoded.
    """

    __slots__ = ("m_off", "m_end", "m_first", "c_inner", "c_size", "c_file_off", "c_name", "digests",
                 "name_off", "names", "prefetch_end", "no_prefetch")

    def __init__(self) -> None:
        self.m_off = array(_Q)
        self.m_end = array(_Q)
        self.m_first = array(_Q, [0])
        self.c_inner = array(_Q)
        self.c_size = array(_Q)
        self.c_file_off = array(_Q)
        self.c_name = array(_I)
        self.digests = bytearray()
        self.name_off = array(_Q, [0])
        self.names = bytearray()
        self.prefetch_end: int | None = None
        self.no_prefetch = False

    _COLUMNS = ("m_off", "m_end", "m_first", "c_inner", "c_size", "c_file_off", "c_name", "name_off")

    @classmethod
    def build(cls, members: Iterable[tuple[int, int, Iterable[Chunk]]], prefetch_end: int | None = None,
              no_prefetch: bool = False) -> ChunkIndex:
        """The index of ``(blob_offset, blob_end, chunks)`` members, given in blob order."""
        index = cls()
        names: dict[str, int] = {}
        # One pass over every chunk of a layer being opened: methods bound once.
        m_off, m_end, m_first = index.m_off.append, index.m_end.append, index.m_first.append
        c_inner, c_size, c_file_off, c_name = (index.c_inner.append, index.c_size.append, index.c_file_off.append,
                                               index.c_name.append)
        digests, c_count = index.digests, index.c_inner
        for blob_offset, blob_end, chunks in members:
            m_off(blob_offset)
            m_end(blob_end)
            for c in chunks:
                number = names.get(c.name)
                if number is None:
                    number = names[c.name] = len(names)
                    index.names += c.name.encode("utf-8", "surrogatepass")
                    index.name_off.append(len(index.names))
                c_inner(c.inner_offset)
                c_size(c.size)
                c_file_off(c.file_offset)
                c_name(number)
                digests += _raw_digest(c.digest)
            m_first(len(c_count))
        index.prefetch_end = prefetch_end
        index.no_prefetch = no_prefetch
        return index

    @classmethod
    def from_toc(cls, toc: TOC | Payload, toc_offset: int) -> ChunkIndex:
        """The index of a parsed TOC or its payload (``toc.chunks`` are in blob order, grouped by member)."""
        def members() -> Iterator[tuple[int, int, list[Chunk]]]:
            group: list[Chunk] = []
            for c in toc.chunks:  # in blob order: a member's chunks are consecutive
                if group and c.blob_offset != group[0].blob_offset:
                    end = group[0].blob_end
                    yield group[0].blob_offset, end if end is not None else toc_offset, group
                    group = []
                group.append(c)
            if group:
                end = group[0].blob_end
                yield group[0].blob_offset, end if end is not None else toc_offset, group
        return cls.build(members(), toc.prefetch_end, toc.no_prefetch)

    def __len__(self) -> int:
        """The number of members."""
        return len(self.m_off)

    @property
    def chunk_count(self) -> int:
        return len(self.c_inner)

    def nbytes(self) -> int:
        """Bytes held by the columns."""
        return sum(len(getattr(self, c)) * getattr(self, c).itemsize for c in self._COLUMNS) + len(
            self.digests) + len(self.names)

    def find(self, blob_offset: int) -> int:
        """The number of the member starting at ``blob_offset``, or -1."""
        i = bisect.bisect_left(self.m_off, blob_offset)
        return i if i < len(self.m_off) and self.m_off[i] == blob_offset else -1

    def chunk_span(self, i: int) -> range:
        """The chunk numbers of member ``i``."""
        return range(self.m_first[i], self.m_first[i + 1])

    def chunk(self, i: int, j: int) -> Chunk:
        """Chunk ``j`` (of member ``i``) as the decoder wants it."""
        n = self.c_name[j]
        name = self.names[self.name_off[n] : self.name_off[n + 1]].decode("utf-8", "surrogatepass")
        return Chunk(name, self.c_file_off[j], self.c_size[j], self.m_off[i], self.m_end[i],
                     "sha256:" + self.digests[32 * j : 32 * j + 32].hex(), self.c_inner[j])

    def dumps(self, toc_digest: str) -> bytes:
        """The index as bytes (``loads`` checks ``toc_digest``)."""
        digest = toc_digest.encode()
        flags = (1 if self.no_prefetch else 0) | (2 if sys.byteorder == "big" else 0)
        head = _INDEX_HEAD.pack(_INDEX_VERSION, len(digest), len(self.m_off), len(self.c_inner),
                                len(self.name_off) - 1, -1 if self.prefetch_end is None else self.prefetch_end, flags)
        parts = [_INDEX_MAGIC, head, digest, *(getattr(self, c).tobytes() for c in self._COLUMNS),
                 bytes(self.digests), bytes(self.names)]
        return b"".join(parts)

    @classmethod
    def loads(cls, data: bytes, toc_digest: str) -> ChunkIndex:
        """Read ``dumps`` output; ChunkIndexError when damaged, of another version or TOC."""
        view = memoryview(data)
        pos = len(_INDEX_MAGIC)
        if bytes(view[:pos]) != _INDEX_MAGIC or len(view) < pos + _INDEX_HEAD.size:
            raise ChunkIndexError("not a chunk index")
        version, dlen, members, chunks, names, prefetch_end, flags = _INDEX_HEAD.unpack_from(view, pos)
        pos += _INDEX_HEAD.size
        if version != _INDEX_VERSION or bool(flags & 2) != (sys.byteorder == "big"):
            raise ChunkIndexError(f"chunk index version {version} (flags {flags}) is not this lazyd's")
        if bytes(view[pos : pos + dlen]).decode(errors="replace") != toc_digest:
            raise ChunkIndexError(f"chunk index is not of TOC {toc_digest}")
        pos += dlen
        index = cls()
        sizes = {"m_off": members, "m_end": members, "m_first": members + 1, "c_inner": chunks, "c_size": chunks,
                 "c_file_off": chunks, "c_name": chunks, "name_off": names + 1}
        for column in cls._COLUMNS:
            arr = array(_I if column == "c_name" else _Q)
            end = pos + sizes[column] * arr.itemsize
            if end > len(view):
                raise ChunkIndexError("chunk index is truncated")
            arr.frombytes(view[pos:end])
            setattr(index, column, arr)
            pos = end
        index.digests = bytearray(view[pos : pos + 32 * chunks])
        pos += 32 * chunks
        index.names = bytearray(view[pos:])
        if (len(index.digests) != 32 * chunks or len(index.names) != index.name_off[-1]
                or index.m_first[-1] != chunks or (chunks and max(index.c_name) >= names)):
            raise ChunkIndexError("chunk index is inconsistent")
        index.prefetch_end = None if prefetch_end < 0 else prefetch_end
        index.no_prefetch = bool(flags & 1)
        return index


def _raw_digest(digest: str) -> bytes:
    """The 32 bytes of a ``sha256:<64 hex>`` digest (the TOC parser checked the form)."""
    raw = bytes.fromhex(digest[7:]) if digest.startswith("sha256:") else b""
    if len(raw) != 32:
        raise ChunkIndexError(f"chunk digest {digest!r} is not sha256:<64 hex>")
    return raw


class Member:
    """One gzip member of the blob with payload, and the chunks decoded from it.

    A view of one entry of a layer's ``ChunkIndex``: nothing but the index and a number is
    kept, and ``chunks`` are made when asked for.  ``Member(blob_offset, blob_end, chunks)``
    makes a standalone one (its own one-member index).
    """

    __slots__ = ("_index", "_pos")

    def __init__(self, blob_offset: int, blob_end: int, chunks: Iterable[Chunk] = ()) -> None:
        self._index = ChunkIndex.build([(blob_offset, blob_end, chunks)])
        self._pos = 0

    @classmethod
    def at(cls, index: ChunkIndex, pos: int) -> Member:
        """Member number ``pos`` of ``index``."""
        m = cls.__new__(cls)
        m._index = index
        m._pos = pos
        return m

    @property
    def blob_offset(self) -> int:
        return self._index.m_off[self._pos]

    @property
    def blob_end(self) -> int:
        return self._index.m_end[self._pos]

    @property
    def size(self) -> int:
        return self.blob_end - self.blob_offset

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        """The member's chunks (made anew on each call)."""
        index, pos = self._index, self._pos
        return tuple(index.chunk(pos, j) for j in index.chunk_span(pos))

    def chunk_keys(self, layer: str) -> list[ChunkKey]:
        """The store keys of the member's chunks (no ``Chunk`` is made)."""
        offset = self.blob_offset
        return [ChunkKey(layer, offset, inner) for inner in self.inner_offsets()]

    def inner_offsets(self) -> list[int]:
        """The inner offsets of the member's chunks (their store keys without the layer and blob offset)."""
        index = self._index
        return [index.c_inner[j] for j in index.chunk_span(self._pos)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Member):
            return NotImplemented
        return (self.blob_offset, self.blob_end) == (other.blob_offset, other.blob_end)

    def __hash__(self) -> int:
        return hash((self.blob_offset, self.blob_end))

    def __repr__(self) -> str:
        return f"Member(blob_offset={self.blob_offset}, blob_end={self.blob_end}, chunks={len(self._index.chunk_span(self._pos))})"


class Members(Sequence[Member]):
    """A layer's members in blob order, made on access from its ``ChunkIndex``."""

    __slots__ = ("_index",)

    def __init__(self, index: ChunkIndex) -> None:
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    @overload
    def __getitem__(self, i: int) -> Member: ...

    @overload
    def __getitem__(self, i: slice) -> list[Member]: ...

    def __getitem__(self, i: int | slice) -> Member | list[Member]:
        if isinstance(i, slice):
            return [Member.at(self._index, p) for p in range(*i.indices(len(self._index)))]
        n = len(self._index)
        if not -n <= i < n:
            raise IndexError(f"member {i} of {n}")
        return Member.at(self._index, i % n)

    def __iter__(self) -> Iterator[Member]:
        index = self._index
        return (Member.at(index, p) for p in range(len(index)))

    def before(self, end: int) -> list[Member]:
        """The members that start before blob offset ``end``."""
        return self[: bisect.bisect_left(self._index.m_off, end)]


class ChunkLookup(Mapping[tuple[int, int], Member]):
    """``(blob offset, inner offset)`` of a chunk -> its member, looked up in the ``ChunkIndex``."""

    __slots__ = ("_index",)

    def __init__(self, index: ChunkIndex) -> None:
        self._index = index

    def __getitem__(self, key: tuple[int, int]) -> Member:
        blob_offset, inner_offset = key
        index = self._index
        i = index.find(blob_offset)
        if i >= 0:
            span = index.chunk_span(i)
            j = bisect.bisect_left(index.c_inner, inner_offset, span.start, span.stop)
            if j < span.stop and index.c_inner[j] == inner_offset:
                return Member.at(index, i)
        raise KeyError(key)

    def __len__(self) -> int:
        return self._index.chunk_count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        index = self._index
        for i in range(len(index)):
            for j in index.chunk_span(i):
                yield index.m_off[i], index.c_inner[j]


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


@dataclass(frozen=True)
class TOCFile:
    """A layer's TOC, verified against its digest and saved as ``toc.json``: what a worker needs
    to build the layer's inode table (and keep it at ``inodes_path`` for the next mount)."""

    meta: LayerMeta
    toc_path: Path
    inodes_path: Path | None


@dataclass
class Layer:
    """An opened, verified eStargz layer: what the fetcher needs of its TOC, packed."""

    meta: LayerMeta
    index: ChunkIndex
    toc_path: Path
    counters: LayerCounters = field(default_factory=LayerCounters)
    inodes_path: Path | None = None
    used: float = field(default_factory=time.monotonic)  # last open or load (``LayerTable.collect``)

    @property
    def digest(self) -> str:
        return self.meta.layer_digest

    @property
    def ref(self) -> Reference:
        return Reference.parse(self.meta.ref)

    @property
    def toc_file(self) -> TOCFile:
        return TOCFile(self.meta, self.toc_path, self.inodes_path)

    @property
    def members(self) -> Members:
        """The gzip members with payload, in blob order."""
        return Members(self.index)

    @property
    def content_size(self) -> int:
        """Bytes of all its chunks once decompressed: what the chunk store holds of it, fully fetched."""
        return sum(self.index.c_size)

    @property
    def by_chunk(self) -> ChunkLookup:
        """``(blob offset, inner offset)`` -> member."""
        return ChunkLookup(self.index)

    @property
    def prefetch_end(self) -> int | None:
        """Blob offset of the ``.prefetch.landmark`` (members before it are prefetched), if any."""
        return self.index.prefetch_end

    def member_of(self, blob_offset: int, inner_offset: int) -> Member | None:
        """The member holding the chunk at ``(blob_offset, inner_offset)``, or None."""
        return self.by_chunk.get((blob_offset, inner_offset))

    def read_toc(self) -> TOC:
        """The full TOC, parsed again from ``toc.json`` (for tools and tests: the fetcher
        itself keeps only the ``ChunkIndex``)."""
        return TOC.parse(self.toc_path.read_bytes(), self.meta.toc_digest, self.meta.toc_offset)

    @property
    def toc(self) -> TOC:
        """``read_toc()``: parsed on every access, not kept."""
        return self.read_toc()

    @classmethod
    def build(cls, meta: LayerMeta, toc: TOC, toc_path: Path, inodes_path: Path | None = None) -> Layer:
        return cls(meta, ChunkIndex.from_toc(toc, meta.toc_offset), toc_path, inodes_path=inodes_path)


def layer_dir(root: Path, digest: str) -> Path:
    return root / "layers" / digest.replace(":", "-")


class LayerTable:
    """Opened layers by digest; opens from the registry or from ``<root>/layers``."""

    def __init__(self, root: Path, client: RegistryClient, metrics: Metrics | None = None) -> None:
        self.root = root
        self.client = client
        self.metrics = metrics  # footer, TOC and parse durations (lazyd.metrics)
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
        self._loading: dict[str, asyncio.Future[Layer | None]] = {}  # loads from disk in a thread (``load``)
        self._tocs: dict[str, asyncio.Future[TOCFile]] = {}  # of the opens under way: set once the TOC is saved

    def remember(self, image: Image) -> None:
        """Keep ``image`` (its ref is pinned to the manifest digest) for TOC-digest lookups."""
        if image.ref.digest:
            key = (image.ref.registry, image.ref.repository, image.ref.digest)
            self._images[key] = image
            self._images.move_to_end(key)
            while len(self._images) > RECENT_IMAGES:
                self._images.popitem(last=False)

    def image_of(self, ref: Reference, layer_digest: str) -> Image | None:
        """The remembered image (``remember``) that ``ref`` names and that has layer ``layer_digest``:
        the one ``ref``'s digest pins, else the most recently resolved one of its repository."""
        if ref.digest:
            image = self._images.get((ref.registry, ref.repository, ref.digest))
            if image is not None and any(d.digest == layer_digest for d in image.layers):
                return image
        for (registry, repository, _), image in reversed(self._images.items()):
            if (registry, repository) == (ref.registry, ref.repository) and (
                    not ref.digest or ref.digest in (image.manifest_digest, image.index_digest)):
                if any(d.digest == layer_digest for d in image.layers):
                    return image
        return None

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
        """An open layer, loading persisted metadata if needed; None if unknown.

        Loading reads ``<root>/layers`` on the calling thread (a TOC parse when the chunk
        index is missing): coroutines use ``await load(digest)``."""
        layer = self._layers.get(digest)
        if layer is None:
            layer = self._load(digest)
            if layer is not None:
                layer = self._add(layer)
        return layer

    async def load(self, digest: str) -> Layer | None:
        """``get`` with the loading from disk done in a thread."""
        layer = self._layers.get(digest)
        if layer is None:
            pending = self._loading.get(digest)
            if pending is None and not (layer_dir(self.root, digest) / META_FILE).exists():
                # Never persisted (the first mount of a layer): one stat, not a hop to a busy
                # default thread pool (measured up to 20 ms on a pull's critical path).
                return None
            if pending is None:
                pending = asyncio.ensure_future(asyncio.to_thread(self._load, digest))
                self._loading[digest] = pending
                pending.add_done_callback(lambda _f: self._loading.pop(digest, None))
            loaded = await asyncio.shield(pending)
            layer = self._layers.get(digest) or (self._add(loaded) if loaded is not None else None)
        return layer

    def _add(self, layer: Layer) -> Layer:
        self._layers[layer.digest] = layer
        self._saved[layer.digest] = layer.counters.totals()
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
        layer = await self._opened(digest, toc_digest)
        if layer is not None:
            return layer
        pending, _ = self._start_open(ref, digest, toc_digest, timeout, parse_after)
        return await asyncio.shield(pending)

    async def open_toc(self, ref: Reference, digest: str, toc_digest: str | None,
                       timeout: float) -> tuple[TOCFile, asyncio.Future[Layer]]:
        """Open the layer as ``open`` does, but return as soon as its TOC is verified and saved:
        (the saved TOC, the open itself, to be awaited shielded).

        A worker can then build the layer's inode table from ``toc.json`` in its own process
        while the fetcher parses the same TOC into its chunk index; the open says whether the
        fetcher accepted it.  Raises what ``open`` raises when the open fails before the TOC
        is saved.
        """
        layer = await self._opened(digest, toc_digest)
        if layer is None:
            pending, saved = self._start_open(ref, digest, toc_digest, timeout)
            if not saved.done():
                await asyncio.wait([saved, pending], return_when=asyncio.FIRST_COMPLETED)
            if saved.done() and not saved.cancelled():
                return saved.result(), pending
            layer = await asyncio.shield(pending)
        opened: asyncio.Future[Layer] = asyncio.get_running_loop().create_future()
        opened.set_result(layer)
        return layer.toc_file, opened

    async def _opened(self, digest: str, toc_digest: str | None) -> Layer | None:
        """The layer if it is open or persisted (its TOC digest checked), else None."""
        layer = await self.load(digest)
        if layer is not None:
            layer.used = time.monotonic()
            if toc_digest is not None and toc_digest != layer.meta.toc_digest:
                raise ApiError(DIGEST_MISMATCH, f"layer {digest} has TOC digest {layer.meta.toc_digest}, "
                                                f"not {toc_digest}")
        return layer

    def _start_open(self, ref: Reference, digest: str, toc_digest: str | None, timeout: float,
                    parse_after: asyncio.Future[Layer] | None = None
                    ) -> tuple[asyncio.Future[Layer], asyncio.Future[TOCFile]]:
        """The open of ``digest`` under way, started if there is none: (the open, its saved TOC)."""
        pending = self._opening.get(digest)
        if pending is None:
            saved: asyncio.Future[TOCFile] = asyncio.get_running_loop().create_future()
            pending = asyncio.ensure_future(self._open(ref, digest, toc_digest, timeout, parse_after, saved))
            self._opening[digest] = pending
            self._tocs[digest] = saved

            def done(f: asyncio.Future[Layer]) -> None:
                self._opening.pop(digest, None)
                if not self._tocs.pop(digest, saved).done():
                    saved.cancel()  # the open failed before its TOC was saved
                if not f.cancelled():
                    f.exception()  # retrieved: whoever awaits it reports it (a mount may have given up first)
            pending.add_done_callback(done)
        return pending, self._tocs[digest]

    async def _open(self, ref: Reference, digest: str, toc_digest: str | None, timeout: float,
                    parse_after: asyncio.Future[Layer] | None, saved: asyncio.Future[TOCFile]) -> Layer:
        try:
            return await asyncio.wait_for(self._fetch_toc(ref, digest, toc_digest, saved, parse_after), timeout)
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

    async def _fetch_toc(self, ref: Reference, digest: str, toc_digest: str | None, saved: asyncio.Future[TOCFile],
                         parse_after: asyncio.Future[Layer] | None = None) -> Layer:
        if toc_digest is None:
            toc_digest = await self._toc_digest_from_manifest(ref, digest)
        blob_size = self._known_size(ref, digest) or await self.client.blob_size(ref, digest)
        counters = LayerCounters()
        tail_len = tail_size(blob_size)
        if tail_len == 0:
            raise ApiError(NOT_ESTARGZ, f"layer {digest} is empty")
        asked = time.monotonic()
        (tail,) = await self.client.fetch_ranges(ref, digest, [(blob_size - tail_len, tail_len)])
        counters.registry_requests += 1
        if self.metrics is not None:
            self.metrics.observe_ms("stargz_footer_get", digest, time.monotonic() - asked)
        try:
            footer = read_footer(tail, blob_size)
        except FooterError as exc:
            raise ApiError(NOT_ESTARGZ, f"layer {digest} of {ref}: {exc}") from None
        toc_end = blob_size - footer.size
        if toc_end - footer.toc_offset > MAX_TOC_MEMBER_SIZE:
            raise ApiError(NOT_ESTARGZ, f"layer {digest} of {ref}: TOC member of {toc_end - footer.toc_offset} "
                                        f"bytes (at {footer.toc_offset}) is larger than {MAX_TOC_MEMBER_SIZE}")
        tail_start = blob_size - tail_len
        if footer.toc_offset >= tail_start:
            member = tail[footer.toc_offset - tail_start : toc_end - tail_start]
        else:  # the tail holds the TOC's end: fetch only its beginning
            (head,) = await self.client.fetch_ranges(ref, digest, [(footer.toc_offset, tail_start - footer.toc_offset)])
            counters.registry_requests += 1
            member = head + tail[: toc_end - tail_start]
            del head
        del tail
        if self.metrics is not None:
            self.metrics.observe_ms("stargz_toc_get", digest, time.monotonic() - asked)
        if parse_after is not None:
            await asyncio.wait([parse_after])  # its outcome is its own mount's business
        started = time.monotonic()
        meta = LayerMeta(str(ref), digest, toc_digest, blob_size, footer.toc_offset)
        d = layer_dir(self.root, digest)
        try:
            async with self._parse_lock:
                parsing = time.monotonic()  # not counting the wait for the lock
                json_bytes = await asyncio.to_thread(_save_toc, member, meta, d)
                del member
                if not saved.done():
                    saved.set_result(TOCFile(meta, d / TOC_FILE, d / INODES_FILE))
                index, entries = await asyncio.to_thread(_parse_toc, json_bytes, meta, d)
                del json_bytes
                parsed = time.monotonic() - parsing
        except TOCDigestMismatch as exc:
            raise ApiError(DIGEST_MISMATCH, f"layer {digest} of {ref}: {exc}") from None
        except (EStargzError, ChunkIndexError) as exc:
            raise ApiError(NOT_ESTARGZ, f"layer {digest} of {ref}: {exc}") from None
        if self.metrics is not None:
            self.metrics.observe_ms("stargz_toc_json_deserialize", digest, parsed)
        log.debug("layer %s: TOC of %d entries verified, saved and parsed in %.3fs (%d chunks, "
                  "%d bytes kept)", digest, entries, time.monotonic() - started, index.chunk_count, index.nbytes())
        layer = Layer(meta, index, d / TOC_FILE, counters, d / INODES_FILE)
        self._layers[digest] = layer
        return layer

    def _load(self, digest: str) -> Layer | None:
        """The layer persisted under ``<root>/layers`` (its chunk index, else its TOC parsed
        again), or None; blocking: run it in a thread (``load``) where it can take long."""
        d = layer_dir(self.root, digest)
        try:
            meta = LayerMeta(**json.loads((d / META_FILE).read_bytes()))
        except (OSError, ValueError, TypeError):
            return None
        if meta.layer_digest != digest:
            return None
        try:
            index = ChunkIndex.loads((d / INDEX_FILE).read_bytes(), meta.toc_digest)
        except (OSError, ChunkIndexError) as exc:
            log.debug("layer %s: no usable chunk index (%s); parsing its TOC", digest, exc)
            try:
                payload = parse_payload((d / TOC_FILE).read_bytes(), meta.toc_offset, meta.toc_digest)
                index = ChunkIndex.from_toc(payload, meta.toc_offset)
            except OSError:
                return None
            except (EStargzError, ChunkIndexError) as exc:
                raise ApiError(INTERNAL, f"persisted TOC of layer {digest} is invalid: {exc}") from None
            try:
                atomic_write(d / INDEX_FILE, index.dumps(meta.toc_digest), sync=False)
            except OSError as exc:
                log.warning("cannot save the chunk index of layer %s: %s", digest, exc)
        layer = Layer(meta, index, d / TOC_FILE, inodes_path=d / INODES_FILE)
        try:
            layer.counters.restore(json.loads((d / COUNTERS_FILE).read_bytes()))
        except (OSError, ValueError):
            pass  # never saved (or damaged): the counters start from zero
        return layer

    async def collect(self, in_use: Collection[str], cached: Callable[[str], bool],
                      idle: float = COLLECT_IDLE) -> list[str]:
        """Forget layers that no mount uses (``in_use``: layer digests of the mounts).

        A layer not in use and not opened or loaded for ``idle`` seconds leaves the table
        (its counters saved first); its directory under ``<root>/layers`` is deleted too
        when ``cached(digest)`` says the chunk store holds none of its chunks (``cached`` runs
        in a thread).  Layers being opened are kept.  Besides, at most
        ``MAX_UNUSED_LAYERS`` unused layers stay in the table (the least recently used go).
        Returns the digests whose directories were deleted.
        """
        now = time.monotonic()
        keep = set(in_use) | set(self._opening) | set(self._loading)
        unused = sorted((layer for layer in self._layers.values() if layer.digest not in keep),
                        key=lambda layer: layer.used)
        drop = [layer for layer in unused if now - layer.used >= idle]
        extra = len(unused) - len(drop) - MAX_UNUSED_LAYERS
        if extra > 0:
            drop += [layer for layer in unused if now - layer.used < idle][:extra]
        self.save_counters()
        for layer in drop:
            self._layers.pop(layer.digest, None)
            self._saved.pop(layer.digest, None)
        on_disk = await asyncio.to_thread(self._persisted_digests)
        candidates = [digest for digest in on_disk if digest not in keep and digest not in self._layers]
        deleted = await asyncio.to_thread(self._delete_unused, candidates, cached, idle)
        if drop or deleted:
            log.info("layer table: %d layer(s) forgotten, %d layer director(ies) deleted, %d layer(s) kept",
                     len(drop), len(deleted), len(self._layers))
        return deleted

    def _persisted_digests(self) -> list[str]:
        try:
            names = os.listdir(self.root / "layers")
        except FileNotFoundError:
            return []
        return [name.replace("-", ":", 1) for name in names if "-" in name]

    def _delete_unused(self, digests: list[str], cached: Callable[[str], bool], idle: float) -> list[str]:
        """Delete the directories of ``digests`` whose chunks are all gone from the store and
        whose metadata was not written for ``idle`` seconds; runs in a thread."""
        deleted = []
        now = time.time()
        for digest in digests:
            d = layer_dir(self.root, digest)
            try:
                written = (d / META_FILE).stat().st_mtime  # written last by an open
            except OSError:
                written = 0.0  # no metadata: a leftover of an open that failed
            busy = digest in self._opening or digest in self._loading or digest in self._layers
            if now - written < idle or busy or cached(digest):
                continue
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                deleted.append(digest)
        return deleted


def _save_toc(member: bytes, meta: LayerMeta, d: Path) -> bytes:
    """Inflate a TOC member, verify it against ``meta.toc_digest`` and save it as ``toc.json``
    in ``d``; returns the JSON.  Runs in a thread.  (A ``toc.json`` that the parse then rejects
    has no ``meta.json`` beside it: it is never loaded, and ``collect`` deletes it.)"""
    json_bytes = decode_toc_member(member, meta.toc_digest)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(d / TOC_FILE, json_bytes)
    return json_bytes


def _parse_toc(json_bytes: bytes, meta: LayerMeta, d: Path) -> tuple[ChunkIndex, int]:
    """Parse a verified TOC into the chunk index and persist it (chunk index, then meta);
    returns (chunk index, number of entries).  Runs in a thread, so the TOC's JSON and objects
    never reach the event loop.  The inode table is the worker's: it builds it from ``toc.json``
    at the first mount, in its own process while this runs, and keeps it at ``inodes_path``."""
    payload = parse_payload(json_bytes, meta.toc_offset)  # the entry tree is the worker's
    index = ChunkIndex.from_toc(payload, meta.toc_offset)
    entries = payload.entries
    del payload
    # A derived cache: the fetcher checks the chunk index and falls back to toc.json, so no fsync.
    atomic_write(d / INDEX_FILE, index.dumps(meta.toc_digest), sync=False)
    atomic_write(d / META_FILE, json.dumps(asdict(meta)).encode())
    return index, entries


PROFILE_GAP = 32 * 1024
"""Compressed bytes of unprofiled members between two profiled ones that a profile prefetch
fetches along, to make one range of the two (a range costs a round trip in the request and,
from a registry without multi-range GETs, a request of its own)."""


@dataclass(frozen=True)
class ProfilePlan:
    """What a profile asks of one layer: the members holding its files' chunks (plus the small
    gaps between them), in blob order."""

    members: list[Member]
    files: int  # profiled regular files found in the layer
    skipped: int  # profiled paths that are not regular files of this layer (or are empty)
    gap_bytes: int  # compressed bytes of unprofiled members fetched along to close gaps

    @property
    def size(self) -> int:
        """Compressed bytes of the plan's members."""
        return sum(m.size for m in self.members)


def profile_plan(layer: Layer, paths: Sequence[str], gap: int = PROFILE_GAP) -> ProfilePlan:
    """Map profiled ``paths`` (cleaned, of this layer) to the members holding their chunks.

    Names are looked up in the chunk index first; the paths not found there (hardlinks, and
    whatever is no regular file) are looked up in the TOC, parsed again from ``toc.json`` only
    then: a hardlink maps to its target's chunks, anything else that is not a regular file is
    skipped.  Members less than ``gap`` bytes apart are joined by fetching what lies between.
    Blocking (reads the TOC): run it in a thread.
    """
    index = layer.index
    wanted = set(paths)
    numbers: set[int] = set()
    found: set[str] = set()
    names, offs = index.names, index.name_off
    for n in range(len(offs) - 1):
        name = names[offs[n] : offs[n + 1]].decode("utf-8", "surrogatepass")
        if name in wanted:
            numbers.add(n)
            found.add(name)
    positions: set[int] = set()
    if numbers:
        m_first = index.m_first
        for j, n in enumerate(index.c_name):
            if n in numbers:
                positions.add(bisect.bisect_right(m_first, j) - 1)
    files, skipped = len(found), 0
    rest = [p for p in dict.fromkeys(paths) if p not in found]
    if rest:
        try:
            toc = layer.read_toc()
        except (OSError, EStargzError) as exc:
            log.warning("layer %s: cannot read its TOC to place %d profiled path(s): %s", layer.digest, len(rest), exc)
            toc = None
        for path in rest:
            entry = toc.lookup(path) if toc is not None else None
            if entry is None or entry.type != "reg" or not entry.chunks:
                skipped += 1
                continue
            files += 1
            for c in entry.chunks:
                i = index.find(c.blob_offset)
                if i >= 0:
                    positions.add(i)
        del toc
    ordered = sorted(positions)
    gap_bytes = 0
    filled: list[int] = []
    for i in ordered:
        if filled and i > filled[-1] + 1 and index.m_off[i] - index.m_end[filled[-1]] <= gap:
            between = range(filled[-1] + 1, i)
            gap_bytes += sum(index.m_end[k] - index.m_off[k] for k in between)
            filled.extend(between)
        filled.append(i)
    return ProfilePlan([Member.at(index, i) for i in filled], files, skipped, gap_bytes)
