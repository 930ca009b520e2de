"""Requests saved by the fetcher's dedupe: 32 concurrent fetches of one chunk make one registry request,
and ``lazyd_dedupe_saved_*`` count the other 31."""

from __future__ import annotations

from tests.daemon.conftest import via
from tests.support.estargz_images import EStargzImage
from tests.support.layer_fetch import fetch_concurrently, toc_of
from tests.support.registry import Registry
from tests.support.tcpproxy import TCPProxy

from .conftest import DEMAND_ONLY, MetricsFactory
from .scrape import scrape


def test_dedupe_saved_requests(metrics_daemon: MetricsFactory, registry: Registry, busybox: EStargzImage) -> None:
    layer = busybox.layers[1]
    toc = toc_of(layer.blob)
    chunk = toc.file_chunks(toc.lookup("data/big.bin"))[5]
    assert chunk.blob_end is not None
    member_size = chunk.blob_end - chunk.blob_offset
    # A slow link: the first request is still in flight when the other 31 arrive.
    with TCPProxy(registry.port, delay=0.05) as proxy:
        md = metrics_daemon(extra=DEMAND_ONLY)
        d = md.daemon
        d.mount_layer(via(busybox.ref, proxy), layer, "l1")
        before = len(proxy.range_requests(layer.digest))
        s0 = scrape(md.address)
        assert (s0.value("lazyd_dedupe_saved_requests_total"), s0.value("lazyd_dedupe_saved_bytes_total")) == (0, 0)
        errors = fetch_concurrently(d.socket, layer.digest, [(chunk.blob_offset, chunk.inner_offset)])
        assert not errors
        assert len(proxy.range_requests(layer.digest)) - before == 1
        s = scrape(md.address)
    assert s.value("lazyd_fetch_requests_total", priority="demand") == 1
    assert s.value("stargz_fs_operation_duration_microseconds_count", operation_type="read_on_demand",
                   layer=layer.digest) == 32
    assert s.value("lazyd_dedupe_saved_requests_total") == 31
    assert s.value("lazyd_dedupe_saved_bytes_total") == 31 * member_size
