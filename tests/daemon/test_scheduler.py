"""The fetcher's scheduler against a real registry: coalescing, multi-range, prefetch, priorities."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.fetcher.layers import LayerTable
from lazyd.fetcher.scheduler import PriorityGate, Scheduler, coalesce
from lazyd.registry import Reference, RegistryClient, RegistryConfig
from tests.daemon.conftest import via
from tests.support.estargz_images import EStargzImage
from tests.support.tcpproxy import TCPProxy


async def _setup(tmp_path: Path, image: EStargzImage, proxy: TCPProxy, index: int):
    client = RegistryClient(RegistryConfig(hosts_dir=str(tmp_path / "certs.d"), retries=0))
    store = ChunkStore(tmp_path / "cache", 1 << 30)
    table = LayerTable(tmp_path, client)
    layer = await table.open(Reference.parse(via(image.ref, proxy)), image.layers[index].digest,
                             image.layers[index].toc_digest, 30)
    return client, store, layer, Scheduler(client, store, 4, 16 << 20)


def test_adjacent_chunks_coalesce_into_one_range(tmp_path: Path, busybox: EStargzImage, proxy: TCPProxy) -> None:
    async def run() -> None:
        client, store, layer, sched = await _setup(tmp_path, busybox, proxy, 1)
        try:
            big = layer.toc.lookup("data/big.bin")
            members = sorted({layer.by_chunk[(c.blob_offset, c.inner_offset)].blob_offset: layer.by_chunk[
                (c.blob_offset, c.inner_offset)] for c in layer.toc.file_chunks(big)}.values(),
                key=lambda m: m.blob_offset)
            assert len(members) >= 30
            before = len(proxy.range_requests(layer.digest))
            await sched.fetch(layer, members[2:6], "demand")
            reqs = proxy.range_requests(layer.digest)[before:]
            assert len(reqs) == 1
            assert reqs[0].headers["range"] == f"bytes={members[2].blob_offset}-{members[5].blob_end - 1}"
            # Non-adjacent members: one multi-range request.
            await sched.fetch(layer, [members[10], members[12], members[20]], "demand")
            reqs = proxy.range_requests(layer.digest)[before + 1:]
            assert len(reqs) == 1 and reqs[0].headers["range"].count(",") == 2
            for m in members[2:6] + [members[10], members[12], members[20]]:
                for c in m.chunks:
                    assert store.has(ChunkKey(layer.digest, c.blob_offset, c.inner_offset))
            # Already stored: no request at all.
            await sched.fetch(layer, members[2:6], "demand")
            assert len(proxy.range_requests(layer.digest)) == before + 2
            assert layer.counters.demand_bytes == sum(m.size for m in members[2:6]) + sum(
                m.size for m in (members[10], members[12], members[20]))
        finally:
            await client.close()
            store.close()

    asyncio.run(run())


def test_prefetch_region_in_one_request(tmp_path: Path, busybox: EStargzImage, proxy: TCPProxy) -> None:
    async def run() -> None:
        client, store, layer, sched = await _setup(tmp_path, busybox, proxy, 0)
        try:
            end = layer.toc.prefetch_end
            assert end, "layer 0 was built with a prioritized file"
            before = len(proxy.range_requests(layer.digest))
            region = [m for m in layer.members if m.blob_offset < end]
            await sched.fetch(layer, region, "prefetch", max_range=None)
            (req,) = proxy.range_requests(layer.digest)[before:]
            start = region[0].blob_offset
            assert req.headers["range"] == f"bytes={start}-{end - 1}"
            entry = layer.toc.lookup("bin/busybox")
            for c in layer.toc.file_chunks(entry):
                assert store.has(ChunkKey(layer.digest, c.blob_offset, c.inner_offset))
            assert layer.counters.prefetch_bytes == end - start
        finally:
            await client.close()
            store.close()

    asyncio.run(run())


def test_priority_gate_orders_waiters() -> None:
    async def run() -> list[str]:
        gate = PriorityGate(1)
        order: list[str] = []
        await gate.acquire(0)

        async def waiter(name: str, rank: int) -> None:
            await gate.acquire(rank)
            order.append(name)
            gate.release()

        tasks = [asyncio.create_task(waiter("background", 2)), asyncio.create_task(waiter("prefetch", 1)),
                 asyncio.create_task(waiter("demand", 0))]
        await asyncio.sleep(0.01)
        gate.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == ["demand", "prefetch", "background"]


def test_background_waits_while_demand_is_active(tmp_path: Path, busybox: EStargzImage, proxy: TCPProxy) -> None:
    async def run() -> None:
        client, store, layer, sched = await _setup(tmp_path, busybox, proxy, 1)
        try:
            sched._demand += 1  # a demand fetch is running
            sched.demand_idle.clear()
            done = asyncio.Event()

            async def background() -> None:
                await sched.demand_idle.wait()
                await sched.fetch(layer, layer.members[:3], "background")
                done.set()

            task = asyncio.create_task(background())
            await asyncio.sleep(0.3)
            assert not done.is_set() and layer.counters.background_bytes == 0
            sched._demand -= 1
            sched.demand_idle.set()
            await asyncio.wait_for(task, 30)
            assert layer.counters.background_bytes > 0
        finally:
            await client.close()
            store.close()

    asyncio.run(run())


def test_coalesce_respects_max_size() -> None:
    from lazyd.fetcher.layers import Member

    ms = [Member(i * 100, i * 100 + 100, ()) for i in range(10)] + [Member(2000, 2100, ())]
    runs = coalesce(ms, 300)
    assert [len(r) for r in runs] == [3, 3, 3, 1, 1]
    assert [len(r) for r in coalesce(ms, None)] == [10, 1]


def test_wait_quiet_holds_background_until_demand_has_been_idle(tmp_path: Path, busybox: EStargzImage,
                                                                 proxy: TCPProxy) -> None:
    async def run() -> None:
        client, store, layer, sched = await _setup(tmp_path, busybox, proxy, 1)
        try:
            loop = asyncio.get_running_loop()
            await sched.fetch(layer, layer.members[:1], "demand")  # a demand fetch just ended
            start = loop.time()
            waiter = asyncio.create_task(sched.wait_quiet(0.6))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            await sched.fetch(layer, layer.members[1:2], "demand")  # another read restarts the quiet period
            restarted = loop.time()
            await asyncio.wait_for(waiter, 5)
            assert loop.time() - restarted >= 0.55 and loop.time() - start >= 0.85
        finally:
            await client.close()
            store.close()

    asyncio.run(run())
