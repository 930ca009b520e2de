"""The inode table and the chunk reader on real eStargz blobs, without a FUSE mount."""

from __future__ import annotations

import random
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.fuse.fetchconn import FetchError, FetcherConnection
from lazyd.estargz.inodes import OPAQUE_XATTR, ROOT, InodeTable
from lazyd.fuse.reader import ChunkReader, ChunkUnavailable, MountCounters
from tests.fuse.conftest import BuiltLayer, make_layer, rich_tar
from tests.fuse.fetcher import LocalFetcher


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> BuiltLayer:
    tmp = tmp_path_factory.mktemp("reader")
    return make_layer(rich_tar(tmp / "rich.tar"), tmp / "blobs")


@contextmanager
def _serving(tmp_path: Path, layer: BuiltLayer, timeout: float
             ) -> Iterator[tuple[ChunkStore, LocalFetcher, FetcherConnection]]:
    """A chunk store, a ``LocalFetcher`` serving ``layer`` into it and a connection to that fetcher."""
    store = ChunkStore(tmp_path / "cache", 1 << 30)
    fetcher = LocalFetcher(tmp_path / "f.sock", store)
    fetcher.add(layer.local)
    fetcher.start()
    conn = FetcherConnection(str(tmp_path / "f.sock"), timeout=timeout)
    conn.start()
    try:
        yield store, fetcher, conn
    finally:
        conn.close()
        fetcher.stop()
        store.close()


@pytest.fixture
def served(tmp_path: Path, layer: BuiltLayer) -> Iterator[tuple[ChunkReader, LocalFetcher, FetcherConnection]]:
    with _serving(tmp_path, layer, timeout=1.0) as (store, fetcher, conn):
        reader = ChunkReader(store, conn)
        try:
            yield reader, fetcher, conn
        finally:
            reader.close()


def _path(table: InodeTable, path: str) -> int:
    ino = ROOT
    for part in path.split("/"):
        child = table.lookup(ino, part.encode())
        assert child is not None, path
        ino = child
    return ino


def test_inode_table_shape(layer: BuiltLayer) -> None:
    table = InodeTable.from_toc(layer.local.toc)
    again = InodeTable.from_toc(layer.local.toc)
    names = ["bin/tool", "bin/alias", "etc/passwd", "deep/implied/dirs/file.txt", "many/f0299", "dev/null"]
    assert [_path(table, n) for n in names] == [_path(again, n) for n in names]  # stable numbering
    tool = _path(table, "bin/tool")
    assert _path(table, "bin/alias") == _path(table, "bin/alias2") == tool
    assert table.attr(tool).nlink == 3
    implied = _path(table, "deep/implied")
    assert table.is_dir(implied) and table.attr(implied).mode == stat.S_IFDIR | 0o755
    wh = table.attr(_path(table, "etc/passwd"))
    assert stat.S_ISCHR(wh.mode) and wh.rdev == 0 and (wh.uid, wh.gid) == (0, 0)
    var = _path(table, "var")
    assert table.xattrs(var) == {OPAQUE_XATTR: b"y"}
    assert [n for n, _ in table.children(var)] == [b"new"]
    assert table.lookup(_path(table, "etc"), b".wh.passwd") is None
    assert table.attr(_path(table, "many")).nlink == 2
    assert table.attr(ROOT).nlink == 2 + sum(1 for _, i in table.children(ROOT) if table.is_dir(i))


def test_random_reads_equal_source(served: tuple[ChunkReader, LocalFetcher, FetcherConnection],
                                   layer: BuiltLayer) -> None:
    reader, fetcher, _ = served
    table = InodeTable.from_toc(layer.local.toc)
    with tarfile.open(layer.tar) as tf:
        want = tf.extractfile("data/big.bin").read()  # type: ignore[union-attr]
    ino = _path(table, "data/big.bin")
    counters = MountCounters()
    rnd = random.Random(1)
    for _ in range(200):
        off = rnd.randrange(0, len(want) + 10)
        size = rnd.choice([1, 4096, 131072, rnd.randrange(1, 3 << 20)])
        assert bytes(reader.read(layer.digest, table, ino, off, size, counters)) == want[off : off + size]
    assert counters.cache_misses == 2  # the file has two chunks, each fetched once
    assert fetcher.stats.chunks == 2


def test_concurrent_misses_single_flight(served: tuple[ChunkReader, LocalFetcher, FetcherConnection],
                                         layer: BuiltLayer) -> None:
    reader, fetcher, _ = served
    fetcher.delay = 0.3
    table = InodeTable.from_toc(layer.local.toc)
    ino = _path(table, "bin/tool")
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        bytes(reader.read(layer.digest, table, ino, i * 1000, 1000, MountCounters())))) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 32 and fetcher.stats.requests == 1


