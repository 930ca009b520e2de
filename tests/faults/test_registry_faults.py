"""Registry faults under a mounted layer: a reader gets the right bytes, or EIO, never wrong bytes.

A real ``lazyd serve`` mounts the layer through a ``FaultProxy`` in front of the real
registry (``[registry] timeout = 2``, ``retries = 3``, ``backoff = 0.5``).  Reads of one
small file are one range GET each (no neighbour window), so the proxy's log counts a
reader's retries exactly.  For each fault the test measures what the reader saw, and how
long it took, and adds it to the session's report (docs/reliability.md, "Registry faults").

The registry client on its own, behind similar fronts, is tested in
tests/registry/test_fronts.py (connections cut mid-body and 503s retried, a cut body
resumed from the next byte, a hanging front timed out, altered blobs caught by digest).
"""

from __future__ import annotations

import errno

import pytest

from .conftest import (BACKOFF, BIG, ONE_REQUEST_PER_READ, REGISTRY_TIMEOUT, RETRIES, RETRY_BUDGET, FaultImage,
                       FaultReport, Measurement, MountFactory, Read, small, timed_read)
from .faultproxy import Event, Fault, FaultProxy

pytestmark = pytest.mark.timeout(180)

TRANSIENT = [
    pytest.param(Fault("reset", times=2, at=0.25), "reset mid-body, 2 answers", id="reset"),
    pytest.param(Fault("status", times=2, status=500), "HTTP 500, 2 answers", id="500"),
    pytest.param(Fault("status", times=2, status=503), "HTTP 503, 2 answers", id="503"),
    pytest.param(Fault("status", times=2, status=429, retry_after=1), "HTTP 429 + Retry-After: 1, 2 answers",
                 id="429"),
    pytest.param(Fault("stall", times=1, stall=3 * REGISTRY_TIMEOUT), "stall 6 s before headers, 1 request",
                 id="stall-headers"),
    pytest.param(Fault("stall", times=1, stall=3 * REGISTRY_TIMEOUT, mid_body=True),
                 "stall 6 s mid-body, 1 request", id="stall-body"),
    pytest.param(Fault("truncate", times=2, at=0.5), "truncated body (FIN), 2 answers", id="truncate"),
]


def _eio(read: Read) -> bool:
    return isinstance(read.result, OSError) and read.result.errno == errno.EIO


def _describe(read: Read) -> str:
    return f"EIO after {read.seconds:.2f}s" if _eio(read) else f"{read.result!r}"[:200]


@pytest.mark.parametrize(("fault", "name"), TRANSIENT)
def test_transient_fault_is_retried_and_the_read_succeeds(request: pytest.FixtureRequest, fault: Fault, name: str,
                                                          proxy: FaultProxy, mount_via: MountFactory,
                                                          fault_image: FaultImage, fault_report: FaultReport) -> None:
    m = mount_via(proxy.host, extra=ONE_REQUEST_PER_READ)
    files = fault_image.files
    clean = timed_read(m.path / small(1))
    assert clean.result == files[small(1)]
    since = proxy.inject(fault)
    read = timed_read(m.path / small(0))
    gets = proxy.blob_gets(since)
    faulted = [e for e in gets if e.fault]
    ok = read.result == files[small(0)]
    fault_report.add(Measurement(
        request.node.name, name, f"right bytes after {len(faulted)} retries" if ok else _describe(read),
        len(gets), len(faulted), read.seconds, read.seconds if _eio(read) else None,
        read.seconds - clean.seconds if ok else None, {"fault_free_read_seconds": round(clean.seconds, 4)}))
    assert not isinstance(read.result, OSError), f"the reader saw {read.result!r}\n{m.daemon.lazyd.log_text()[-3000:]}"
    assert ok, "wrong bytes reached the reader"
    assert len(faulted) == fault.times, "the fault was not hit as often as injected"
    assert len(gets) == fault.times + 1, f"one clean GET after the faulted ones, not {gets}"
    _assert_backoff(gets, stalled=fault.kind == "stall")
    # A multi-chunk read (sixteen 512 KiB chunks, one GET each) through the same fault.
    proxy.inject(fault)
    big = timed_read(m.path / BIG)
    assert not isinstance(big.result, OSError), f"the reader saw {big.result!r}"
    assert big.result == files[BIG], "wrong bytes reached the reader"
    assert proxy.applied() == fault.times
    m.assert_not_remounted()


