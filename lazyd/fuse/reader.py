"""File reads of a worker: (layer, inode, offset, size) -> bytes via the chunk store.

A read maps to chunks through the layer's inode table.  Each chunk comes from a
small in-process LRU of decompressed chunks, else from the shared ``ChunkStore``,
else the fetcher is asked (``fetch`` op) to fetch, verify and store it.  Misses
are single-flight: concurrent reads of one missing chunk make one request.
Blocking waits run inside ``unlocked()`` (``llfuse.lock_released`` in the
filesystem) so other FUSE requests proceed meanwhile.  Store hits are read-only
(``ChunkStore.peek_entry``: no write transaction per hit); their use is reported to the
store's LRU in batches (``ChunkStore.touch``), except for chunks stored or touched less than
``touch_after`` seconds before.  A read pins its missing chunks in the
store before it asks for them and unpins them once it has loaded them, so the store's
eviction cannot take a chunk between the fetcher storing it and the read copying it,
whatever the cache cap.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.fuse.fetchconn import FetchError, FetcherConnection
from lazyd.estargz.inodes import ChunkRef, InodeTable

log = logging.getLogger(__name__)


class ChunkUnavailable(Exception):
    """A chunk could not be fetched, verified or read from the store."""


@dataclass
class MountCounters:
    """Per-mount read statistics reported by ``worker.status``."""

    reads: int = 0
    bytes_read: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    fetch_errors: int = 0
    last_error: str | None = None
    opens: int = 0  # OPEN requests that reached the worker (at most one with no_open)
    pushed_files: int = 0  # files written into the page cache before their READ (lazyd.fuse.fs3)
    pushed_bytes: int = 0


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None
    data: bytes | None = None


# Chunks at least this big are read from the store with the llfuse lock released.
_UNLOCK_SIZE = 256 * 1024
# Only chunks bigger than one FUSE request (128 KiB) go to the LRU: a smaller one is
# read whole by a single request and then lives in the kernel page cache.
_LRU_MIN_SIZE = 128 * 1024
# How far past a chunk loaded for a read the reader loads ahead from the store, and with how many threads.
_READAHEAD_BYTES = 8 << 20
_READAHEAD_THREADS = 2
# Chunks read from the store are reported to its LRU in batches: once this many are queued,
# or at the first read this long after the previous batch (and on close).
_TOUCH_BATCH = 256
_TOUCH_SECONDS = 1.0
# A chunk whose recorded last use (stored or touched) is younger than this is not touched again:
# its place in the eviction order moves by less than this, and a walk of a layer just fetched
# then writes nothing (100,000 single-row updates were 40% of a walk's CPU in the worker).
TOUCH_AFTER = 60.0
# A read's pin on the chunks it has fetched outlives the fetch timeout by this much (a pin
# left by a worker that died expires after ``fetch timeout + _PIN_SLACK`` seconds).
_PIN_SLACK = 60.0
# Chunks loaded ahead and not read yet that the reader remembers (for its readahead trigger).
_PREFETCHED_MAX = 4096


class ChunkLRU:
    """Recently used decompressed chunks, bounded by total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[ChunkKey, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: ChunkKey) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: ChunkKey, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def drop_layer(self, layer: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k.layer == layer]:
                self._bytes -= len(self._items.pop(key))


