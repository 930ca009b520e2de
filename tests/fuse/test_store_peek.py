"""ChunkStore.peek/touch: the read-only hit path the FUSE reader uses, and batched LRU recency."""

from __future__ import annotations

import time


from lazyd.cache.store import ChunkKey, ChunkStore

LAYER = "sha256:" + "ab" * 32


def _access_time(store: ChunkStore, key: ChunkKey) -> float:
    row = store._cache._sql("SELECT access_time FROM Cache WHERE key = ?", (key.encode(),)).fetchone()  # noqa: SLF001
    return float(row[0])


def test_peek_returns_what_get_returns(store: ChunkStore) -> None:
    big, small = ChunkKey(LAYER, 100), ChunkKey(LAYER, 200, 7)
    store.put(big, bytes(range(256)) * 1000)  # file-backed value
    store.put(small, b"tiny chunk")  # stored inline in SQLite
    assert store.peek(big) == store.get(big) == bytes(range(256)) * 1000
    assert store.peek(small) == store.get(small) == b"tiny chunk"
    assert store.peek(ChunkKey(LAYER, 300)) is None
    assert store.peek(ChunkKey(LAYER, 200, 8)) is None  # inner offset is part of the key


def test_peek_leaves_recency_and_touch_updates_it(store: ChunkStore) -> None:
    key = ChunkKey(LAYER, 1)
    store.put(key, b"x" * 50_000)
    stored = _access_time(store, key)
    time.sleep(0.01)
    assert store.peek(key) is not None
    assert _access_time(store, key) == stored
    store.touch([key, ChunkKey(LAYER, 999)])  # a missing key is ignored
    assert _access_time(store, key) > stored


def test_touch_moves_chunks_to_the_back_of_the_eviction_order(store: ChunkStore) -> None:
    keys = [ChunkKey(LAYER, i) for i in range(4)]
    for k in keys:
        store.put(k, bytes([k.blob_offset]) * 40_000)
        time.sleep(0.01)
    for k in keys:
        assert store.peek(k) is not None  # reads alone do not reorder
    store.touch([keys[1], keys[0]])
    # diskcache's least-recently-used cull deletes in access_time order.
    order = [row[0] for row in store._cache._sql("SELECT key FROM Cache ORDER BY access_time, rowid")]  # noqa: SLF001
    assert order[:2] == [keys[2].encode(), keys[3].encode()]
    assert set(order[2:]) == {keys[0].encode(), keys[1].encode()}
