"""``lazyd snapshotter`` stops on a SIGTERM whichever of its threads the kernel hands it to."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

from tests.snapshotter.conftest import make_snapshotter

_SYS_TGKILL = 234  # x86_64


def _tgkill(pid: int, tid: int, sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig})")


def test_sigterm_to_a_grpc_thread_stops_the_snapshotter(tmp_path: Path) -> None:
    """A process-directed signal may go to any thread that does not block it; gRPC's threads
    do not.  With the main thread blocked in ``Event.wait()`` such a SIGTERM went unnoticed
    (a conformance run's snapshotter ignored it for 20 s)."""
    sn = make_snapshotter(tmp_path).start()
    assert sn.proc is not None
    pid = sn.proc.pid
    others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert others, "the snapshotter runs gRPC threads besides its main thread"
    _tgkill(pid, others[-1], signal.SIGTERM)
    deadline = time.monotonic() + 5
    while sn.proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = sn.proc.alive()
    code = sn.stop()
    assert not alive, "the snapshotter did not stop within 5 s of a SIGTERM sent to one of its threads"
    assert code == 0
    assert "stopping" in sn.log_text()
