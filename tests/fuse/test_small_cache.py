"""Chunk pins and a small cache cap (issue 13): the FUSE read path and the chunk store.

Reads go through a real ``lazyd serve`` (registry, fetcher, FUSE worker); the store tests
use real processes sharing one store, as the fetcher and the workers do.  A read pins the
chunks it has fetched until it has copied them, so eviction never takes a chunk between
the fetcher storing it and the worker reading it, however small the cap or big the chunk.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.config import MIN_CACHE_SIZE
from lazyd.estargz.writer import DEFAULT_CHUNK_SIZE
from tests.support.estargz_images import EStargzImage
from tests.support.lazyd import Lazyd, unmount_all_below
from tests.support.registry import Registry, running_registry
from tests.support.small_cache import DiskPeak, build_image, small_cache_lazyds

LAYER = "sha256:" + "5c" * 32
BIG_CHUNK = 24 * 1024 * 1024  # bigger than the whole MIN_CACHE_SIZE cap


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("small-cache-registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def data() -> bytes:
    return random.Random(7).randbytes(40_000_000)


@pytest.fixture(scope="module")
def default_chunks(registry: Registry, data: bytes, tmp_path_factory: pytest.TempPathFactory) -> EStargzImage:
    """One 40 MB file in 4 MiB chunks."""
    image, _ = build_image(registry.host, "pins-default:t", {"data.bin": data}, tmp_path_factory.mktemp("default"))
    return image


@pytest.fixture(scope="module")
def huge_chunks(registry: Registry, data: bytes, tmp_path_factory: pytest.TempPathFactory) -> EStargzImage:
    """The same file in 24 MiB chunks: the first chunk alone is bigger than the cap."""
    image, _ = build_image(registry.host, "pins-huge:t", {"data.bin": data}, tmp_path_factory.mktemp("huge"),
                           chunk_size=BIG_CHUNK)
    return image


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[callable]:
    """``mount(image)``: a new small-cache ``lazyd serve`` with the image's layer mounted; returns it and the mountpoint."""
    with small_cache_lazyds(tmp_path) as start:

        def mount(image: EStargzImage) -> tuple[Lazyd, Path]:
            lazyd = start(MIN_CACHE_SIZE, "background_fetch = false")
            mp = lazyd.root.parent / "mnt"
            mp.mkdir()
            layer = image.layers[0]
            with lazyd.client() as c:
                c.mount(image.ref, layer.digest, str(mp), layer.toc_digest)
            return lazyd, mp

        yield mount


def _wait_unpinned(cache: Path) -> None:
    store = ChunkStore(cache, MIN_CACHE_SIZE)
    try:
        deadline = time.monotonic() + 5
        while store.pin_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.pin_count() == 0, "a read left its pin behind"
    finally:
        store.close()


def test_a_chunk_bigger_than_the_cap_is_served(mounted: callable, huge_chunks: EStargzImage, data: bytes) -> None:
    lazyd, mp = mounted(huge_chunks)
    with DiskPeak(lazyd.root / "cache") as disk:
        assert (mp / "data.bin").read_bytes() == data
    with lazyd.client() as c:
        m = c.status().mounts[0]
    print(f"24 MiB chunks: fetched {m.layer.fetched_bytes / 1e6:.1f} MB of {m.layer.layer_size / 1e6:.1f} MB, "
          f"disk peak {disk.peak / 1e6:.2f} MB")
    assert m.fetch_errors == 0
    assert m.layer.fetched_bytes <= 1.02 * m.layer.layer_size
    assert disk.peak <= MIN_CACHE_SIZE + BIG_CHUNK
    _wait_unpinned(lazyd.root / "cache")


