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


def test_peek_entry_gives_the_last_use(store: ChunkStore) -> None:
    key = ChunkKey(LAYER, 5)
    before = time.time()
    store.put(key, b"abc")
    data, used = store.peek_entry(key)  # type: ignore[misc]
    assert data == b"abc" and before <= used <= time.time()
    time.sleep(0.01)
    store.touch([key])
    assert store.peek_entry(key)[1] > used  # type: ignore[index]
    assert store.peek_entry(ChunkKey(LAYER, 6)) is None


def test_stored_between_is_the_range_of_one_layer(store: ChunkStore) -> None:
    other = "sha256:" + "ac" * 32
    keys = [ChunkKey(LAYER, 0), ChunkKey(LAYER, 15), ChunkKey(LAYER, 16), ChunkKey(LAYER, 16, 0x10000),
            ChunkKey(LAYER, 255), ChunkKey(LAYER, 256), ChunkKey(LAYER, 1 << 40), ChunkKey(other, 100)]
    store.put_many([(k, b"x") for k in keys])
    assert store.stored_between(LAYER, 0, 1 << 48) == {(k.blob_offset, k.inner_offset) for k in keys[:-1]}
    # [start, end): 16 and its inner chunk are in, 256 (the end) is out; hex offsets do not sort as
    # strings would without their fixed width (0xff < 0x100).
    assert store.stored_between(LAYER, 16, 256) == {(16, 0), (16, 0x10000), (255, 0)}
    assert store.stored_between(LAYER, 17, 255) == set()
    assert store.stored_between(other, 0, 1 << 48) == {(100, 0)}
    assert store.stored_between("sha256:" + "ab" * 31 + "aa", 0, 1 << 48) == set()