def test_fetch_errors_and_timeouts(served: tuple[ChunkReader, LocalFetcher, FetcherConnection],
                                   layer: BuiltLayer) -> None:
    reader, fetcher, conn = served
    table = InodeTable.from_toc(layer.local.toc)
    (chunk,) = layer.local.toc.file_chunks(layer.local.toc.lookup("etc/shadow"))
    fetcher.corrupt.add((layer.digest, chunk.blob_offset))
    with pytest.raises(ChunkUnavailable, match="digest_mismatch"):
        reader.read(layer.digest, table, _path(table, "etc/shadow"), 0, 100, MountCounters())
    with pytest.raises(FetchError) as exc:
        conn.fetch("sha256:" + "1" * 64, [(0, 0)])
    assert exc.value.code == "not_found"
    fetcher.stop()
    t0 = time.monotonic()
    with pytest.raises(ChunkUnavailable, match="unavailable"):
        reader.read(layer.digest, table, _path(table, "etc/hostname"), 0, 100, MountCounters())
    assert 0.8 <= time.monotonic() - t0 < 3


def test_request_lost_with_the_fetcher_is_sent_again(tmp_path: Path, layer: BuiltLayer) -> None:
    with _serving(tmp_path, layer, timeout=10.0) as (_, fetcher, conn):
        fetcher.delay = 1.0
        (chunk,) = layer.local.toc.file_chunks(layer.local.toc.lookup("etc/hostname"))
        errors: list[BaseException] = []
        t = threading.Thread(target=lambda: _catch(errors, conn.fetch, layer.digest, [(chunk.blob_offset, 0)]))
        t.start()
        time.sleep(0.3)
        assert fetcher.stats.requests == 1
        fetcher.stop()  # dies before answering
        fetcher.delay = 0.0
        time.sleep(0.3)
        fetcher.start()
        t.join(10)
        assert not t.is_alive() and not errors
        assert fetcher.stats.requests == 2  # the same request, sent again on the new connection


def _catch(errors: list[BaseException], fn, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)


def _access_time(reader: ChunkReader, key: str) -> float:
    row = reader.store._cache._sql("SELECT access_time FROM Cache WHERE key = ?", (key,)).fetchone()  # noqa: SLF001
    assert row is not None
    return float(row[0])


@pytest.mark.parametrize("touch_after", [0.02, 3600.0])
def test_reads_report_use_to_the_store_lru_unless_recent(tmp_path: Path, layer: BuiltLayer,
                                                         touch_after: float) -> None:
    """A store hit is reported to the LRU when the chunk's last use is ``touch_after`` old, not sooner."""
    with _serving(tmp_path, layer, timeout=1.0) as (store, _, conn):
        reader = ChunkReader(store, conn, touch_after=touch_after)
        table = InodeTable.from_toc(layer.local.toc)
        ino = _path(table, "many/f0299")
        ref = table.chunks(ino, 0, 1)[0]
        key = ChunkKey(layer.digest, ref.blob_offset, ref.inner_offset).encode()
        try:
            first = bytes(reader.read(layer.digest, table, ino, 0, 100, MountCounters()))  # fetched and stored
            stored = _access_time(reader, key)
            time.sleep(0.05)
            since = time.time()
            assert bytes(reader.read(layer.digest, table, ino, 0, 100, MountCounters())) == first  # from the store
        finally:
            reader.close()  # writes the pending batch
        if touch_after < 0.05:
            assert _access_time(reader, key) >= since
        else:
            assert _access_time(reader, key) == stored


def test_read_cached_answers_only_what_needs_no_wait(served: tuple[ChunkReader, LocalFetcher, FetcherConnection],
                                                     layer: BuiltLayer) -> None:
    """``read_cached`` (the pyfuse3 binding's in-loop READ): None, nothing counted and nothing fetched while a
    chunk is missing, or big and only in the store; the right bytes once it is in the store or the LRU."""
    reader, fetcher, _ = served
    table = InodeTable.from_toc(layer.local.toc)
    with tarfile.open(layer.tar) as tf:
        small = tf.extractfile("etc/hostname").read()  # type: ignore[union-attr]
        big = tf.extractfile("data/big.bin").read()  # type: ignore[union-attr]
    counters = MountCounters()
    ino, big_ino = _path(table, "etc/hostname"), _path(table, "data/big.bin")
    assert reader.read_cached(layer.digest, table, ino, 0, 4096, counters) is None
    assert (counters.cache_hits, counters.cache_misses, fetcher.stats.requests) == (0, 0, 0)
    assert bytes(reader.read(layer.digest, table, ino, 0, 4096, counters)) == small  # fetched and stored
    assert bytes(reader.read_cached(layer.digest, table, ino, 0, 4096, counters)) == small  # type: ignore[arg-type]
    assert counters.cache_hits == 1 and fetcher.stats.requests == 1
    assert reader.read_cached(layer.digest, table, big_ino, 0, 131072, counters) is None  # not stored yet
    reader.read(layer.digest, table, big_ino, 0, 1, counters)
    # Its first chunk (4 MiB) went to the LRU with that read: answered in the loop from there.
    assert bytes(reader.read_cached(layer.digest, table, big_ino, 4096, 131072, counters)) == big[4096:4096 + 131072]  # type: ignore[arg-type]
    assert reader.read_cached(layer.digest, table, ino, 6, 10, counters) == b""  # past the end