def _assert_backoff(gets: list[Event], stalled: bool) -> None:
    """Each retry waits at least the doubling backoff (plus the timeout, after a stall)."""
    for i, (a, b) in enumerate(zip(gets, gets[1:])):
        least = BACKOFF * 2 ** i + (REGISTRY_TIMEOUT if stalled else 0.0)
        assert b.start - a.start >= least - 0.02, f"retry {i + 1} came {b.start - a.start:.3f}s after the " \
                                                  f"previous request, before the backoff of {least}s"


PERSISTENT = [
    pytest.param(Fault("status", status=503), "HTTP 503 on every request", id="503"),
    pytest.param(Fault("stall", stall=60.0), "stall (no answer) on every request", id="stall"),
    pytest.param(Fault("reset", at=0.25), "reset mid-body on every request", id="reset"),
]


@pytest.mark.parametrize(("fault", "name"), PERSISTENT)
def test_persistent_fault_gives_eio_after_the_retries_then_the_same_read_works(
        request: pytest.FixtureRequest, fault: Fault, name: str, proxy: FaultProxy, mount_via: MountFactory,
        fault_image: FaultImage, fault_report: FaultReport) -> None:
    """The reader gets EIO once the retries are spent, and the same read works once the fault stops.

    The kernel reads a page again (one synchronous FUSE read) after its readahead failed, so a
    reader's read() is two FUSE reads here, each a full round of 1 + ``retries`` requests."""
    m = mount_via(proxy.host, extra=ONE_REQUEST_PER_READ)
    path = m.path / small(0)
    since = proxy.inject(fault)
    failed = timed_read(path)
    gets = proxy.blob_gets(since)
    assert _eio(failed), f"the reader saw {failed.result!r}"
    info = m.info()
    assert info.state == "ready" and info.error and fault_image.layer.digest in info.error, info
    cleared = proxy.clear()
    again = timed_read(path)  # the same read, on the same mount, once the registry behaves
    rounds = info.fetch_errors  # FUSE reads that ended in EIO
    fault_report.add(Measurement(
        request.node.name, name, f"EIO ({rounds} FUSE reads x {len(gets) // max(rounds, 1)} requests)", len(gets),
        len(gets), failed.seconds, failed.seconds, again.end - cleared,
        {"fuse_reads_failed": rounds, "error": info.error[:160]}))
    assert again.result == fault_image.files[small(0)]
    m.assert_not_remounted()
    assert rounds in (1, 2), info
    assert len(gets) == rounds * (1 + RETRIES), f"expected {rounds} x (first try + {RETRIES} retries), got {gets}"
    for r in range(rounds):
        _assert_backoff(gets[r * (1 + RETRIES):(r + 1) * (1 + RETRIES)], stalled=fault.kind == "stall")
    per_round = RETRY_BUDGET + (1 + RETRIES) * (REGISTRY_TIMEOUT if fault.kind == "stall" else 0.0)
    assert failed.seconds >= rounds * per_round - 0.05


def test_flipped_bytes_are_never_served(request: pytest.FixtureRequest, proxy: FaultProxy, mount_via: MountFactory,
                                        fault_image: FaultImage, fault_report: FaultReport) -> None:
    """Every answer corrupted (one byte inverted): EIO, never the wrong bytes; right ones once it stops."""
    m = mount_via(proxy.host, extra=ONE_REQUEST_PER_READ)
    files = fault_image.files
    since = proxy.inject(Fault("flip"))
    bad = [timed_read(m.path / small(i)) for i in range(3)]
    big = timed_read(m.path / BIG)
    gets = proxy.blob_gets(since)
    assert all(_eio(r) for r in bad), [r.result for r in bad]
    assert _eio(big), f"a read of a corrupted chunk must fail, got {big.result!r}"[:300]
    info = m.info()
    assert info.layer.verify_errors >= 3, info.layer
    cleared = proxy.clear()
    again = timed_read(m.path / small(0))
    fault_report.add(Measurement(
        request.node.name, "1 byte flipped in every answer", "EIO after the retries (verification failed every time)", len(gets),
        len(gets), bad[0].seconds, bad[0].seconds, again.end - cleared,
        {"verify_errors": info.layer.verify_errors}))
    assert again.result == files[small(0)]
    assert timed_read(m.path / BIG).result == files[BIG]
    m.assert_not_remounted()


