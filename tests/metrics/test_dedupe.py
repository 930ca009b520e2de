"""Requests saved by the fetcher's dedupe: 32 concurrent fetches of one chunk make one registry request,
and ``lazyd_dedupe_saved_*`` count the other 31."""

from __future__ import annotations

import threading

from lazyd.api.client import Client
from lazyd.estargz import TOC, decode_toc_member, read_footer
from tests.daemon.conftest import via
from tests.support.estargz_images import EStargzImage
from tests.support.registry import Registry
from tests.support.tcpproxy import TCPProxy

from .conftest import DEMAND_ONLY, MetricsFactory
from .scrape import scrape


def test_dedupe_saved_requests(metrics_daemon: MetricsFactory, registry: Registry, busybox: EStargzImage) -> None:
    layer = busybox.layers[1]
    data = layer.blob.read_bytes()
    footer = read_footer(data[-64:], len(data))
    toc = TOC.parse(decode_toc_member(data[footer.toc_offset: len(data) - footer.size]), None, footer.toc_offset)
    chunk = toc.file_chunks(toc.lookup("data/big.bin"))[5]
    assert chunk.blob_end is not None
    member_size = chunk.blob_end - chunk.blob_offset
    # A slow link: the first request is still in flight when the other 31 arrive.
    with TCPProxy(registry.port, delay=0.05) as proxy:
        md = metrics_daemon(extra=DEMAND_ONLY)
        d = md.daemon
        mp = d.mountpoint("l1")
        with d.client() as c:
            c.mount(via(busybox.ref, proxy), layer.digest, str(mp), layer.toc_digest)
        before = len(proxy.range_requests(layer.digest))
        s0 = scrape(md.address)
        assert (s0.value("lazyd_dedupe_saved_requests_total"), s0.value("lazyd_dedupe_saved_bytes_total")) == (0, 0)
        barrier = threading.Barrier(32)
        errors: list[Exception] = []

        def fetch() -> None:
            with Client(d.socket, timeout=60) as client:
                barrier.wait()
                try:
                    client.fetch(layer.digest, [(chunk.blob_offset, chunk.inner_offset)])
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

        threads = [threading.Thread(target=fetch) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert len(proxy.range_requests(layer.digest)) - before == 1
        s = scrape(md.address)
    assert s.value("lazyd_fetch_requests_total", priority="demand") == 1
    assert s.value("stargz_fs_operation_duration_microseconds_count", operation_type="read_on_demand",
                   layer=layer.digest) == 32
    assert s.value("lazyd_dedupe_saved_requests_total") == 31
    assert s.value("lazyd_dedupe_saved_bytes_total") == 31 * member_size
