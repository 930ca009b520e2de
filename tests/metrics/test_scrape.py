"""The metrics endpoint of a real ``lazyd serve``, scraped during a lazy read through FUSE, with the
values checked against what a byte-counting proxy in front of the Debian ``docker-registry`` saw
and against ``status``."""

from __future__ import annotations

import os
import threading
import time

from tests.daemon.conftest import via
from tests.support.estargz_images import EStargzImage
from tests.support.registry import Registry
from tests.support.tcpproxy import HTTPRequest, TCPProxy

from .conftest import DEMAND_ONLY, MetricsFactory
from .scrape import Scrape, scrape

BIG = "data/big.bin"
BIG_SIZE = 9 * 1024 * 1024 + 123
MS_LE = ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1024", "2048", "4096", "8192", "16384", "+Inf"]
US_LE = ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1024", "+Inf"]


def range_bytes(req: HTTPRequest) -> int:
    """Bytes a ``Range: bytes=a-b[,c-d...]`` request asks for."""
    spec = req.headers["range"].removeprefix("bytes=")
    return sum(int(end) - int(start) + 1 for start, end in (part.split("-") for part in spec.split(",")))


def blob_gets(proxy: TCPProxy, digest: str) -> list[HTTPRequest]:
    return [r for r in proxy.requests() if r.method == "GET" and r.path.endswith(f"/blobs/{digest}")]


def check_histogram(s: Scrape, name: str, les: list[str], **labels: str) -> tuple[float, float]:
    """The reference's buckets, cumulative, ``+Inf`` = ``_count``; returns (count, sum)."""
    buckets = s.find(f"{name}_bucket", **labels)
    assert [b.labels["le"] for b in buckets] == les, buckets
    values = [b.value for b in buckets]
    assert values == sorted(values), values
    count, total = s.value(f"{name}_count", **labels), s.value(f"{name}_sum", **labels)
    assert values[-1] == count
    return count, total


