"""ChunkStore.put_many/stored: the fetcher's bulk insert and batched look-up, against diskcache's own view."""

from __future__ import annotations

import os
from pathlib import Path


from lazyd.cache.store import ChunkKey, ChunkStore

LAYER = "sha256:" + "cd" * 32


def test_put_many_stores_what_put_would(store: ChunkStore, tmp_path: Path) -> None:
    small = {ChunkKey(LAYER, i * 1000, 0): os.urandom(100 + i) for i in range(300)}
    big = {ChunkKey(LAYER, 10**9, 0): os.urandom(200_000), ChunkKey(LAYER, 10**9, 200_000): os.urandom(70_000)}
    store.put_many([*small.items(), *big.items()])
    for key, data in {**small, **big}.items():
        assert store.get(key) == data and store.peek(key) == data
    key = ChunkKey(LAYER, 10**9, 0)
    assert store.read(key, 150_000, 10) == big[key][150_000:150_010]  # file-backed: partial read
    count, size = store.layer_usage(LAYER)
    assert count == 302 and size == 270_000  # diskcache counts file-backed bytes, as for put
    assert store.stats().count == 302
    # The same in a second process-like handle (diskcache's own metadata is consistent).
    other = ChunkStore(tmp_path / "cache", 1 << 30)
    try:
        assert other.stats().count == 302 and other.get(key) == big[key]
    finally:
        other.close()
    assert store.evict(LAYER) == 302
    assert store.stats().count == 0 and not any(f.is_file() and f.suffix == ".val"
                                                for f in (tmp_path / "cache").rglob("*"))


def test_put_many_keeps_a_chunk_stored_meanwhile(store: ChunkStore) -> None:
    key = ChunkKey(LAYER, 5, 0)
    store.put(key, b"x" * 100_000)
    store.put_many([(key, b"x" * 100_000), (ChunkKey(LAYER, 6, 0), b"y")])
    assert store.stats().count == 2 and store.get(key) == b"x" * 100_000
    files = [f for f in store.directory.rglob("*.val")]
    assert len(files) == 1, "the duplicate's value file was removed"


def test_put_many_culls_to_the_cap(tmp_path: Path) -> None:
    s = ChunkStore(tmp_path / "small", 2 << 20)
    try:
        s.put_many((ChunkKey(LAYER, i, 0), os.urandom(64_000)) for i in range(100))  # 6.4 MB of files
        assert s.stats().size <= 2 << 20
        assert 0 < s.stats().count < 100
    finally:
        s.close()


def test_stored_answers_many_keys(store: ChunkStore) -> None:
    keys = [ChunkKey(LAYER, i, 0) for i in range(1200)]
    store.put_many((k, b"z") for k in keys[::3])
    assert store.stored(keys) == set(keys[::3])
    assert store.stored([]) == set()
