"""Registry errors and retries by kind, and fallbacks by reason: counted in the metrics and logged, against
the requests a fault-injecting proxy in front of the Debian ``docker-registry`` answered."""

from __future__ import annotations

import errno
import json

import pytest

from lazyd.api.messages import ApiError
from tests.faults.faultproxy import Fault, FaultProxy
from tests.support.estargz_images import EStargzImage
from tests.support.registry import Registry

from .conftest import DEMAND_ONLY, MetricsFactory
from .scrape import Scrape, scrape

NO_WINDOW = "demand_window_min = 0\ndemand_window_max = 0"
"""No neighbours: a read of a small file not fetched yet is one range GET."""


def kinds(s: Scrape, name: str) -> dict[str, float]:
    """The non-zero ``kind`` series of ``name``."""
    return {x.labels["kind"]: x.value for x in s.find(name) if x.value}


def test_errors_and_retries_by_kind(metrics_daemon: MetricsFactory, registry: Registry,
                                    busybox: EStargzImage) -> None:
    layer = busybox.layers[1]
    with FaultProxy(registry.host) as proxy:
        md = metrics_daemon(extra=f'{DEMAND_ONLY}\n{NO_WINDOW}\nlog_format = "json"',
                            registry_keys="retries = 3\nbackoff = 0.05")
        d = md.daemon
        ref = busybox.ref.replace(registry.host, proxy.host, 1)
        mp = d.mount_layer(ref, layer, "l1")
        s = scrape(md.address)
        assert kinds(s, "lazyd_registry_errors_total") == {} and kinds(s, "lazyd_registry_retries_total") == {}

        # Two 503s, then the answer: two errors, two retries, one read that works.
        since = proxy.inject(Fault("status", times=2, status=503))
        assert (mp / "data" / "file.txt").read_text() == "payload\n"
        assert [e.status for e in proxy.blob_gets(since)] == [503, 503, 206]
        # A 429: throttled, retried once.
        since = proxy.inject(Fault("status", times=1, status=429))
        assert (mp / "var" / "log" / "new.log").read_text() == "new\n"
        assert [e.status for e in proxy.blob_gets(since)] == [429, 206]
        s = scrape(md.address)
        assert kinds(s, "lazyd_registry_errors_total") == {"server": 2, "throttled": 1}
        assert kinds(s, "lazyd_registry_retries_total") == {"server": 2, "throttled": 1}

        # 404s are not retried: the read fails (the kernel may have asked more than once: a failed
        # readahead is followed by a read of its own).
        since = proxy.inject(Fault("status", status=404))
        with pytest.raises(OSError) as err:
            (mp / "data" / "big.bin").read_bytes()
        assert err.value.errno == errno.EIO
        proxy.clear()
        failed_gets = [e.status for e in proxy.blob_gets(since)]
        assert failed_gets and set(failed_gets) == {404}
        # A layer the registry does not have: the mount's HEAD is answered 404.
        with d.client() as c, pytest.raises(ApiError, match="not found"):
            c.mount(ref, "sha256:" + "e" * 64, str(d.mountpoint("missing")), "sha256:" + "f" * 64)
        assert sum(e.status == 404 for e in proxy.events()) == len(failed_gets) + 1
        s = scrape(md.address)
        assert kinds(s, "lazyd_registry_errors_total") == {"server": 2, "throttled": 1,
                                                            "not_found": len(failed_gets) + 1}
        assert kinds(s, "lazyd_registry_retries_total") == {"server": 2, "throttled": 1}

        # Fallbacks the snapshotter reports, by the error code their reason starts with.
        with d.client() as c:
            c.fallback(ref, layer.digest, "unauthorized: registry 127.0.0.1 denied the pull")
            c.fallback(ref, layer.digest, "unauthorized: again")
            c.fallback(ref, layer.digest, "the snapshotter had its own reasons")
        s = scrape(md.address)
        assert {x.labels["reason"]: x.value for x in s.find("lazyd_fallbacks_total")} == {"unauthorized": 2,
                                                                                         "other": 1}

    log = [json.loads(line) for line in d.log.read_text().splitlines()]
    retries = [r for r in log if r.get("event") == "retry"]
    assert [(r["kind"], r["level"]) for r in retries] == [("server", "INFO")] * 2 + [("throttled", "INFO")]
    assert all("HTTP 503" in r["message"] for r in retries[:2]) and "HTTP 429" in retries[2]["message"]
    assert [r["retry"] for r in retries] == [1, 2, 1]
    errors = [(r["event"], r["code"], r["level"]) for r in log if r.get("event") in ("registry_error", "mount_failed")]
    assert errors == [("registry_error", "not_found", "WARNING")] * len(failed_gets) + [
        ("mount_failed", "not_found", "WARNING")]
    fallbacks = [r for r in log if r.get("event") == "fallback"]
    assert [r["reason"] for r in fallbacks] == ["unauthorized: registry 127.0.0.1 denied the pull",
                                                "unauthorized: again", "the snapshotter had its own reasons"]