def test_scrape_during_lazy_read_matches_proxy(metrics_daemon: MetricsFactory, registry: Registry,
                                               busybox: EStargzImage) -> None:
    layer = busybox.layers[1]  # holds data/big.bin: 9 MiB of random bytes in 256 KiB chunks
    # A slow link (one 64 KiB chunk per 10 ms, about 6 MB/s) so that the read takes over a second.
    with TCPProxy(registry.port, delay=0.01) as proxy:
        md = metrics_daemon(extra=DEMAND_ONLY)
        d = md.daemon
        mp = d.mount_layer(via(busybox.ref, proxy), layer, "l1")
        # The mount fetched footer and TOC: each GET of the blob is one remote_registry_get.
        s0 = scrape(md.address)
        assert s0.content_type.startswith("text/plain; version=0.0.4"), s0.content_type
        mount_gets = blob_gets(proxy, layer.digest)
        assert mount_gets, "the mount fetched the TOC through the proxy"
        count0, _ = check_histogram(s0, "stargz_fs_operation_duration_milliseconds", MS_LE,
                                    operation_type="remote_registry_get", layer=layer.digest)
        assert count0 == len(mount_gets)
        assert s0.value("stargz_fs_operation_duration_milliseconds_count", operation_type="mount",
                        layer=layer.digest) == 1
        assert s0.get("stargz_fs_bytes_served", operation_type="on_demand_bytes_fetched", layer=layer.digest) == 0
        for op in ("stargz_footer_get", "stargz_toc_get", "stargz_toc_json_deserialize"):
            assert s0.value("stargz_fs_operation_duration_milliseconds_count", operation_type=op,
                            layer=layer.digest) == 1, op

        # Read the big file in a thread and scrape all the while.
        result: dict[str, object] = {}

        def read() -> None:
            started = time.monotonic()
            try:
                result["data"] = (mp / BIG).read_bytes()
            except OSError as exc:
                result["error"] = exc
            result["seconds"] = time.monotonic() - started

        reader = threading.Thread(target=read)
        reader.start()
        scrapes: list[Scrape] = []
        while reader.is_alive():
            scrapes.append(scrape(md.address))
            time.sleep(0.05)
        reader.join()
        assert "error" not in result, result.get("error")
        assert len(result["data"]) == BIG_SIZE  # type: ignore[arg-type]
        final = scrape(md.address)
        with d.client() as c:
            status = c.status()
        (mount,) = status.mounts

    fetched = [s.get("stargz_fs_bytes_served", operation_type="on_demand_bytes_fetched", layer=layer.digest)
               for s in (s0, *scrapes, final)]
    assert fetched == sorted(fetched), f"on_demand_bytes_fetched went down: {fetched}"
    during = [v for v in fetched[1:-1] if 0 < v < fetched[-1]]
    print(f"read of {BIG_SIZE} bytes took {result['seconds']:.2f}s; {len(scrapes)} scrapes during it "
          f"(slowest {max(s.seconds for s in scrapes) * 1e3:.0f} ms), {len(during)} saw the read part-way")
    assert during, "no scrape answered while the read was fetching"
    assert max(s.seconds for s in scrapes) < 2.0, "a scrape waited for the read"

    # Against the proxy: every GET of the blob after the mount was an on-demand range request.
    gets = blob_gets(proxy, layer.digest)
    demand_gets = gets[len(mount_gets):]
    demand_bytes = sum(range_bytes(r) for r in demand_gets)
    assert all("range" in r.headers for r in gets)
    count, total_ms = check_histogram(final, "stargz_fs_operation_duration_milliseconds", MS_LE,
                                      operation_type="remote_registry_get", layer=layer.digest)
    assert count == len(gets) and total_ms > 0
    assert final.value("stargz_fs_operation_count", operation_type="on_demand_remote_registry_fetch_count",
                       layer=layer.digest) == len(demand_gets)
    assert fetched[-1] == demand_bytes >= BIG_SIZE
    assert final.value("lazyd_fetched_bytes_total", priority="demand") == demand_bytes
    assert final.value("lazyd_fetch_requests_total", priority="demand") == len(demand_gets)
    assert final.value("lazyd_fetched_bytes_total", priority="prefetch") == 0
    # Body bytes counted by the client vs. bytes the proxy forwarded (bodies plus response heads).
    received = final.value("lazyd_registry_received_bytes_total")
    requests = final.value("lazyd_registry_requests_total")
    assert requests == len(proxy.requests())
    assert 0 < proxy.bytes_down - received <= 1024 * requests, (proxy.bytes_down, received, requests)

    # The reference's per-layer metrics against status.
    labels = {"digest": layer.digest, "mountpoint": str(mp)}
    assert final.value("stargz_fs_layer_size_bytes", **labels) == mount.layer.layer_size == layer.size
    assert final.value("stargz_fs_layer_fetched_size_bytes", **labels) == mount.layer.fetched_bytes == demand_bytes
    assert final.value("stargz_fs_layer_prefetch_size_bytes", **labels) == mount.layer.prefetch_bytes == 0

    # The workers' counters, collected at scrape time.
    assert final.value("stargz_fs_operation_count", operation_type="on_demand_read_access_count",
                       layer=layer.digest) == mount.reads > 0
    assert final.value("stargz_fs_bytes_served", operation_type="on_demand_bytes_served",
                       layer=layer.digest) == mount.bytes_read == BIG_SIZE
    hits, misses = final.value("lazyd_cache_hits_total"), final.value("lazyd_cache_misses_total")
    assert (hits, misses) == (mount.cache_hits, mount.cache_misses) and misses > 0
    assert final.value("lazyd_cache_hit_ratio") == hits / (hits + misses)
    assert final.value("lazyd_workers_unanswered") == 0
    assert final.value("lazyd_workers", state="ready") == 1
    assert final.value("lazyd_mounts", state="ready") == 1
    # Each demand fetch a worker sent is timed in the reference's microsecond histogram.
    reads, _ = check_histogram(final, "stargz_fs_operation_duration_microseconds", US_LE,
                               operation_type="read_on_demand", layer=layer.digest)
    assert reads >= 1

    # The chunk store, against status and its files (the SQLite shared-memory file is not counted).
    cache_bytes = final.value("lazyd_cache_bytes")
    on_disk = sum(f.stat().st_size for f in (d.root / "cache").rglob("*") if f.is_file())
    assert cache_bytes == status.cache.size and final.value("lazyd_cache_chunks") == status.cache.count
    assert BIG_SIZE <= cache_bytes and abs(on_disk - cache_bytes) <= 64 * 1024, (cache_bytes, on_disk)
    assert final.value("lazyd_cache_limit_bytes") == 1073741824
    assert final.value("lazyd_cache_evictions_total") == 0

    # Types, as the reference has them where prometheus-client can write them.
    assert final.types["stargz_fs_operation_duration_milliseconds"] == "histogram"
    assert final.types["stargz_fs_bytes_served"] == "gauge"
    assert final.types["stargz_fs_operation_count"] == "unknown"
    assert final.types["lazyd_registry_errors"] == "counter"
    assert os.path.ismount(mp)


