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
