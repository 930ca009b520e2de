"""Readiness for systemd's ``Type=notify`` units (contrib/systemd), sent with ``sdnotify``.

Each long-running command tells systemd it is ready only once its own socket answers:

* ``lazyd serve``: when a ``status`` request on its API socket is answered by this very
  process (the reply's ``pid``). ``status`` is held until the workers are up and the mounts
  of the previous run are restored, so READY=1 means every API op is served.
* ``lazyd snapshotter``: when its gRPC socket answers a Snapshots ``Stat`` call.

Without ``NOTIFY_SOCKET`` in the environment (not started by systemd, or not as
``Type=notify``) nothing is probed and nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import sdnotify

if TYPE_CHECKING:
    from lazyd.api.messages import StatusResult

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
PROBE_KEY = "lazyd-readiness-probe"  # containerd's keys are "<namespace>/<n>/<name>": never this one
POLL_INTERVAL = 0.1  # seconds between two probes of a socket that does not answer yet


class ReadinessError(RuntimeError):
    """The socket did not answer as expected, or systemd could not be told about readiness."""


def enabled() -> bool:
    """Whether systemd waits for a notification (``NOTIFY_SOCKET`` is set)."""
    return bool(os.environ.get(NOTIFY_SOCKET))


def send(*assignments: str) -> bool:
    """Send ``VAR=value`` lines (``READY=1``, ``STATUS=...``) to systemd; False when ``NOTIFY_SOCKET`` is unset."""
    address = os.environ.get(NOTIFY_SOCKET)
    if not address:
        return False
    try:
        notifier = sdnotify.SystemdNotifier(debug=True)  # debug: raise instead of ignoring errors
    except OSError as exc:
        raise ReadinessError(f"cannot connect to systemd's notification socket {NOTIFY_SOCKET}={address}: "
                             f"{exc}") from exc
    try:
        notifier.notify("\n".join(assignments))
    except OSError as exc:
        raise ReadinessError(f"cannot send {assignments[0]} to systemd's notification socket "
                             f"{NOTIFY_SOCKET}={address}: {exc}") from exc
    finally:
        notifier.socket.close()
    return True


async def lazyd_ready(socket_path: str, poll: float = POLL_INTERVAL) -> StatusResult | None:
    """Wait until this process answers ``status`` on ``socket_path``, then send READY=1.

    Returns that ``status`` reply, or None without probing when ``NOTIFY_SOCKET`` is unset.
    A reply from another process (a stale daemon whose socket this one has not replaced yet)
    does not count. Retries until answered; systemd's start timeout bounds the wait. Raises
    ReadinessError only when systemd cannot be told.
    """
    if not enabled():
        return None
    # Imported here: 'lazyd --version' and '--help' import this module and must stay cheap.
    from lazyd.api.client import AsyncClient
    from lazyd.api.messages import TIMEOUT, UNAVAILABLE, ApiError

    reported: set[str] = set()
    while True:
        try:
            # A fresh connection each time: the path may be renamed to this process's socket meanwhile.
            async with AsyncClient(socket_path, connect_timeout=1.0) as client:
                status: StatusResult = await client.request("status")
        except ApiError as exc:
            # Not listening yet (or a stale socket): retry. Any other error may come from another
            # process's socket, so it is logged once and retried too.
            if exc.code not in (UNAVAILABLE, TIMEOUT) and str(exc) not in reported:
                reported.add(str(exc))
                log.warning("readiness probe of %s: %s; retrying", socket_path, exc)
        else:
            if status.pid == os.getpid():
                break
        await asyncio.sleep(poll)
    send("READY=1", f"STATUS=serving {socket_path}: {len(status.workers)} worker(s), {len(status.mounts)} mount(s)")
    return status


def snapshotter_ready(address: Path, timeout: float = 30.0) -> bool:
    """Wait until the gRPC socket ``address`` answers a Snapshots call, then send READY=1.

    Any reply of the servicer counts (``Stat`` of PROBE_KEY: NOT_FOUND); a transport error
    or no reply within ``timeout`` seconds raises ReadinessError. Returns False without
    probing when ``NOTIFY_SOCKET`` is unset.
    """
    if not enabled():
        return False
    import grpc  # not at import time, as in lazyd_ready

    from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
    from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"unix:{address}") as channel:
        try:
            pb_grpc.SnapshotsStub(channel).Stat(pb.StatSnapshotRequest(key=PROBE_KEY), timeout=timeout,
                                                wait_for_ready=True)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]  # every RpcError of a unary call is a grpc.Call
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ReadinessError(f"the snapshotter's socket {address} did not answer within {timeout}s: "
                                     f"{code.name}: {exc.details()}") from exc  # type: ignore[attr-defined]
    send("READY=1", f"STATUS=serving containerd snapshots on {address}")
    return True
