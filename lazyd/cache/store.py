"""The chunk store: verified, decompressed eStargz chunks on disk.

One ``diskcache.Cache`` under the daemon root, shared by the fetcher and every
FUSE worker process (diskcache is process-safe: SQLite index plus value files).
Keys are ``"<layer digest>@<blob offset>+<inner offset>"`` strings so that they
sort by layer.  Values are the chunk's decompressed bytes, written only after
their digest was checked.  Eviction is least-recently-used under a size cap, and
the cache persists across restarts.

Pins: a reader pins the chunks it is about to have fetched (``pin``) and unpins them
once it has copied them (``unpin``), so eviction -- which only this module does, in
``put_many`` -- never removes a chunk between the fetcher storing it and the reader
loading it, however small the cap.  Pins live in a table of the same SQLite database
(every process sees them) and expire, so a reader that dies holding one cannot keep a
chunk forever.

The cap covers everything on disk: value files, the SQLite database and its write-ahead
log.  ``put_many`` writes in groups of at most one default-size chunk and makes room for
each group (and for the groups other threads are writing) before writing it, so the store
stays under the cap except by chunks pinned beyond it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

log = logging.getLogger(__name__)

# Values larger than this are stored as files, so a partial read can seek.
_MIN_FILE_SIZE = 32 * 1024
# ``put_many`` writes and inserts at most this many bytes at a time (one default-size eStargz
# chunk; a bigger chunk goes alone), making room under the cap before each group.
_GROUP_BYTES = 4 << 20
# Chunks evicted per transaction while culling (what diskcache's own cull uses).
_CULL_BATCH = 10
_PIN_TABLE = "LazydPin"
# SQLite's write-ahead log: about 4 MiB between checkpoints (1000 pages), cut back to this
# when it grew beyond, and counted as at least this much of the cap.
_WAL_LIMIT = 4 << 20


_SQLITE_CACHE_PAGES = 1024
"""SQLite page cache per connection, in pages (4 MiB at 4 KiB pages)."""


@dataclass(frozen=True)
class ChunkKey:
    """Where a chunk lives: its layer and its position in the compressed blob."""

    layer: str
    blob_offset: int
    inner_offset: int = 0

    def encode(self) -> str:
        return f"{_key_prefix(self.layer, self.blob_offset)}+{self.inner_offset:x}"


def _key_prefix(layer: str, blob_offset: int) -> str:
    """The start of the keys of ``layer``'s chunks at ``blob_offset``; fixed-width hex, so keys sort
    by layer, then by blob offset."""
    return f"{layer}@{blob_offset:016x}"


def _key_offsets(code: str) -> tuple[int, int]:
    """(blob offset, inner offset) of an encoded key."""
    offset, _, inner = code.rpartition("@")[2].partition("+")
    return int(offset, 16), int(inner, 16)


@dataclass(frozen=True)
class StoreStats:
    """Usage of the chunk store."""

    size: int
    limit: int
    count: int
    directory: str


class ChunkStore:
    """Persistent LRU store of decompressed chunks, safe to share between processes."""

    def __init__(self, directory: str | os.PathLike[str], size_limit: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.size_limit = size_limit
        self._cache = diskcache.Cache(
            str(self.directory),
            size_limit=size_limit,
            eviction_policy="least-recently-used",
            disk_min_file_size=_MIN_FILE_SIZE,
            cull_limit=0,  # diskcache never culls on its own: ``_cull`` does, honouring pins
            statistics=False,
            tag_index=True,
            # A write-ahead log that grew past _WAL_LIMIT while readers held checkpoints back is
            # cut back to it at the next one, not kept at its largest.
            sqlite_journal_size_limit=_WAL_LIMIT,
            # Every connection (one per thread, in every process) gets a small page cache and
            # no memory map of the database: with diskcache's defaults (32 MiB, 64 MiB) each
            # store thread of the fetcher grew it by up to ~100 MB (bench/bench_memory.py).
            sqlite_cache_size=_SQLITE_CACHE_PAGES,
            sqlite_mmap_size=0,
        )
        self._cache._sql(  # noqa: SLF001 - our table in diskcache's database
            f"CREATE TABLE IF NOT EXISTS {_PIN_TABLE} (key TEXT NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL)")
        self._pin_ids = itertools.count(1)
        self._wal_reserve = min(_WAL_LIMIT, size_limit // 4)
        self._writing = 0  # bytes of groups this process is writing (see ``_insert``)
        self._writing_cond = threading.Condition()
        self._evictions = 0  # chunks ``_cull`` evicted through this instance (store threads add to it)
        self._evictions_lock = threading.Lock()

    @property
    def evictions(self) -> int:
        """Chunks evicted to stay under the cap by this instance since it was opened (not ``evict``)."""
        return self._evictions

    def close(self) -> None:
        self._cache.close()

    def has(self, key: ChunkKey) -> bool:
        return key.encode() in self._cache

    def stored(self, keys: Iterable[ChunkKey]) -> set[ChunkKey]:
        """Which of ``keys`` are stored, in one read-only query per 500 keys (``has`` costs a
        query each)."""
        return {key for key, _ in self._rows_of(keys, "key")}

    def _rows_of(self, keys: Iterable[ChunkKey], columns: str) -> Iterator[tuple[ChunkKey, tuple[Any, ...]]]:
        """``columns`` of the stored ones of ``keys``: read-only queries of diskcache's table, 500 keys each."""
        by_code = {k.encode(): k for k in keys}
        codes = list(by_code)
        for i in range(0, len(codes), 500):
            part = codes[i : i + 500]
            rows = self._cache._sql(  # noqa: SLF001 - read-only query of diskcache's table
                f"SELECT key, {columns} FROM Cache WHERE key IN ({','.join('?' * len(part))}) AND raw = 1"
                " AND (expire_time IS NULL OR expire_time > ?)", (*part, time.time())
            ).fetchall()
            for code, *values in rows:
                yield by_code[code], tuple(values)

    def stored_between(self, layer: str, start: int, end: int) -> set[tuple[int, int]]:
        """The (blob offset, inner offset) of every stored chunk of ``layer`` whose blob offset is in
        ``[start, end)``: one read-only query of the key index's range (keys sort by layer, then
        by the fixed-width blob offset), so its cost follows what is stored, not what is asked."""
        rows = self._cache._sql(  # noqa: SLF001 - read-only query of diskcache's table
            "SELECT key FROM Cache WHERE key >= ? AND key < ? AND raw = 1"
            " AND (expire_time IS NULL OR expire_time > ?)",
            (_key_prefix(layer, start), _key_prefix(layer, end), time.time())).fetchall()
        return {_key_offsets(code) for (code,) in rows}

    def get(self, key: ChunkKey) -> bytes | None:
        """The whole chunk, or None when it is not stored."""
        value = self._cache.get(key.encode(), default=None)
        return bytes(value) if value is not None else None

    def read(self, key: ChunkKey, offset: int, size: int) -> bytes | None:
        """``size`` bytes of the chunk from ``offset``, or None when it is not stored.

        Large chunks are file-backed, so this reads only the bytes asked for.
        """
        handle = self._cache.get(key.encode(), default=None, read=True)
        if handle is None:
            return None
        if isinstance(handle, (bytes, bytearray, memoryview)):
            return bytes(handle[offset : offset + size])
        with handle:
            handle.seek(offset)
            return handle.read(size)

    def peek(self, key: ChunkKey) -> bytes | None:
        """The whole chunk like ``get``, but read-only: its LRU recency is not updated.

        ``get`` updates the access time in a write transaction on every hit, which
        serialises readers across processes; hot read paths use ``peek`` and
        report use in batches with ``touch``.
        """
        entry = self.peek_entry(key)
        return entry[0] if entry is not None else None

    def peek_entry(self, key: ChunkKey) -> tuple[bytes, float] | None:
        """Like ``peek``, with the chunk's recorded last use (a ``time.time()`` value: when it was
        stored or last touched), so a reader can leave out touches that would change little."""
        rows = self._cache._sql(  # noqa: SLF001 - read-only query of diskcache's table
            "SELECT mode, filename, value, access_time FROM Cache WHERE key = ? AND raw = 1"
            " AND (expire_time IS NULL OR expire_time > ?)", (key.encode(), time.time())
        ).fetchall()
        if not rows:
            return None
        mode, filename, value, accessed = rows[0]
        try:
            return bytes(self._cache._disk.fetch(mode, filename, value, False)), accessed  # noqa: SLF001
        except OSError:  # evicted between the query and the read
            return None

    def peek_many(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, bytes]:
        """The stored ones of ``keys`` with their bytes, read-only like ``peek``, in one query per
        500 keys (a push of a directory's small files asks for a thousand at once)."""
        out: dict[ChunkKey, bytes] = {}
        fetch = self._cache._disk.fetch  # noqa: SLF001
        for key, (mode, filename, value) in self._rows_of(keys, "mode, filename, value"):
            try:
                out[key] = bytes(fetch(mode, filename, value, False))
            except OSError:  # evicted between the query and the read
                pass
        return out

    def touch(self, keys: Iterable[ChunkKey], times: Sequence[float] | None = None) -> None:
        """Mark stored chunks as used (for LRU eviction), in one transaction: at ``times``
        (one per key, ``time.time()`` values; default: now).  A chunk's recency never moves back."""
        now = time.time()
        codes = [key.encode() for key in keys]
        when = list(times) if times is not None else [now] * len(codes)
        if len(when) != len(codes):
            raise ValueError(f"touch: {len(codes)} keys but {len(when)} times")
        with self._cache.transact():
            self._cache._con.executemany(  # noqa: SLF001 - what diskcache's get does for this policy
                "UPDATE Cache SET access_time = MAX(access_time, ?) WHERE key = ? AND raw = 1", zip(when, codes))

    def put(self, key: ChunkKey, data: bytes) -> None:
        """Store a verified chunk (callers check the digest first)."""
        self.put_many([(key, data)])

    def put_many(self, items: Iterable[tuple[ChunkKey, bytes]]) -> None:
        """Store verified chunks with bulk inserts, culling to the cap (pinned chunks stay).

        diskcache's ``set`` costs several statements, a cull check and a commit per chunk:
        about 1 ms, which caps the store at about 1,000 small chunks a second.  This writes
        the rows ``set`` would write (values through diskcache's own ``Disk.store``, so large
        ones become files) with one ``executemany`` per group of up to ``_GROUP_BYTES``
        (one group for a batch of small chunks); diskcache's triggers keep its count and
        size.  Before each group it evicts enough to fit the group under the cap (``_insert``).
        A chunk stored meanwhile by someone else is kept (same verified bytes).  A chunk
        bigger than the cap (less the log's reserve) is stored only while pinned (a reader
        waits for it): otherwise it would push out everything else and then be evicted itself.
        """
        chunks: dict[str, tuple[ChunkKey, bytes]] = {}
        for key, data in items:
            chunks.setdefault(key.encode(), (key, bytes(data)))
        room = self.size_limit - self._wal_reserve
        oversize = [code for code, (_, data) in chunks.items() if len(data) > room]
        if oversize:
            pinned = self._pinned(oversize)
            for code in oversize:
                if code not in pinned:
                    log.debug("not storing chunk %s: its %d bytes do not fit the %d-byte cap and no reader "
                              "waits for it", code, len(chunks.pop(code)[1]), self.size_limit)
        group: list[tuple[str, ChunkKey, bytes]] = []
        size = 0
        for code, (key, data) in chunks.items():
            if group and size + len(data) > _GROUP_BYTES:
                self._insert(group, size)
                group, size = [], 0
            group.append((code, key, data))
            size += len(data)
        if group:
            self._insert(group, size)

    def _insert(self, group: list[tuple[str, ChunkKey, bytes]], size: int) -> None:
        """Make room for ``size`` bytes, write and insert ``group``, cull to the cap.

        Room is made for the groups other threads of this process are writing too (their
        files are on disk before their rows count); when eviction cannot make room next to
        them, this waits until they are in, so concurrent stores do not overshoot the cap
        together.  A group smaller than a value file goes into the database with neither:
        the cull after it is enough.
        """
        big = size >= _MIN_FILE_SIZE
        if big:
            with self._writing_cond:
                while True:
                    others = self._writing
                    if self._footprint() + others + size <= self.size_limit:
                        break
                    self._cull(self.size_limit - size - others)
                    if not others or self._footprint() + others + size <= self.size_limit:
                        break
                    self._writing_cond.wait(1.0)  # all that is left is pinned or being written
                self._writing += size
        try:
            self._write(group)
        finally:
            if big:
                with self._writing_cond:
                    self._writing -= size
                    self._writing_cond.notify_all()
        if self._footprint() > self.size_limit:
            self._cull(self.size_limit)

    def _write(self, group: list[tuple[str, ChunkKey, bytes]]) -> None:
        """Write the values of ``group`` and insert their rows in one transaction."""
        cache = self._cache
        disk = cache._disk  # noqa: SLF001 - diskcache's value encoder
        now = time.time()
        rows: dict[str, tuple[object, ...]] = {}
        for code, key, data in group:
            stored_size, mode, filename, db_value = disk.store(data, False, key=code)
            rows[code] = (code, 1, now, None, now, 0, key.layer, stored_size, mode, filename, db_value)
        codes = list(rows)
        with cache.transact():
            sql = cache._sql  # noqa: SLF001 - same connection as the transaction
            for i in range(0, len(codes), 500):
                part = codes[i : i + 500]
                for (code,) in sql(f"SELECT key FROM Cache WHERE key IN ({','.join('?' * len(part))}) AND raw = 1",
                                   part).fetchall():
                    dup = rows.pop(code)
                    if dup[9]:
                        disk.remove(dup[9])  # the file just written for a chunk that was already there
            cache._con.executemany(  # noqa: SLF001
                "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag, size,"
                " mode, filename, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", list(rows.values()))

    def _file_size(self, suffix: str) -> int:
        try:
            return (self.directory / f"{diskcache.core.DBNAME}{suffix}").stat().st_size
        except FileNotFoundError:
            return 0

    def _sqlite_bytes(self, reserve: bool = True) -> int:
        """The SQLite files on disk: the database file (it shrinks only at checkpoints, so it
        can be bigger than its pages in use) and the write-ahead log.  The log grows to about
        4 MiB between checkpoints and keeps that size; with ``reserve`` it counts as that much
        from the start (at most a quarter of the cap), so its growth cannot take the store over."""
        ((pages,),) = self._cache._sql("PRAGMA page_count").fetchall()  # noqa: SLF001
        logical = pages * self._cache._page_size  # noqa: SLF001
        wal = self._file_size("-wal")
        return max(logical, self._file_size("")) + (max(self._wal_reserve, wal) if reserve else wal)

    def _values_bytes(self) -> int:
        """diskcache's running total of value sizes (values stored in the database included)."""
        return int(self._cache.reset("size"))

    def _footprint(self, reserve: bool = True) -> int:
        """Bytes the store takes on disk, as eviction counts them (``reserve``: see
        ``_sqlite_bytes``); values kept in the database count twice, which errs on the safe side."""
        return self._values_bytes() + self._sqlite_bytes(reserve)

    def _cull(self, target: int) -> int:
        """Evict least-recently-used chunks that are not pinned until the store's footprint is
        at most ``target`` (or nothing unpinned is left); returns how many were evicted."""
        cache = self._cache
        now = time.time()
        # The SQLite files once: deleting rows does not shrink them before a checkpoint (the log
        # grows), so re-reading them could evict far too much.
        values_target = target - self._sqlite_bytes()
        evicted = 0
        while self._values_bytes() > values_target:
            with cache._transact() as (sql, cleanup):  # noqa: SLF001 - removes the files after the commit
                sql(f"DELETE FROM {_PIN_TABLE} WHERE expires <= ?", (now,))  # left by readers that died
                rows = sql(f"SELECT rowid, filename FROM Cache WHERE key NOT IN"
                           f" (SELECT key FROM {_PIN_TABLE} WHERE expires > ?)"
                           f" ORDER BY access_time LIMIT {_CULL_BATCH}", (now,)).fetchall()
                if rows:
                    sql(f"DELETE FROM Cache WHERE rowid IN ({','.join('?' * len(rows))})", [r[0] for r in rows])
                    for _, filename in rows:
                        cleanup(filename)
            if not rows:
                break
            evicted += len(rows)
        if evicted:
            with self._evictions_lock:
                self._evictions += evicted
        return evicted

    # -- pins ---------------------------------------------------------------------

    def pin(self, keys: Iterable[ChunkKey], seconds: float) -> str:
        """Keep ``keys`` (stored or not yet) from eviction for at most ``seconds``; returns the
        pin's id for ``unpin``.  Several pins of one chunk are independent."""
        owner = f"{os.getpid()}.{next(self._pin_ids)}"
        expires = time.time() + seconds
        rows = [(code, owner, expires) for code in dict.fromkeys(k.encode() for k in keys)]
        with self._cache.transact():
            self._cache._con.executemany(  # noqa: SLF001
                f"INSERT INTO {_PIN_TABLE} (key, owner, expires) VALUES (?, ?, ?)", rows)
        return owner

    def unpin(self, *pin_ids: str) -> None:
        """Drop pins made by ``pin``; their chunks become evictable again (unless pinned otherwise)."""
        for i in range(0, len(pin_ids), 500):
            part = pin_ids[i : i + 500]
            self._cache._sql(  # noqa: SLF001
                f"DELETE FROM {_PIN_TABLE} WHERE owner IN ({','.join('?' * len(part))})", part)

    def pin_count(self) -> int:
        """Pins in force (unexpired), over all processes."""
        row = self._cache._sql(  # noqa: SLF001
            f"SELECT COUNT(DISTINCT owner) FROM {_PIN_TABLE} WHERE expires > ?", (time.time(),)).fetchone()
        return int(row[0])

    def _pinned(self, codes: list[str]) -> set[str]:
        """Which of the encoded keys ``codes`` are pinned now."""
        found: set[str] = set()
        for i in range(0, len(codes), 500):
            part = codes[i : i + 500]
            rows = self._cache._sql(  # noqa: SLF001
                f"SELECT key FROM {_PIN_TABLE} WHERE key IN ({','.join('?' * len(part))}) AND expires > ?",
                (*part, time.time())).fetchall()
            found.update(row[0] for row in rows)
        return found

    def evict(self, layer: str | None = None) -> int:
        """Drop one layer's chunks, or everything; returns how many were removed."""
        if layer is None:
            return self._cache.clear()
        return self._cache.evict(layer)

    def layer_usage(self, layer: str) -> tuple[int, int]:
        """(chunk count, bytes) stored for one layer."""
        # diskcache has no per-tag aggregate; read its own (tag-indexed) table.
        row = self._cache._sql(  # noqa: SLF001 - read-only query of diskcache's table
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM Cache WHERE tag = ?", (layer,)
        ).fetchone()
        return int(row[0]), int(row[1])

    def stats(self) -> StoreStats:
        return StoreStats(
            size=self._footprint(reserve=False),
            limit=self.size_limit,
            count=len(self._cache),
            directory=str(self.directory),
        )
