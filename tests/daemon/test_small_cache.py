"""A chunk cache smaller than the image (issue 13), through a real ``lazyd serve``, registry and FUSE mount.

The cap is ``MIN_CACHE_SIZE`` (16 MiB, four default 4 MiB chunks); the layers hold files bigger
than the cap and bigger than a chunk.  Every byte read is compared with the source, the
store's disk use is sampled on a tmpfs of its own, and ``status`` must show each byte of the
layer fetched about once: before the fix a read failed with EIO once its chunk was evicted
between the fetcher storing it and the worker copying it, and refetches showed as 116-140%
(the same reads through the old store used 23-26 MB of disk for a 16 MiB cap).
"""

from __future__ import annotations

import asyncio
import hashlib
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
from lazyd.fetcher.layers import LayerTable
from lazyd.fetcher.scheduler import Scheduler
from lazyd.registry import Reference, RegistryClient, RegistryConfig
from tests.daemon.conftest import via
from tests.support.estargz_images import EStargzImage
from tests.support.lazyd import Lazyd
from tests.support.registry import Registry
from tests.support.small_cache import DiskPeak, build_image, random_text, small_cache_lazyds
from tests.support.tcpproxy import TCPProxy
from tests.support.treecheck import check_tree

NO_BACKGROUND = "background_fetch = false"
FETCH_BOUND = 1.02
"""``status`` fetched bytes may exceed the layer's size by 2% (measured: 99.3-100.0%).  Before
the fix the sequential read below fetched 121.8% of its layer, and 10 reads failed with EIO."""


@pytest.fixture(scope="module")
def big_files() -> dict[str, bytes]:
    rnd = random.Random(13)
    files = {
        "mid/six.bin": rnd.randbytes(6_000_000),  # the file: bigger than a chunk, smaller than the cap
        "big/random.bin": rnd.randbytes(40_000_000),  # bigger than the cap, incompressible
        "big/text.txt": random_text(rnd, 30_000_000),  # bigger than the cap, members smaller than chunks
    }
    for i in range(200):
        files[f"small/f{i:03d}"] = rnd.randbytes(rnd.randint(0, 60_000))
    files["big/tail.bin"] = rnd.randbytes(9_000_001)
    return files


@pytest.fixture(scope="module")
def big_image(registry: Registry, big_files: dict[str, bytes],
              tmp_path_factory: pytest.TempPathFactory) -> EStargzImage:
    image, _ = build_image(registry.host, "small-cache:t", big_files, tmp_path_factory.mktemp("small-cache"))
    return image