class ChunkReader:
    """Reads file bytes of mounted layers from the chunk store, fetching misses.

    Sequential reads are pipelined: loading a chunk of a file from the store also
    loads the file's next ``_READAHEAD_BYTES`` of chunks into the LRU in the
    background (from the store only; network prefetch is the fetcher's job).
    """

    def __init__(self, store: ChunkStore, fetcher: FetcherConnection, lru_bytes: int = 64 << 20,
                 unlocked: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
                 readahead: bool = True, touch_after: float = TOUCH_AFTER) -> None:
        self.store = store
        self.touch_after = touch_after
        self.fetcher = fetcher
        self.lru = ChunkLRU(lru_bytes)
        self._unlocked = unlocked
        self._flights: dict[ChunkKey, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._loads: dict[ChunkKey, _Flight] = {}
        self._loads_lock = threading.Lock()
        self._readahead: ThreadPoolExecutor | None = None
        if readahead:
            self._readahead = ThreadPoolExecutor(max_workers=_READAHEAD_THREADS, thread_name_prefix="chunk-readahead")
        # Chunks loaded ahead by ``_load_ahead`` and not read yet, oldest first (an ordered set).
        self._prefetched: OrderedDict[ChunkKey, None] = OrderedDict()
        self._prefetched_lock = threading.Lock()
        self._used: list[tuple[ChunkKey, float]] = []
        self._used_lock = threading.Lock()
        self._used_since = time.monotonic()
        self._unpins: list[str] = []  # pins of reads that have loaded their chunks, to drop
        self._unpins_lock = threading.Lock()

    def close(self) -> None:
        if self._readahead is not None:
            self._readahead.shutdown(wait=True, cancel_futures=True)
        self._drop_pins()
        self._touch(self._take_used())

    def read(self, layer: str, table: InodeTable, ino: int, offset: int, size: int,
             counters: MountCounters) -> bytes | memoryview:
        """``size`` bytes of file ``ino`` from ``offset`` (fewer at end of file)."""
        file_size = table.raw_attr(ino)[4]
        size = min(size, file_size - offset)
        if size <= 0:
            return b""
        refs = table.chunks(ino, offset, size)
        datas = self._chunks(layer, table, ino, refs, counters)
        return self._assemble(layer, ino, refs, datas, offset, size)

    def read_cached(self, layer: str, table: InodeTable, ino: int, offset: int, size: int,
                    counters: MountCounters) -> bytes | memoryview | None:
        """Like ``read`` when it need not wait: every chunk in the LRU, or in the store and smaller than
        ``_UNLOCK_SIZE`` (a quick read of the store's index); else None, with nothing counted, for
        ``read`` in a thread that may wait (the pyfuse3 binding answers hits in its event loop)."""
        file_size = table.raw_attr(ino)[4]
        size = min(size, file_size - offset)
        if size <= 0:
            return b""
        refs = table.chunks(ino, offset, size)
        datas: list[bytes] = []
        loaded = False
        for ref in refs:
            key = ChunkKey(layer, ref.blob_offset, ref.inner_offset)
            data = self.lru.get(key)
            if data is not None:
                loaded |= self._take_prefetched(key)
            elif ref.size < _UNLOCK_SIZE and not self._loading(key):
                data = self._from_store(key, ref)
                loaded = True
            if data is None:
                return None
            datas.append(data)
        counters.cache_hits += len(refs)
        if loaded:
            self._read_ahead(layer, table, ino, refs[-1])
        return self._assemble(layer, ino, refs, datas, offset, size)

    def _assemble(self, layer: str, ino: int, refs: list[ChunkRef], datas: list[bytes], offset: int,
                  size: int) -> bytes | memoryview:
        """``size`` bytes from ``offset`` out of the chunks ``refs`` (their bytes ``datas``)."""
        end = offset + size
        parts = []
        for ref, data in zip(refs, datas):
            lo = max(offset, ref.file_offset) - ref.file_offset
            hi = min(end, ref.file_offset + ref.size) - ref.file_offset
            parts.append(memoryview(data)[lo:hi])
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(out) != size:
            raise ChunkUnavailable(f"file inode {ino} of {layer}: chunks cover {len(out)} of {size} bytes at {offset}")
        return out

    def _chunks(self, layer: str, table: InodeTable, ino: int, refs: list[ChunkRef],
                counters: MountCounters) -> list[bytes]:
        keys = [ChunkKey(layer, r.blob_offset, r.inner_offset) for r in refs]
        found: dict[ChunkKey, bytes] = {}
        missing: list[tuple[ChunkKey, ChunkRef]] = []
        loaded = False
        for key, ref in zip(keys, refs):
            data = self.lru.get(key)
            if data is not None:
                if self._take_prefetched(key):
                    loaded = True
            else:
                data = self._load(key, ref)
                loaded = data is not None
            if data is None:
                missing.append((key, ref))
                counters.cache_misses += 1
            else:
                found[key] = data
                counters.cache_hits += 1
        if missing:
            self._fetch_pinned(layer, missing, found)
        if loaded:
            self._read_ahead(layer, table, ino, refs[-1])
        return [found[k] for k in keys]

    def _read_ahead(self, layer: str, table: InodeTable, ino: int, last: ChunkRef) -> None:
        """Load the file's next ``_READAHEAD_BYTES`` of chunks after ``last`` from the store, in the background."""
        if self._readahead is None:
            return
        for ref in table.chunks(ino, last.file_offset + last.size, _READAHEAD_BYTES):
            key = ChunkKey(layer, ref.blob_offset, ref.inner_offset)
            if self.lru.get(key) is None and not self._loading(key):
                self._readahead.submit(self._load_ahead, key, ref)

    def _fetch_pinned(self, layer: str, wanted: list[tuple[ChunkKey, ChunkRef]],
                      found: dict[ChunkKey, bytes]) -> None:
        """Pin the chunks of ``wanted``, have the fetcher store them, load them into ``found``, unpin.

        The pin is in the store before the fetch request is sent, so every store of these
        chunks from then on keeps them until they are loaded.  Only a fetch already in
        flight, which this request joined and which stored a chunk before the pin existed,
        can have lost one to eviction (at a cap that holds little more than the chunks being
        read): such a chunk is fetched once more, and that fetch stores it after the pin.
        """
        refs = dict(wanted)
        keys = list(refs)
        t0 = t1 = time.monotonic()
        pin: str | None = None
        try:
            todo = keys
            for attempt in (1, 2):
                with self._unlocked():
                    if pin is None:
                        t1 = time.monotonic()
                        pin = self._pin(layer, keys)
                    self._fetch(layer, todo)
                t2 = time.monotonic()
                gone = []
                for key in todo:
                    data = self._load(key, refs[key])
                    if data is None:
                        gone.append(key)
                    else:
                        found[key] = data
                if not gone:
                    break
                if attempt == 2:
                    raise ChunkUnavailable(f"chunk at blob offset {gone[0].blob_offset} of {layer} is not in the "
                                           "chunk store although it was pinned before the fetcher stored it "
                                           "(removed by something other than eviction?)")
                log.debug("%d chunk(s) of %s were stored by a fetch that began before this read pinned them, "
                          "and evicted: fetching them again", len(gone), layer)
                todo = gone
        finally:
            if pin is not None:
                self._unpin(pin)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("read miss of %d chunk(s) of %s: unlock %.2f ms, pin and fetch %.2f ms, load %.2f ms",
                      len(keys), layer, 1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (time.monotonic() - t2))

    def _load_ahead(self, key: ChunkKey, ref: ChunkRef) -> None:
        try:
            if self._load(key, ref, background=True) is not None:
                with self._prefetched_lock:
                    self._prefetched[key] = None
                    self._prefetched.move_to_end(key)
                    while len(self._prefetched) > _PREFETCHED_MAX:
                        self._prefetched.popitem(last=False)  # left the LRU before anyone read it
        except Exception:  # noqa: BLE001 - readahead is best effort; the real read reports errors
            pass

    def _take_prefetched(self, key: ChunkKey) -> bool:
        """Whether ``key`` was loaded ahead and not read since (it is then no longer)."""
        with self._prefetched_lock:
            if key not in self._prefetched:
                return False
            del self._prefetched[key]
            return True

    def _loading(self, key: ChunkKey) -> bool:
        with self._loads_lock:
            return key in self._loads

    def _pin(self, layer: str, keys: list[ChunkKey]) -> str:
        """Pin ``keys`` in the store for this read (until ``_unpin``, or the pin expires)."""
        try:
            return self.store.pin(keys, self.fetcher.timeout + _PIN_SLACK)
        except Exception as exc:
            raise ChunkUnavailable(f"pinning {len(keys)} chunk(s) of {layer} in the chunk store failed: {exc}") from exc

    def _unpin(self, pin: str) -> None:
        """Drop a read's pin, off the read's path when the readahead pool runs (``close`` drops
        what is left)."""
        with self._unpins_lock:
            self._unpins.append(pin)
        if self._readahead is not None:
            try:
                self._readahead.submit(self._drop_pins)
                return
            except RuntimeError:  # shutting down
                pass
        self._drop_pins()

    def _drop_pins(self) -> None:
        with self._unpins_lock:
            pins, self._unpins = self._unpins, []
        try:
            self.store.unpin(*pins)
        except Exception as exc:  # noqa: BLE001 - pins expire by themselves; the reads have their bytes
            log.warning("dropping %d pin(s) of the chunk store failed (they expire by themselves): %s", len(pins), exc)

    def _load(self, key: ChunkKey, ref: ChunkRef, background: bool = False) -> bytes | None:
        """The chunk from the store into the LRU (single-flight), or None when it is not stored."""
        if not background and ref.size < _UNLOCK_SIZE:
            # Read without yielding the llfuse lock, so no other read can be waiting on it.
            return self._from_store(key, ref)
        with self._loads_lock:
            flight = self._loads.get(key)
            mine = flight is None
            if mine:
                flight = self._loads[key] = _Flight()
        if mine:
            data: bytes | None = None
            try:
                if background or ref.size < _UNLOCK_SIZE:
                    data = self._from_store(key, ref)
                else:
                    with self._unlocked():
                        data = self._from_store(key, ref)
            except Exception as exc:
                flight.error = exc
                raise
            finally:
                with self._loads_lock:
                    self._loads.pop(key, None)
                    flight.data = data
                flight.done.set()
            return data
        if not background:
            with self._unlocked():
                flight.done.wait(60)
        if flight.error is not None:
            raise ChunkUnavailable(f"loading chunk at {key.blob_offset} of {key.layer}: {flight.error}")
        return flight.data

    def _from_store(self, key: ChunkKey, ref: ChunkRef) -> bytes | None:
        entry = self.store.peek_entry(key)
        if entry is None:
            return None
        data, accessed = entry
        if time.time() - accessed >= self.touch_after:
            self._note_used(key)
        if len(data) != ref.size:
            raise ChunkUnavailable(f"stored chunk at blob offset {key.blob_offset} of {key.layer} has "
                                   f"{len(data)} bytes, the TOC says {ref.size}")
        if len(data) > _LRU_MIN_SIZE:
            self.lru.put(key, data)
        return data

    def _note_used(self, key: ChunkKey) -> None:
        """Queue ``key`` (used now) for the store's LRU; a full or old batch is written in the background."""
        with self._used_lock:
            self._used.append((key, time.time()))
            due = len(self._used) >= _TOUCH_BATCH or time.monotonic() - self._used_since >= _TOUCH_SECONDS
        if not due:
            return
        batch = self._take_used()
        if self._readahead is None:
            self._touch(batch)
            return
        try:
            self._readahead.submit(self._touch, batch)
        except RuntimeError:  # shutting down
            self._touch(batch)

    def _take_used(self) -> list[tuple[ChunkKey, float]]:
        with self._used_lock:
            batch, self._used = self._used, []
            self._used_since = time.monotonic()
        return batch

    def _touch(self, used: list[tuple[ChunkKey, float]]) -> None:
        if not used:
            return
        try:
            self.store.touch([key for key, _ in used], [when for _, when in used])
        except Exception as exc:  # noqa: BLE001 - recency is advisory; reads must not fail over it
            log.debug("updating LRU recency of %d chunks failed: %s", len(used), exc)

    def _fetch(self, layer: str, keys: list[ChunkKey]) -> None:
        """Have the fetcher store ``keys``; one request per chunk across concurrent callers."""
        mine: list[tuple[ChunkKey, _Flight]] = []
        theirs: list[_Flight] = []
        with self._flights_lock:
            for key in dict.fromkeys(keys):
                flight = self._flights.get(key)
                if flight is None:
                    flight = self._flights[key] = _Flight()
                    mine.append((key, flight))
                else:
                    theirs.append(flight)
        error: Exception | None = None
        if mine:
            try:
                self.fetcher.fetch(layer, [(k.blob_offset, k.inner_offset) for k, _ in mine])
            except FetchError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - any failure must reach the waiters
                error = exc
            with self._flights_lock:
                for key, flight in mine:
                    self._flights.pop(key, None)
                    flight.error = error
                    flight.done.set()
        if error is not None:
            raise ChunkUnavailable(f"fetching chunks of {layer} failed: {error}") from error
        for flight in theirs:
            # The owner waits at most the fetch timeout; allow a little slack on top.
            if not flight.done.wait(self.fetcher.timeout + 5):
                raise ChunkUnavailable(f"timed out waiting for another read's fetch of a chunk of {layer}")
            if flight.error is not None:
                raise ChunkUnavailable(f"fetching chunks of {layer} failed: {flight.error}") from flight.error