def test_random_reads_from_many_threads_across_chunk_boundaries(mounted: callable, default_chunks: EStargzImage,
                                                                 data: bytes) -> None:
    """Eight threads pread at random offsets (many reads straddle a 4 MiB chunk boundary) while
    a ninth maps the file: reads of one chunk share a fetch, each read holds its own pin, and
    the worker's readahead bookkeeping is shared by all of its FUSE threads."""
    lazyd, mp = mounted(default_chunks)
    path = mp / "data.bin"
    errors: list[str] = []
    boundaries = list(range(DEFAULT_CHUNK_SIZE, len(data), DEFAULT_CHUNK_SIZE))

    def preads(seed: int) -> None:
        rnd = random.Random(seed)
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(60):
                if rnd.random() < 0.5:
                    off = rnd.choice(boundaries) - rnd.randint(1, 200_000)
                else:
                    off = rnd.randrange(len(data))
                size = rnd.randint(1, 400_000)
                got = os.pread(fd, size, off)
                if got != data[off : off + size]:
                    errors.append(f"pread {size} at {off}: wrong bytes")
        except OSError as exc:
            errors.append(f"pread: {exc}")
        finally:
            os.close(fd)

    def mapped() -> None:
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                for off in range(len(data) - 1, -1, -DEFAULT_CHUNK_SIZE // 3):  # backwards, across every chunk
                    if m[off : off + 4096] != data[off : off + 4096]:
                        errors.append(f"mmap at {off}: wrong bytes")
        except OSError as exc:
            errors.append(f"mmap: {exc}")

    with DiskPeak(lazyd.root / "cache") as disk:
        threads = [threading.Thread(target=preads, args=(i,)) for i in range(8)] + [threading.Thread(target=mapped)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert not errors, errors[:5]
    with lazyd.client() as c:
        m = c.status().mounts[0]
    assert m.fetch_errors == 0 and m.reads > 100
    assert disk.peak <= MIN_CACHE_SIZE + DEFAULT_CHUNK_SIZE
    assert (mp / "data.bin").read_bytes() == data
    _wait_unpinned(lazyd.root / "cache")


# -- the store, shared by processes -------------------------------------------------------


def _fill(directory: Path, limit: int, first: int, count: int, size: int) -> None:
    """In another process (as the fetcher): store ``count`` chunks of ``size`` bytes from offset ``first``."""
    code = ("import sys; from lazyd.cache.store import ChunkKey, ChunkStore\n"
            f"s = ChunkStore({str(directory)!r}, {limit})\n"
            f"s.put_many((ChunkKey({LAYER!r}, i), bytes([i % 256]) * {size}) for i in range({first}, {first + count}))\n"
            "s.close()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_pinned_chunk_survives_eviction_by_another_process(tmp_path: Path) -> None:
    limit = 2 << 20
    store = ChunkStore(tmp_path / "cache", limit)
    try:
        wanted = ChunkKey(LAYER, 1)
        pin = store.pin([wanted], 60)  # before it is stored, as a read does before asking the fetcher
        _fill(tmp_path / "cache", limit, 1, 1, 300_000)
        _fill(tmp_path / "cache", limit, 100, 40, 300_000)  # 12 MB through a 2 MiB cap
        assert store.peek(wanted) == bytes([1]) * 300_000
        assert store.peek(ChunkKey(LAYER, 100)) is None  # the oldest unpinned ones went
        assert store.stats().size <= limit + 300_000
        store.unpin(pin)
        assert store.pin_count() == 0
        _fill(tmp_path / "cache", limit, 200, 10, 300_000)
        assert store.peek(wanted) is None  # unpinned, it is evicted like any other
    finally:
        store.close()


def test_an_expired_pin_protects_nothing(tmp_path: Path) -> None:
    limit = 2 << 20
    store = ChunkStore(tmp_path / "cache", limit)
    try:
        wanted = ChunkKey(LAYER, 1)
        store.pin([wanted], 0.2)  # a worker that died holding it
        _fill(tmp_path / "cache", limit, 1, 1, 300_000)
        time.sleep(0.3)
        assert store.pin_count() == 0
        _fill(tmp_path / "cache", limit, 100, 20, 300_000)
        assert store.peek(wanted) is None
        assert store._cache._sql("SELECT COUNT(*) FROM LazydPin").fetchone()[0] == 0  # noqa: SLF001 - culled
    finally:
        store.close()


def test_a_chunk_bigger_than_the_cap_is_stored_only_while_pinned(tmp_path: Path) -> None:
    limit = 2 << 20
    store = ChunkStore(tmp_path / "cache", limit)
    try:
        small = [(ChunkKey(LAYER, i), os.urandom(100_000)) for i in range(5)]
        store.put_many(small)
        huge = ChunkKey(LAYER, 99)
        store.put_many([(huge, os.urandom(3 << 20))])  # nobody waits for it: storing it would flush the rest
        assert store.peek(huge) is None
        assert all(store.peek(k) == v for k, v in small)
        pin = store.pin([huge], 60)
        store.put_many([(huge, b"h" * (3 << 20))])
        assert store.peek(huge) == b"h" * (3 << 20)
        assert all(store.peek(k) is None for k, _ in small)  # everything unpinned made room
        store.unpin(pin)
        store.put_many([(ChunkKey(LAYER, 5), b"s")])
        assert store.peek(huge) is None and store.stats().size <= limit
    finally:
        store.close()


def test_concurrent_stores_stay_under_the_cap(tmp_path: Path) -> None:
    """Four threads store 4 MiB chunks at once (as the fetcher's store threads do): each makes
    room for the others' chunks too, so the store's files never take more than the cap."""
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "lazyd-test-cache", str(cache)], check=True)
    try:
        store = ChunkStore(cache, MIN_CACHE_SIZE)
        try:
            def put(first: int) -> None:
                for i in range(first, first + 12):
                    store.put_many([(ChunkKey(LAYER, i), bytes([i % 256]) * DEFAULT_CHUNK_SIZE)])

            with DiskPeak(cache) as disk:
                threads = [threading.Thread(target=put, args=(t * 100,)) for t in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
            print(f"4 threads x 12 chunks of 4 MiB: disk peak {disk.peak / 1e6:.2f} MB, cap {MIN_CACHE_SIZE / 1e6:.2f} MB")
            assert disk.peak <= MIN_CACHE_SIZE + 512 * 1024  # tmpfs pages and SQLite's own growth
            assert 0 < store.stats().count <= 3
        finally:
            store.close()
    finally:
        unmount_all_below(cache)