def test_prefetch_and_background_fetch(metrics_daemon: MetricsFactory, registry: Registry,
                                       busybox: EStargzImage) -> None:
    layer = busybox.layers[0]  # /bin/busybox is prioritized: the prefetch fetches it
    with TCPProxy(registry.port) as proxy:
        md = metrics_daemon(extra="background_delay = 0.2")
        d = md.daemon
        mp = d.mountpoint("l0")
        with d.client() as c:
            c.mount(via(busybox.ref, proxy), layer.digest, str(mp), layer.toc_digest)

            def done() -> bool:
                (m,) = c.status().mounts
                return m.layer.background_state == "done"

            deadline = time.monotonic() + 60
            while not done():
                assert time.monotonic() < deadline, "the background fetch did not finish"
                time.sleep(0.1)
            (mount,) = c.status().mounts
        s = scrape(md.address)
        # All but the TOC's read, which ends with the footer: the prefetch starts during the mount.
        later = [r for r in blob_gets(proxy, layer.digest) if not r.headers["range"].endswith(f"-{layer.size - 1}")]
        assert len(later) < len(blob_gets(proxy, layer.digest))
    assert mount.layer.prefetch_state == "done" and mount.layer.prefetch_bytes > 0
    assert mount.layer.demand_bytes == 0
    for op in ("prefetch_download", "background_fetch_total"):
        assert s.value("stargz_fs_operation_duration_milliseconds_count", operation_type=op, layer=layer.digest) == 1
    assert s.value("stargz_fs_operation_duration_milliseconds_count", operation_type="background_fetch_download",
                   layer=layer.digest) >= 1
    assert s.value("lazyd_fetched_bytes_total", priority="prefetch") == mount.layer.prefetch_bytes
    assert s.value("lazyd_fetched_bytes_total", priority="background") == mount.layer.background_bytes
    assert sum(range_bytes(r) for r in later) == mount.layer.prefetch_bytes + mount.layer.background_bytes
    assert s.value("lazyd_fetch_requests_total", priority="prefetch") + s.value(
        "lazyd_fetch_requests_total", priority="background") == len(later)
    labels = {"digest": layer.digest, "mountpoint": str(mp)}
    assert s.value("stargz_fs_layer_prefetch_size_bytes", **labels) == mount.layer.prefetch_bytes
    assert s.value("stargz_fs_layer_fetched_size_bytes", **labels) == mount.layer.fetched_bytes
    log = d.log.read_text()
    assert f"prefetch of layer {layer.digest} done: {mount.layer.prefetch_bytes} bytes fetched in " in log
    assert f"background fetch of layer {layer.digest} done: {mount.layer.background_bytes} bytes fetched in " in log