@pytest.fixture
def small_lazyd(tmp_path: Path) -> Iterator[callable]:
    with small_cache_lazyds(tmp_path) as start_lazyd:

        def start(extra: str = NO_BACKGROUND, cache_size: int = MIN_CACHE_SIZE) -> Lazyd:
            return start_lazyd(cache_size, extra)

        yield start


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [MIN_CACHE_SIZE - 1, 2 * 1024 * 1024])
def test_a_cap_below_the_minimum_is_refused_at_start(tmp_path: Path, size: int) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"cache_size = {size}\n")
    r = subprocess.run([sys.executable, "-m", "lazyd.cli.lazyd", "serve", "--config", str(cfg), "--root",
                        str(tmp_path / "root"), "--socket", str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert f"config key cache_size: {size} must be at least 16777216 bytes (16 MiB: room for four 4 MiB chunks" \
        in r.stderr
    assert not (tmp_path / "root").exists() and not (tmp_path / "s.sock").exists()


def test_reads_at_the_minimum_cap_are_exact_fetch_once_and_stay_under_the_cap(
        small_lazyd: callable, big_image: EStargzImage, big_files: dict[str, bytes]) -> None:
    lazyd = small_lazyd()
    layer = big_image.layers[0]
    assert layer.size > 4 * MIN_CACHE_SIZE and max(map(len, big_files.values())) > 2 * MIN_CACHE_SIZE
    mp = lazyd.root.parent / "mnt"
    mp.mkdir()
    cache = lazyd.root / "cache"
    with lazyd.client() as c:
        c.mount(big_image.ref, layer.digest, str(mp), layer.toc_digest)
        started = time.monotonic()
        with DiskPeak(cache) as disk:
            for name, data in big_files.items():
                assert _digest((mp / name).read_bytes()) == _digest(data), name
        seconds = time.monotonic() - started
        st = c.status()
    m = st.mounts[0]
    print(f"read {sum(map(len, big_files.values())) / 1e6:.1f} MB in {seconds:.2f}s; layer {layer.size / 1e6:.1f} MB, "
          f"fetched {m.layer.fetched_bytes / 1e6:.1f} MB ({m.layer.fetched_bytes / layer.size:.1%}); disk peak "
          f"{disk.peak / 1e6:.2f} MB over {disk.samples} samples, cap {MIN_CACHE_SIZE / 1e6:.2f} MB")
    assert m.fetch_errors == 0 and m.error is None
    assert m.layer.fetched_bytes <= FETCH_BOUND * layer.size
    assert disk.peak <= MIN_CACHE_SIZE + DEFAULT_CHUNK_SIZE
    assert st.cache.size <= MIN_CACHE_SIZE and st.cache.limit == MIN_CACHE_SIZE
    store = ChunkStore(cache, MIN_CACHE_SIZE)
    try:  # every read dropped its pins (they are dropped off the read path: give it a moment)
        deadline = time.monotonic() + 5
        while store.pin_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.pin_count() == 0
    finally:
        store.close()


def test_concurrent_reads_at_the_minimum_cap(small_lazyd: callable, big_image: EStargzImage,
                                             big_files: dict[str, bytes]) -> None:
    """Eight threads read every file at once (two of them the same files): reads of one chunk
    share a fetch and each holds its own pin; every byte is right."""
    lazyd = small_lazyd()
    layer = big_image.layers[0]
    mp = lazyd.root.parent / "mnt"
    mp.mkdir()
    names = list(big_files)
    errors: list[str] = []

    def reader(part: list[str]) -> None:
        for name in part:
            try:
                got = (mp / name).read_bytes()
            except OSError as exc:
                errors.append(f"{name}: {exc}")
                continue
            if got != big_files[name]:
                errors.append(f"{name}: wrong bytes")

    parts = [names[i::6] for i in range(6)] + [names[::-1], names[len(names) // 2:] + names[: len(names) // 2]]
    with lazyd.client() as c:
        c.mount(big_image.ref, layer.digest, str(mp), layer.toc_digest)
        with DiskPeak(lazyd.root / "cache") as disk:
            threads = [threading.Thread(target=reader, args=(part,)) for part in parts]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        st = c.status()
    m = st.mounts[0]
    print(f"concurrent: fetched {m.layer.fetched_bytes / 1e6:.1f} MB of {layer.size / 1e6:.1f} MB "
          f"({m.layer.fetched_bytes / layer.size:.1%}); disk peak {disk.peak / 1e6:.2f} MB")
    assert not errors, errors[:5]
    assert m.fetch_errors == 0
    assert disk.peak <= MIN_CACHE_SIZE + DEFAULT_CHUNK_SIZE
    # Eight readers pin more than the cap holds, so neighbours a demand fetch brings along can be
    # evicted before their own reads and are fetched again for them (measured: 106-124% of the
    # layer).  Reads of one chunk share a fetch, and the worker's LRU and the page cache serve
    # threads that read a file again, so no read fetches its own chunks twice.
    assert m.layer.fetched_bytes <= 2 * layer.size


@pytest.mark.slow
def test_debian_layer_at_the_minimum_cap(small_lazyd: callable, debian: EStargzImage) -> None:
    """The 51 MB debian layer (127 MB of files) through a 16 MiB cache: every file equals the source tar."""
    lazyd = small_lazyd()
    layer = debian.layers[0]
    mp = lazyd.root.parent / "mnt"
    mp.mkdir()
    with lazyd.client() as c:
        c.mount(debian.ref, layer.digest, str(mp), layer.toc_digest)
        started = time.monotonic()
        with DiskPeak(lazyd.root / "cache") as disk:
            assert check_tree(mp, layer.tar) > 6000
        seconds = time.monotonic() - started
        m = c.status().mounts[0]
    print(f"debian: {seconds:.2f}s; fetched {m.layer.fetched_bytes / 1e6:.1f} MB of {layer.size / 1e6:.1f} MB "
          f"({m.layer.fetched_bytes / layer.size:.1%}); disk peak {disk.peak / 1e6:.2f} MB")
    assert m.fetch_errors == 0
    assert m.layer.fetched_bytes <= FETCH_BOUND * layer.size
    assert disk.peak <= MIN_CACHE_SIZE + DEFAULT_CHUNK_SIZE


def test_a_refetch_of_an_evicted_member_waits_for_its_own_download(tmp_path: Path, busybox: EStargzImage,
                                                                  registry: Registry) -> None:
    """A demand fetch streams a member and its neighbours; the member is evicted while the
    neighbours still stream; a read pins it and asks again.  That second fetch must return
    once its own download has stored the member, not when the first download ends (which
    used to settle the new request too, so the read found nothing in the store)."""
    async def run() -> None:
        # 64 KiB every 10 ms: the first download streams its 4 MiB for about 0.6 s.
        with TCPProxy(registry.port, delay=0.01) as slow:
            client = RegistryClient(RegistryConfig(hosts_dir=str(tmp_path / "certs.d"), retries=0))
            store = ChunkStore(tmp_path / "cache", 1 << 20)  # room for about two 256 KiB chunks
            try:
                image = busybox.layers[1]
                layer = await LayerTable(tmp_path, client).open(Reference.parse(via(busybox.ref, slow)), image.digest,
                                                                image.toc_digest, 30)
                first = layer.toc.file_chunks(layer.toc.lookup("data/big.bin"))[0]  # 9 MiB in 256 KiB chunks
                member = layer.by_chunk[(first.blob_offset, first.inner_offset)]
                keys = [ChunkKey(layer.digest, c.blob_offset, c.inner_offset) for c in member.chunks]
                # One registry request at a time: the second fetch's download waits for the first's.
                sched = Scheduler(client, store, 1, 16 << 20, window_min=4 << 20, window_max=4 << 20)
                await sched.fetch(layer, [member], "demand")  # returns with the neighbours still streaming
                assert sched._downloads, "the neighbours should still be streaming"  # noqa: SLF001
                deadline = time.monotonic() + 10
                while store.stored(keys) and time.monotonic() < deadline:  # evicted by the neighbours' stores
                    await asyncio.sleep(0.005)
                assert not store.stored(keys) and sched._downloads  # noqa: SLF001
                pin = store.pin(keys, 60)  # what a worker's read does before asking
                await sched.fetch(layer, [member], "demand")
                assert store.stored(keys) == set(keys), "the fetch returned before its member was stored"
                store.unpin(pin)
                await sched.drain()
                assert layer.counters.demand_bytes >= 4 << 20
            finally:
                await client.close()
                store.close()

    asyncio.run(run())
