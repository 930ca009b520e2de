"""A multi-range answer is streamed by the fetcher: each member is stored and its readers released
as soon as its part is in, not when the whole multipart answer has arrived."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lazyd.cache.store import ChunkKey
from lazyd.fetcher.scheduler import coalesce
from tests.daemon.test_scheduler import _setup, big_file_members, first_member_before_the_end
from tests.support.estargz_images import EStargzImage
from tests.support.registry import Registry
from tests.support.tcpproxy import TCPProxy


def test_multi_range_prefetch_releases_the_first_member_before_the_last_part(
        tmp_path: Path, busybox: EStargzImage, registry: Registry) -> None:
    """Every other member of a long file (scattered runs, one multi-range GET) through a slow link:
    a demand read of the first run's member waits on the prefetch's part, and is served while
    the tail of the answer is still on its way; counters add up to the bytes asked for."""
    with TCPProxy(registry.port, delay=0.02, chunk_size=16384) as slow:  # about 0.8 MB/s
        async def run() -> None:
            client, store, layer, sched = await _setup(tmp_path, busybox, slow, 1)
            try:
                members = big_file_members(layer)
                scattered = members[::2]
                while len(scattered) > 4 and sum(m.size for m in scattered[:-1]) >= 600_000:
                    scattered.pop()  # about 0.6 MB in several parts: long enough to see streaming
                runs = coalesce(scattered, None)
                assert len(runs) == len(scattered) >= 4, "the members must not be adjacent"
                before = await first_member_before_the_end(sched, slow, layer, scattered)
                reqs = slow.range_requests(layer.digest)[before:]
                assert len(reqs) == 1 and reqs[0].headers["range"].count(",") == len(scattered) - 1
                assert layer.counters.demand_bytes == 0
                assert layer.counters.prefetch_bytes == sum(m.size for m in scattered)
                assert layer.counters.registry_requests >= 1
                assert sched.missing(layer, scattered) == []
                for m in scattered:
                    for c in m.chunks:
                        assert store.has(ChunkKey(layer.digest, c.blob_offset, c.inner_offset))
                assert sched.missing(layer, members[1::2][: len(scattered) - 1]) != []
            finally:
                await client.close()
                store.close()

        asyncio.run(run())