def test_one_corrupted_answer_is_refetched(
        request: pytest.FixtureRequest, proxy: FaultProxy, mount_via: MountFactory, fault_image: FaultImage,
        fault_report: FaultReport) -> None:
    """One corrupted answer: the chunk fails verification and lazyd fetches it again after its
    backoff (a corrupted answer is a transient fault), right this time: one FUSE read, no EIO."""
    m = mount_via(proxy.host, extra=ONE_REQUEST_PER_READ)
    since = proxy.inject(Fault("flip", times=1))
    read = timed_read(m.path / small(0))
    gets = proxy.blob_gets(since)
    info = m.info()
    ok = read.result == fault_image.files[small(0)]
    fault_report.add(Measurement(
        request.node.name, "1 byte flipped, 1 answer", "right bytes after 1 refetch" if ok else _describe(read),
        len(gets), 1, read.seconds, None if ok else read.seconds, read.seconds if ok else None,
        {"verify_errors": info.layer.verify_errors, "fuse_reads_failed": info.fetch_errors}))
    assert ok, f"the reader saw {_describe(read)}"
    assert info.layer.verify_errors == 1 and len(gets) == 2, (info.layer, gets)
    m.assert_not_remounted()


def test_two_corrupted_answers_are_refetched_like_any_transient_fault(
        request: pytest.FixtureRequest, proxy: FaultProxy, mount_via: MountFactory, fault_image: FaultImage,
        fault_report: FaultReport) -> None:
    m = mount_via(proxy.host, extra=ONE_REQUEST_PER_READ)
    since = proxy.inject(Fault("flip", times=2))
    read = timed_read(m.path / small(0))
    gets = proxy.blob_gets(since)
    info = m.info()
    ok = read.result == fault_image.files[small(0)]
    fault_report.add(Measurement(
        request.node.name, "1 byte flipped, 2 answers", "right bytes" if ok else _describe(read), len(gets), 2,
        read.seconds, None if ok else read.seconds, None,
        {"verify_errors": info.layer.verify_errors, "fuse_reads_failed": info.fetch_errors}))
    assert isinstance(read.result, OSError) or ok, "wrong bytes reached the reader"
    assert ok, f"the reader saw {_describe(read)} after {len(gets)} requests"


def test_429_retry_after_longer_than_the_backoff_is_waited_out(
        request: pytest.FixtureRequest, proxy: FaultProxy, mount_via: MountFactory, fault_image: FaultImage,
        fault_report: FaultReport) -> None:
    """A registry throttling for 5 s says so (Retry-After: 5): the reader should get its bytes
    after about 5 s, with no request sent before the time the registry named."""
    m = mount_via(proxy.host, extra=ONE_REQUEST_PER_READ)
    since = proxy.inject(Fault("status", status=429, retry_after=5, seconds=5.0))
    read = timed_read(m.path / small(0))
    gets = proxy.blob_gets(since)
    faulted = [e for e in gets if e.fault]
    ok = read.result == fault_image.files[small(0)]
    fault_report.add(Measurement(
        request.node.name, "HTTP 429 + Retry-After: 5 for 5 s", "right bytes" if ok else _describe(read),
        len(gets), len(faulted), read.seconds, None if ok else read.seconds,
        read.end - (since + 5.0) if ok else None))
    assert ok, f"the reader saw {_describe(read)}; requests during the 5 s: {len(faulted)}"
    assert len(faulted) == 1, f"{len(faulted)} requests before the time the registry named"


def test_retry_after_beyond_max_retry_after_fails_at_once(
        proxy: FaultProxy, mount_via: MountFactory, fault_image: FaultImage) -> None:
    """A registry that asks for a longer wait than ``max_retry_after`` is not hammered: the read
    fails at once (one request per FUSE read) and the layer's error names the wait it asked for."""
    m = mount_via(proxy.host, extra=ONE_REQUEST_PER_READ, registry_extra="max_retry_after = 10.0")
    since = proxy.inject(Fault("status", status=429, retry_after=60, seconds=60.0))
    read = timed_read(m.path / small(0))
    gets = proxy.blob_gets(since)
    proxy.clear()
    assert isinstance(read.result, OSError), f"the reader saw {_describe(read)}"
    assert read.seconds < 2.0, read.seconds
    assert len(gets) <= 2, f"{len(gets)} requests (at most one per FUSE read: the kernel reads twice)"
    assert "retry after 60s" in (m.info().layer.last_error or ""), m.info().layer
