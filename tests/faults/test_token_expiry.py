"""Bearer tokens that live 5 seconds, under a 60-second read loop: no reader ever sees the expiry.

The registry (``auth: token``) trusts a small token server (tests/registry/tokenserver.py)
whose tokens expire 5 s after they are issued.  For the first half of the loop the server
says so (``expires_in: 5``: lazyd should renew ahead of time); for the second half it
claims 300 s (lazyd holds a token past its real end, gets a 401 and must renew and resend
without the reader noticing).  The client-level version of the second case is in
tests/registry/test_auth.py.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from tests.registry.tokenserver import TokenServer
from tests.support.registry import Registry, start_registry

from .conftest import (ONE_REQUEST_PER_READ, SMALL_COUNT, AppThread, FaultImage, FaultReport, Measurement,
                       MountFactory, Read, small, timed_read)
from .faultproxy import FaultProxy

USER, PASSWORD = "reader", "faults-token-Pa55"
LIFETIME = 5.0
LOOP = 60.0
PACE = LOOP / (SMALL_COUNT - 20)  # one read of a new (uncached) file every 0.2 s


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_five_second_tokens_never_reach_a_reader(request: pytest.FixtureRequest, tmp_path: Path, registry: Registry,
                                                 mount_via: MountFactory, fault_image: FaultImage,
                                                 fault_report: FaultReport) -> None:
    server = TokenServer(tmp_path, users={USER: PASSWORD}, lifetime=LIFETIME, claimed_expires_in=int(LIFETIME))
    with AppThread(server.app()) as app:
        server.port = app.port
        reg = start_registry(tmp_path, name="token-registry", auth=server.registry_auth(), storage_root=registry.root)
        try:
            with FaultProxy(reg.host) as front:  # no faults: it only counts the 401s
                docker_config = tmp_path / "docker-config.json"
                auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                docker_config.write_text(json.dumps({"auths": {front.host: {"auth": auth}}}))
                m = mount_via(front.host, extra=ONE_REQUEST_PER_READ,
                              registry_extra=f'docker_config = "{docker_config}"')
                reads, phases = _read_loop(m.path, server)
                events = front.events()
        finally:
            reg.stop()
    wrong = [(name, r.result) for name, r in reads if r.result != fault_image.files[name]]
    halves = []
    for start, end, issued in phases:
        rejected = [e for e in events if e.blob_get and e.status == 401 and start <= e.start <= end]
        halves.append((len(rejected), issued))
    slowest = max(r.seconds for _, r in reads)
    fault_report.add(Measurement(
        request.node.name, f"{LIFETIME:.0f} s tokens, {LOOP:.0f} s read loop", "right bytes, no error" if not wrong
        else f"{len(wrong)} failed reads", sum(1 for e in events if e.blob_get), sum(r for r, _ in halves),
        slowest, None, None,
        {"reads": len(reads), "tokens_issued_honest_half": halves[0][1], "blob_401s_honest_half": halves[0][0],
         "tokens_issued_lying_half": halves[1][1], "blob_401s_lying_half": halves[1][0],
         "median_read_seconds": round(sorted(r.seconds for _, r in reads)[len(reads) // 2], 4)}))
    assert not wrong, f"{len(wrong)} of {len(reads)} reads failed or were wrong, first: {wrong[0]!r}"[:400]
    assert len(reads) >= LOOP / PACE - 2
    (_, issued_honest), (rejected_lying, issued_lying) = halves
    # Tokens really expired and were replaced in both halves: 30 s of reads every 0.2 s need at
    # least 6 tokens of at most 5 s, the first of which may have been issued before the half.
    assert issued_honest >= 5 and issued_lying >= 5, halves
    # With the lie, lazyd learns of an expiry only from the registry's 401 (the first token of
    # the half may still be one it was told the truth about, renewed without a 401).
    assert rejected_lying >= 4, halves
    m.assert_not_remounted()


def _read_loop(mountpoint: Path, server: TokenServer) -> tuple[list[tuple[str, Read]], list[tuple[float, float, int]]]:
    """Read a new file every PACE seconds for LOOP seconds; the token server tells the truth about
    ``expires_in`` for the first half and claims 300 s for the second.

    Returns the reads and, per half, (start, end, tokens issued)."""
    reads: list[tuple[str, Read]] = []
    phases: list[tuple[float, float, int]] = []
    t0 = time.monotonic()
    i = 0
    for half in range(2):
        start, issued = time.monotonic(), len(server.issued)
        server.claimed_expires_in = int(LIFETIME) if half == 0 else 300
        while time.monotonic() < t0 + LOOP * (half + 1) / 2:
            name = small(i)
            reads.append((name, timed_read(mountpoint / name)))
            i += 1
            time.sleep(max(0.0, t0 + i * PACE - time.monotonic()))
        phases.append((start, time.monotonic(), len(server.issued) - issued))
    return reads, phases
