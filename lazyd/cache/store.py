"""The chunk store: verified, decompressed eStargz chunks on disk.

One ``diskcache.Cache`` under the daemon root, shared by the fetcher and every
FUSE worker process (diskcache is process-safe: SQLite index plus value files).
Keys are ``"<layer digest>@<blob offset>+<inner offset>"`` strings so that they
sort by layer.  Values are the chunk's decompressed bytes, written only after
their digest was checked.  Eviction is least-recently-used under a size cap, and
the cache persists across restarts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import diskcache

# Values larger than this are stored as files, so a partial read can seek.
_MIN_FILE_SIZE = 32 * 1024


@dataclass(frozen=True)
class ChunkKey:
    """Where a chunk lives: its layer and its position in the compressed blob."""

    layer: str
    blob_offset: int
    inner_offset: int = 0

    def encode(self) -> str:
        return f"{self.layer}@{self.blob_offset:016x}+{self.inner_offset:x}"


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
            cull_limit=10,
            statistics=False,
            tag_index=True,
        )

    def close(self) -> None:
        self._cache.close()

    def has(self, key: ChunkKey) -> bool:
        return key.encode() in self._cache

    def stored(self, keys: Iterable[ChunkKey]) -> set[ChunkKey]:
        """Which of ``keys`` are stored, in one read-only query per 500 keys (``has`` costs a
        query each)."""
        by_code = {k.encode(): k for k in keys}
        codes = list(by_code)
        found: set[ChunkKey] = set()
        for i in range(0, len(codes), 500):
            part = codes[i : i + 500]
            rows = self._cache._sql(  # noqa: SLF001 - read-only query of diskcache's table
                f"SELECT key FROM Cache WHERE key IN ({','.join('?' * len(part))}) AND raw = 1"
                " AND (expire_time IS NULL OR expire_time > ?)", (*part, time.time())
            ).fetchall()
            found.update(by_code[row[0]] for row in rows)
        return found

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
        rows = self._cache._sql(  # noqa: SLF001 - read-only query of diskcache's table
            "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
            " AND (expire_time IS NULL OR expire_time > ?)", (key.encode(), time.time())
        ).fetchall()
        if not rows:
            return None
        try:
            return bytes(self._cache._disk.fetch(*rows[0], False))  # noqa: SLF001
        except OSError:  # evicted between the query and the read
            return None

    def touch(self, keys: Iterable[ChunkKey]) -> None:
        """Mark stored chunks as just used (for LRU eviction), in one transaction."""
        now = time.time()
        with self._cache.transact():
            for key in keys:
                self._cache._sql(  # noqa: SLF001 - what diskcache's get does for this policy
                    "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1", (now, key.encode()))

    def put(self, key: ChunkKey, data: bytes) -> None:
        """Store a verified chunk (callers check the digest first)."""
        self._cache.set(key.encode(), bytes(data), tag=key.layer)

    def put_many(self, items: Iterable[tuple[ChunkKey, bytes]]) -> None:
        """Store verified chunks with one bulk insert in one transaction, then cull once.

        ``put`` costs diskcache's full ``set`` per chunk (several statements, a cull check and a
        commit): about 1 ms, which caps the store at about 1,000 small chunks a second.  This
        writes the rows ``set`` would write (values through diskcache's own ``Disk.store``, so
        large ones become files), in one ``executemany``; diskcache's triggers keep its count
        and size.  A chunk stored meanwhile by someone else is kept (same verified bytes).
        """
        cache = self._cache
        disk = cache._disk  # noqa: SLF001 - diskcache's value encoder
        now = time.time()
        rows: dict[str, tuple[object, ...]] = {}
        for key, data in items:
            code = key.encode()
            if code in rows:
                continue
            size, mode, filename, db_value = disk.store(bytes(data), False, key=code)
            rows[code] = (code, 1, now, None, now, 0, key.layer, size, mode, filename, db_value)
        if not rows:
            return
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
        if cache.volume() > self.size_limit:
            cache.cull()

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
            size=int(self._cache.volume()),
            limit=self.size_limit,
            count=len(self._cache),
            directory=str(self.directory),
        )
