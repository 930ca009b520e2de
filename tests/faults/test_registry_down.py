"""The registry gone (every connection refused) and back, under a mounted layer.

While it is gone a read of an uncached chunk fails with EIO once the retries are spent;
cached reads go on; once it is back the same read works on the same mount (no remount).
tests/e2e/test_registry_down.py covers the same with the daemon and snapshotter restarted
in between; here the daemon stays up and the outage is timed.
"""

from __future__ import annotations

import errno
import threading
import time

import pytest

from .conftest import (ONE_REQUEST_PER_READ, RETRY_BUDGET, FaultImage, FaultReport, Measurement, MountFactory, Read,
                       small, timed_read)
from .faultproxy import FaultProxy

SHORT_OUTAGE = 2.0
"""Less than the retry budget (0.5 + 1 + 2 s of backoff): a read in progress rides it out."""
LONG_OUTAGE = 30.0
"""What lazyd issue 13 asks for."""


@pytest.mark.timeout(120)
def test_outage_shorter_than_the_retries_is_ridden_out(request: pytest.FixtureRequest, proxy: FaultProxy,
                                                       mount_via: MountFactory, fault_image: FaultImage,
                                                       fault_report: FaultReport) -> None:
    m = mount_via(proxy.host, extra=ONE_REQUEST_PER_READ)
    got: list[Read] = []
    down = proxy.go_down()
    reader = threading.Thread(target=lambda: got.append(timed_read(m.path / small(0))))
    reader.start()
    time.sleep(SHORT_OUTAGE - (time.monotonic() - down))
    up = proxy.come_up()
    reader.join(60)
    (read,) = got
    gets = proxy.blob_gets(up)
    fault_report.add(Measurement(
        request.node.name, f"registry down {SHORT_OUTAGE:.0f} s (connections refused)",
        "right bytes, no error", len(gets), 0, read.seconds, None, read.end - up))
    assert read.result == fault_image.files[small(0)], f"the reader saw {read.result!r}"[:300]
    assert read.end >= up, "the read cannot have succeeded while the registry was down"
    assert len(gets) == 1
    m.assert_not_remounted()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_outage_of_30s_gives_eio_then_the_same_read_works_without_a_remount(
        request: pytest.FixtureRequest, proxy: FaultProxy, mount_via: MountFactory, fault_image: FaultImage,
        fault_report: FaultReport) -> None:
    m = mount_via(proxy.host, extra=ONE_REQUEST_PER_READ)
    files = fault_image.files
    assert timed_read(m.path / small(1)).result == files[small(1)]  # now cached
    path = m.path / small(0)
    reads: list[Read] = []
    stop = threading.Event()

    def reader() -> None:
        """A user retrying the same read until it works (at most 90 s)."""
        deadline = time.monotonic() + LONG_OUTAGE + 60
        while not stop.is_set() and time.monotonic() < deadline:
            r = timed_read(path)
            reads.append(r)
            if not isinstance(r.result, OSError):
                return
            time.sleep(0.2)

    down = proxy.go_down()
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        time.sleep(5)
        cached = timed_read(m.path / small(1))
        assert cached.result == files[small(1)], "a cached read must not need the registry"
        with m.daemon.client() as c:
            check = c.check(str(m.path))
        assert check.served and not check.registry_reachable and not check.cached, check
        info = m.info()
        assert info.state == "ready" and info.error and "unreachable" in info.error, info
        time.sleep(max(0.0, LONG_OUTAGE - (time.monotonic() - down)))
        up = proxy.come_up()
        thread.join(60)
    finally:
        stop.set()
        thread.join(10)
    failed = [r for r in reads if isinstance(r.result, OSError)]
    last = reads[-1]
    fault_report.add(Measurement(
        request.node.name, f"registry down {LONG_OUTAGE:.0f} s (connections refused)",
        f"EIO after {failed[0].seconds:.1f} s per read" if failed else "no error", len(proxy.blob_gets(up)),
        0, last.seconds, failed[0].seconds if failed else None, last.end - up,
        {"eio_reads": len(failed), "cached_read_seconds": round(cached.seconds, 4)}))
    assert last.result == files[small(0)], f"the read did not work once the registry was back: {last.result!r}"[:300]
    assert failed and all(r.result.errno == errno.EIO for r in failed), [r.result for r in failed]  # type: ignore[union-attr]
    assert all(r.start < up for r in failed), "a read started after the registry was back failed"
    assert min(r.seconds for r in failed) >= RETRY_BUDGET - 0.05, "EIO before the retries were spent"
    m.assert_not_remounted()
