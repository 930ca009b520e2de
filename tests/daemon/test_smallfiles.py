"""The small-file read path: neighbour windows of demand fetches, and background fetch that
keeps a share of the link under sustained demand (a long walk of a many-file layer)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from lazyd.api.messages import DIGEST_MISMATCH, ApiError
from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.estargz import BuildOptions
from lazyd.fetcher.layers import Layer, LayerTable, Member
from lazyd.fetcher.scheduler import Scheduler
from lazyd.registry import Reference, RegistryClient, RegistryConfig
from tests.daemon.conftest import via
from tests.support.estargz_images import EStargzImage, build_layers, push_layers
from tests.support.registry import Registry
from tests.support.tars import small_files_tar
from tests.support.tcpproxy import TCPProxy


def _many_files_tar(path: Path, count: int, seed: int) -> Path:
    """A tar of ``count`` small files (200 B to 3 kB, half random, half text) in 100 directories."""
    return small_files_tar(path, count, seed, dirs=100, dir_name="d{d:03d}", file_name="d{d:03d}/f{i:05d}",
                           random_part=2, text="file {i} ")


@pytest.fixture(scope="session")
def smallfiles(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> EStargzImage:
    """2,000 small files in one eStargz layer, pushed as smallfiles:t."""
    work = tmp_path_factory.mktemp("smallfiles")
    layers = build_layers([_many_files_tar(work / "l.tar", 2000, 1)], work / "esgz", BuildOptions())
    return push_layers(registry.host, "smallfiles:t", layers)


@pytest.fixture(scope="session")
def manyfiles(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> EStargzImage:
    """10,000 small files in one eStargz layer, pushed as manyfiles:t (20,000 took over a minute
    with the walks on this 2-core machine)."""
    work = tmp_path_factory.mktemp("manyfiles")
    layers = build_layers([_many_files_tar(work / "l.tar", 10000, 2)], work / "esgz", BuildOptions())
    return push_layers(registry.host, "manyfiles:t", layers)


async def _open(tmp_path: Path, image: EStargzImage, proxy: TCPProxy, name: str, **window: int):
    client = RegistryClient(RegistryConfig(hosts_dir=str(tmp_path / "certs.d"), retries=0))
    store = ChunkStore(tmp_path / name / "cache", 1 << 30)
    table = LayerTable(tmp_path / name, client)
    layer = await table.open(Reference.parse(via(image.ref, proxy)), image.layers[0].digest,
                             image.layers[0].toc_digest, 30)
    return client, store, layer, Scheduler(client, store, 4, 16 << 20, **window)


def _stored(store: ChunkStore, layer: Layer, m: Member) -> bool:
    return all(store.has(ChunkKey(layer.digest, c.blob_offset, c.inner_offset)) for c in m.chunks)


def test_demand_read_stores_its_neighbours(tmp_path: Path, smallfiles: EStargzImage, proxy: TCPProxy) -> None:
    """One demand fetch of a small file brings the files around it, in one request."""
    window = 64 * 1024

    async def run() -> None:
        client, store, layer, sched = await _open(tmp_path, smallfiles, proxy, "a", window_min=window,
                                                  window_max=window)
        try:
            ms = layer.members
            k = len(ms) // 2
            before = len(proxy.range_requests(layer.digest))
            await sched.fetch(layer, [ms[k]], "demand")
            await sched.drain()
            reqs = proxy.range_requests(layer.digest)[before:]
            assert len(reqs) == 1
            got = [m for m in ms if _stored(store, layer, m)]
            assert ms[k] in got
            lo, hi = got[0].blob_offset, got[-1].blob_end
            assert reqs[0].headers["range"] == f"bytes={lo}-{hi - 1}"
            assert got == [m for m in ms if lo <= m.blob_offset < hi], "the neighbours form one run"
            assert hi - lo <= window and hi - lo > window - max(m.size for m in ms) * 2
            assert got[0].blob_offset < ms[k].blob_offset < got[-1].blob_offset, "neighbours on both sides"
            assert sched.neighbour_members == len(got) - 1
            # Reading the neighbours needs no request.
            for m in got:
                await sched.fetch(layer, [m], "demand")
            assert len(proxy.range_requests(layer.digest)) == before + 1
        finally:
            await client.close()
            store.close()

    asyncio.run(run())


def test_neighbour_window_cuts_registry_requests(tmp_path: Path, smallfiles: EStargzImage,
                                                 proxy: TCPProxy) -> None:
    """Reading neighbouring small files one by one: one request each without a window, about
    one per window with it, fewer still when the window grows, and the same bytes stored."""
    async def read_all(name: str, count: int, **window: int) -> tuple[int, int]:
        client, store, layer, sched = await _open(tmp_path, smallfiles, proxy, name, **window)
        try:
            ms = layer.members[100 : 100 + count]
            before = len(proxy.range_requests(layer.digest))
            for m in ms:
                await sched.fetch(layer, [m], "demand")
            await sched.drain()
            for m in ms:
                for c in m.chunks:
                    data = store.get(ChunkKey(layer.digest, c.blob_offset, c.inner_offset))
                    assert data is not None and len(data) == c.size
            return len(proxy.range_requests(layer.digest)) - before, ms[-1].blob_end - ms[0].blob_offset
        finally:
            await client.close()
            store.close()

    plain, _ = asyncio.run(read_all("plain", 300))
    windowed, span = asyncio.run(read_all("windowed", 1500, window_min=64 * 1024, window_max=64 * 1024))
    grown, _ = asyncio.run(read_all("grown", 1500, window_min=16 * 1024, window_max=512 * 1024))
    assert plain == 300
    assert span // (64 * 1024) <= windowed <= span // (48 * 1024) + 2, (windowed, span)
    # 16 + 32 + ... + 512 KiB, then 512 KiB a request.
    assert grown <= 6 + span // (384 * 1024) + 2 < windowed, (grown, windowed, span)


def test_window_grows_where_misses_cluster(tmp_path: Path, smallfiles: EStargzImage, proxy: TCPProxy) -> None:
    """Misses near recent demand ranges (not adjacent: imports from one directory) double the
    window up to its maximum; misses far apart (libraries across a base layer) stay at the minimum."""
    lo_w, hi_w = 16 * 1024, 256 * 1024  # reach: 128 KiB

    async def spans(name: str, gap: int, count: int) -> list[int]:
        """Demand one member ``gap`` bytes past the end of the previous request, ``count`` times:
        the byte span of each request."""
        client, store, layer, sched = await _open(tmp_path, smallfiles, proxy, name, window_min=lo_w,
                                                  window_max=hi_w)
        try:
            ms, out, pos = layer.members, [], 0
            for _ in range(count):
                m = next(m for m in ms if m.blob_offset >= pos)
                before = len(proxy.range_requests(layer.digest))
                await sched.fetch(layer, [m], "demand")
                await sched.drain()
                (req,) = proxy.range_requests(layer.digest)[before:]
                first, last = (int(x) for x in req.headers["range"].removeprefix("bytes=").split("-"))
                assert first <= m.blob_offset < last
                out.append(last + 1 - first)
                pos = last + 1 + gap
            return out
        finally:
            await client.close()
            store.close()

    clustered = asyncio.run(spans("clustered", 24 * 1024, 6))
    assert all(a < b for a, b in zip(clustered, clustered[1:5])), clustered  # 16, 32, 64, 128, 256 KiB
    # At 256 KiB the quarter behind reaches into the previous (stored) range, which it skips.
    assert hi_w // 2 < clustered[-2] <= hi_w and hi_w // 2 < clustered[-1] <= hi_w, clustered
    scattered = asyncio.run(spans("scattered", 200 * 1024, 6))
    assert all(s <= lo_w for s in scattered), scattered


def test_lying_registry_neighbour_is_refused_without_failing_the_read(
        tmp_path: Path, smallfiles: EStargzImage, registry: Registry, proxy: TCPProxy) -> None:
    """A registry that serves wrong bytes for a neighbour: the demanded file is stored and the
    read succeeds; the neighbour is not stored, and reading it fails with digest_mismatch."""
    esgz = smallfiles.layers[0]
    blob = bytearray(esgz.blob.read_bytes())

    async def run() -> None:
        client, store, good, sched = await _open(tmp_path, smallfiles, proxy, "lie", window_min=64 * 1024,
                                                 window_max=64 * 1024)
        try:
            ms = good.members
            k = len(ms) // 2
            victim = ms[k + 1]
            for i in range(victim.blob_offset + 20, victim.blob_end - 20, 7):
                blob[i] ^= 0x5A
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            await client.push_blob(Reference.parse(smallfiles.ref), digest, bytes(blob))
            # The same TOC, served from the tampered blob: a registry that lies about one member.
            lying = Layer.build(dataclasses.replace(good.meta, layer_digest=digest), good.toc, good.toc_path)
            await sched.fetch(lying, [ms[k]], "demand")
            await sched.drain()
            assert _stored(store, lying, ms[k])
            assert _stored(store, lying, ms[k + 2]) or ms[k + 2].blob_end - ms[k].blob_offset > 48 * 1024
            assert not _stored(store, lying, victim)
            assert sched.verify_errors >= 1
            with pytest.raises(ApiError) as err:
                await sched.fetch(lying, [victim], "demand")
            assert err.value.code == DIGEST_MISMATCH
            assert not _stored(store, lying, victim)
            # A read that waits on the neighbour while it is in flight gets the refusal too, not bytes.
            store.evict(lying.digest)
            first = asyncio.create_task(sched.fetch(lying, [ms[k]], "demand"))
            await asyncio.sleep(0)
            with pytest.raises(ApiError):
                await asyncio.gather(first, sched.fetch(lying, [victim], "demand"))
            await sched.drain()
            assert _stored(store, lying, ms[k]) and not _stored(store, lying, victim)
        finally:
            await client.close()
            store.close()

    asyncio.run(run())


def _walk(mountpoint: Path) -> float:
    """Read every file under ``mountpoint`` (``tar -cf - .``); seconds taken."""
    t0 = time.monotonic()
    subprocess.run(f"tar -C {mountpoint} -cf - . | wc -c", shell=True, check=True, capture_output=True)
    return time.monotonic() - t0


def test_walk_of_many_file_layer_keeps_background_fetch_going(
        daemon_factory, manyfiles: EStargzImage, registry: Registry, proxy: TCPProxy) -> None:
    """A full walk of a 10,000-file layer, with neighbour windows off (so every file is a demand
    miss and demand never pauses): background fetch still gets its share of the link, so the
    walk takes about a full download plus a walk of a cached layer, not 10,000 round trips."""
    layer = manyfiles.layers[0]
    d = daemon_factory(extra="background_delay = 0.5\ndemand_window_min = 0\ndemand_window_max = 0\n"
                             "background_share = 1\nbackground_share_after = 0.5\nbackground_batch_size = 1048576\n"
                             "prefetch = false").start()
    ref = via(manyfiles.ref, proxy)
    t0 = time.monotonic()
    with urllib.request.urlopen(f"http://{proxy.host}/v2/manyfiles/blobs/{layer.digest}") as resp:
        assert len(resp.read()) == layer.size
    download = time.monotonic() - t0
    with d.client() as c:
        mp = d.mountpoint("lazy")
        c.mount(ref, layer.digest, str(mp), layer.toc_digest)
        lazy = _walk(mp)
        background = c.status().totals.background_bytes
        cached_mp = d.mountpoint("cached")
        c.mount(ref, layer.digest, str(cached_mp), layer.toc_digest)  # a new mount: cold page cache
        cached = _walk(cached_mp)
    shared = d.log.read_text().count("admitted under")
    assert shared > 0, "background requests were admitted while demand went on"
    assert background > layer.size // 2, (background, layer.size)
    # The old fetcher (no share) took about 130 s here: about 75 files a second, one round trip each.
    bound = 4 * (download + cached) + 5
    assert lazy < bound, f"lazy walk {lazy:.1f}s, download {download:.2f}s, cached walk {cached:.1f}s"


def test_window_and_share_config_is_validated() -> None:
    from lazyd.config import DaemonConfig
    from lazyd.configfile import ConfigError

    cfg = DaemonConfig()
    assert 0 < cfg.demand_window_min <= cfg.demand_window_max <= cfg.max_range_size
    assert cfg.background_share == 1
    for bad, key in (({"demand_window_min": -1}, "demand_window_min"),
                     ({"demand_window_min": 1 << 20, "demand_window_max": 1 << 19}, "demand_window_max"),
                     ({"demand_window_max": 32 << 20}, "demand_window_max"),
                     ({"background_share": 9}, "background_share"),
                     ({"background_share_after": -1.0}, "background_share_after")):
        with pytest.raises(ConfigError, match=f"config key {key}"):
            DaemonConfig(**bad)
