"""The fetcher's scheduler against a real registry: coalescing, multi-range, prefetch, priorities."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.fetcher.layers import Layer, LayerTable, Member
from lazyd.fetcher.scheduler import PriorityGate, Scheduler, coalesce
from lazyd.registry import Reference, RegistryClient, RegistryConfig
from tests.daemon.conftest import via
from tests.support.estargz_images import EStargzImage
from tests.support.registry import Registry
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


def test_missing_by_key_range_and_by_key_agree(tmp_path: Path, busybox: EStargzImage, proxy: TCPProxy) -> None:
    """``missing`` asks the store by key range for members close together and key by key for
    members spread over the layer; both answer what ``has`` answers chunk by chunk."""
    async def run() -> None:
        client, store, layer, sched = await _setup(tmp_path, busybox, proxy, 1)
        try:
            members = list(layer.members)
            assert len(members) >= 30
            await sched.fetch(layer, members[3:7] + [members[11], members[20]], "demand")
            stored_now = {m.blob_offset for m in members
                          if all(store.has(k) for k in m.chunk_keys(layer.digest))}
            assert {members[i].blob_offset for i in (3, 4, 5, 6, 11, 20)} <= stored_now
            assert len(stored_now) < len(members)
            for asked in (members[:30], members[2:12], members[5:6], [members[0], members[-1]],
                          members[::7], [members[4], members[-2]], []):
                expected = [m for m in asked if m.blob_offset not in stored_now]
                assert sched.missing(layer, asked) == expected
            # A stored chunk of another layer at the same offsets does not count.
            other = "sha256:" + "0" * 64
            store.put_many([(ChunkKey(other, m.blob_offset, 0), b"x") for m in members[:30]])
            assert sched.missing(layer, members[:3]) == [m for m in members[:3] if m.blob_offset not in stored_now]
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
            loop = asyncio.get_running_loop()
            demand = asyncio.create_task(sched.fetch(layer, layer.members[:3], "demand"))
            await asyncio.sleep(0)  # the demand fetch has started
            waiter = asyncio.create_task(sched.wait_quiet(0.3))
            await demand
            ended = loop.time()
            assert layer.counters.demand_bytes > 0
            await asyncio.sleep(0.1)
            assert not waiter.done(), "background waits out the quiet period after the demand fetch"
            await asyncio.wait_for(waiter, 5)
            assert loop.time() - ended >= 0.29
            # A mount is foreground activity too: nothing is fetched in the background right after it.
            sched.note_activity()
            noted = loop.time()
            await sched.wait_quiet(0.3)
            assert loop.time() - noted >= 0.29
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


def test_one_long_range_is_streamed_member_by_member(tmp_path: Path, busybox: EStargzImage,
                                                     registry: Registry) -> None:
    """A read of the first member of a long prefetch is served when that member is in, not at the end."""
    with TCPProxy(registry.port, delay=0.02, chunk_size=16384) as slow:  # about 0.8 MB/s
        async def run() -> None:
            client, store, layer, sched = await _setup(tmp_path, busybox, slow, 1)
            try:
                members = big_file_members(layer)
                run_ = coalesce(members, None)[0]
                while len(run_) > 4 and run_[-2].blob_end - run_[0].blob_offset >= 600_000:
                    run_.pop()  # about 0.6 MB: long enough to see streaming, short enough to be quick
                assert len(run_) >= 4 and run_[-1].blob_end - run_[0].blob_offset >= 600_000
                before = await first_member_before_the_end(sched, slow, layer, run_)
                assert len(slow.range_requests(layer.digest)) == before + 1
                assert layer.counters.demand_bytes == 0
                assert layer.counters.prefetch_bytes == run_[-1].blob_end - run_[0].blob_offset
                assert sched.missing(layer, run_) == []
            finally:
                await client.close()
                store.close()

        asyncio.run(run())


def big_file_members(layer: Layer) -> list[Member]:
    """The members holding ``data/big.bin``'s chunks, in blob order."""
    big = layer.toc.lookup("data/big.bin")
    return sorted({layer.by_chunk[(c.blob_offset, c.inner_offset)].blob_offset: layer.by_chunk[
        (c.blob_offset, c.inner_offset)] for c in layer.toc.file_chunks(big)}.values(), key=lambda m: m.blob_offset)


async def first_member_before_the_end(sched: Scheduler, slow: TCPProxy, layer: Layer, members: list[Member]) -> int:
    """Prefetch ``members`` in one request through ``slow`` and check that a demand read of the
    first one is served long before the whole answer is in (it was streamed).  Returns the
    number of range requests made before the prefetch (footer and TOC reads)."""
    loop = asyncio.get_running_loop()
    before = len(slow.range_requests(layer.digest))
    whole = asyncio.create_task(sched.fetch(layer, members, "prefetch", max_range=None))
    while len(slow.range_requests(layer.digest)) == before:
        await asyncio.sleep(0.005)
    t0 = loop.time()
    await sched.fetch(layer, members[:1], "demand")  # waits on the prefetch's member, no request
    first = loop.time() - t0
    assert not whole.done(), f"the first member took {first:.2f}s: not streamed"
    await whole
    total = loop.time() - t0
    assert first < total / 3, (first, total)
    return before
