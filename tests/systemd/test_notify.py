"""Readiness (lazyd/cli/notify.py) without systemd: a NOTIFY_SOCKET bound by the test receives READY=1.

The daemons are real (``lazyd serve`` with its FUSE workers, ``lazyd snapshotter``); the test plays
systemd's part of the protocol: it binds the datagram socket, passes its path in NOTIFY_SOCKET and
reads the message with the sender's credentials.  Ordering is checked on state, not on timing: when
READY=1 arrives, the socket must already answer and the work it waits for must be done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lazyd.api.client import Client
from lazyd.cli import notify
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.support.estargz_images import EStargzImage
from tests.support.lazyd import Lazyd, start_lazyd, stop_workers, unmount_all_below, worker_json_pids
from tests.support.procs import Proc, wait_until
from tests.systemd.conftest import HELLO

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifySocket:
    """systemd's side: a bound datagram socket that receives notifications with the sender's pid."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.address = address

    def receive(self, timeout: float) -> tuple[dict[str, str], int]:
        """The next message as ``{VAR: value}`` and the sender's pid; TimeoutError after ``timeout``."""
        self.sock.settimeout(timeout)
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        pid = next(_UCRED.unpack(d[:_UCRED.size])[0] for level, kind, d in ancdata
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return dict(line.split("=", 1) for line in data.decode().splitlines()), pid

    def pending(self) -> bool:
        """Whether a message is waiting (without taking it)."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        yield ns
    finally:
        ns.close()


# -- the module ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_everything_is_a_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(notify.NOTIFY_SOCKET, raising=False)
    else:
        monkeypatch.setenv(notify.NOTIFY_SOCKET, value)
    assert not notify.enabled()
    assert notify.send("READY=1") is False
    # Nothing listens at these paths: a probe would wait (lazyd: until cancelled; snapshotter: 30 s, then raise).
    missing = tmp_path / "nothing.sock"
    assert asyncio.run(asyncio.wait_for(notify.lazyd_ready(str(missing)), 5)) is None
    assert notify.snapshotter_ready(missing, timeout=30) is False


@pytest.mark.parametrize("abstract", [False, True])
def test_send_reaches_the_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, abstract: bool) -> None:
    address = f"@lazyd-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    ns = NotifySocket(address)
    try:
        monkeypatch.setenv(notify.NOTIFY_SOCKET, address)
        assert notify.send("READY=1", "STATUS=up") is True
        assert ns.receive(5) == ({"READY": "1", "STATUS": "up"}, os.getpid())
    finally:
        ns.close()


def test_send_error_names_the_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.sock")
    monkeypatch.setenv(notify.NOTIFY_SOCKET, missing)
    with pytest.raises(notify.ReadinessError, match=f"NOTIFY_SOCKET={missing}"):
        notify.send("READY=1")


# -- lazyd serve ----------------------------------------------------------------------------------


def _serve(base: Path, log_name: str, notify_address: str | None) -> Proc:
    env = {notify.NOTIFY_SOCKET: notify_address} if notify_address is not None else None
    return Proc([sys.executable, "-m", "lazyd.cli.lazyd", "serve", "--root", str(base / "root"), "--socket",
                 str(base / "lazyd.sock"), "--config", str(base / "config.toml")], base / log_name, env=env)


def test_serve_is_ready_only_once_it_answers_with_its_mounts_restored(tmp_path: Path, image: EStargzImage,
                                                                      notify_socket: NotifySocket) -> None:
    layer = image.layers[0]
    (tmp_path / "config.toml").write_text("workers = 1\nprefetch = false\nbackground_fetch = false\n")
    mp = tmp_path / "mnt"
    mp.mkdir()
    sock = tmp_path / "lazyd.sock"
    # A first daemon (no NOTIFY_SOCKET) mounts the layer; then it and its worker are SIGKILLed, so the
    # next daemon must start a new worker and mount the layer again before it is ready.
    first = start_lazyd(tmp_path / "root", sock, tmp_path / "first.log", config=tmp_path / "config.toml", workers=1)
    daemon = None
    try:
        with first.client() as c:
            c.mount(image.ref, layer.digest, str(mp), layer.toc_digest)
        (old_worker,) = worker_json_pids(tmp_path / "root")
        first.stop(signal.SIGKILL)
        os.kill(old_worker, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{old_worker}").exists(), 10, "the old worker to exit")
        assert not notify_socket.pending(), "the first daemon, without NOTIFY_SOCKET, sent nothing"

        proc = _serve(tmp_path, "second.log", notify_socket.address)
        daemon = Lazyd(tmp_path / "root", sock, proc)
        try:
            message, sender = notify_socket.receive(60)
        except TimeoutError:
            pytest.fail(f"no READY=1 within 60 s:\n{proc.log_text()[-4000:]}")
        # At this moment (nothing waited for): the mount is served again, by the new worker ...
        assert (mp / "etc/hello.txt").read_bytes() == HELLO
        (new_worker,) = worker_json_pids(tmp_path / "root")
        assert new_worker != old_worker and Path(f"/proc/{new_worker}").exists()
        # ... and the daemon that sent READY=1 answers status on its socket.
        with Client(str(sock), timeout=10, connect_timeout=1) as c:
            st = c.status()
        assert sender == proc.pid == st.pid, "READY=1 comes from the main process (NotifyAccess=main)"
        assert message == {"READY": "1", "STATUS": f"serving {sock}: 1 worker(s), 1 mount(s)"}
        assert [(m.mountpoint, m.state) for m in st.mounts] == [(str(mp), "ready")]
        assert [w.state for w in st.workers] == ["ready"]
        assert not notify_socket.pending(), "READY=1 is sent once"
    finally:
        if daemon is not None:
            daemon.close(unmount=tmp_path)
        first.close(unmount=tmp_path)


def test_serve_stops_when_systemd_cannot_be_told(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on: the error names it and lazyd exits 1, its workers kept."""
    (tmp_path / "config.toml").write_text("workers = 1\n")
    missing = str(tmp_path / "nobody.sock")
    proc = _serve(tmp_path, "serve.log", missing)
    try:
        wait_until(lambda: not proc.alive(), 60, "lazyd serve to exit")
        assert proc.popen.returncode == 1
        assert f"NOTIFY_SOCKET={missing}" in proc.log_text()
        assert "stopping without unmounting" in proc.log_text()
    finally:
        proc.stop()
        stop_workers(tmp_path / "root")
        unmount_all_below(tmp_path)


# -- lazyd snapshotter ------------------------------------------------------------------------------


def _snapshotter(base: Path, notify_address: str) -> Proc:
    return Proc([sys.executable, "-m", "lazyd.cli.lazyd", "snapshotter", "--root", str(base / "snap"), "--address",
                 str(base / "snapshotter.sock"), "--lazyd-socket", str(base / "lazyd.sock")],
                base / "snapshotter.log", env={notify.NOTIFY_SOCKET: notify_address})


def test_snapshotter_is_ready_only_once_its_socket_answers(tmp_path: Path, notify_socket: NotifySocket) -> None:
    proc = _snapshotter(tmp_path, notify_socket.address)
    try:
        try:
            message, sender = notify_socket.receive(60)
        except TimeoutError:
            pytest.fail(f"no READY=1 within 60 s:\n{proc.log_text()[-4000:]}")
        address = tmp_path / "snapshotter.sock"
        # At this moment the gRPC socket answers a call (NOT_FOUND: containerd never made that snapshot).
        with grpc.insecure_channel(f"unix:{address}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.SnapshotsStub(channel).Stat(pb.StatSnapshotRequest(key="default/1/none"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert sender == proc.pid
        assert message == {"READY": "1", "STATUS": f"serving containerd snapshots on {address}"}
        assert not notify_socket.pending()
    finally:
        assert proc.stop() == 0, proc.log_text()[-3000:]


def test_snapshotter_stops_when_systemd_cannot_be_told(tmp_path: Path) -> None:
    missing = str(tmp_path / "nobody.sock")
    proc = _snapshotter(tmp_path, missing)
    try:
        wait_until(lambda: not proc.alive(), 60, "lazyd snapshotter to exit")
        assert proc.popen.returncode == 1
        assert f"NOTIFY_SOCKET={missing}" in proc.log_text()
        assert not (tmp_path / "snapshotter.sock").exists()
    finally:
        proc.stop()


def test_snapshotter_probe_error_names_the_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  notify_socket: NotifySocket) -> None:
    """Nothing serves the gRPC socket: no READY=1, and the error names the socket."""
    monkeypatch.setenv(notify.NOTIFY_SOCKET, notify_socket.address)
    missing = tmp_path / "no-snapshotter.sock"
    with pytest.raises(notify.ReadinessError, match=f"{missing} did not answer within 1.0s"):
        notify.snapshotter_ready(missing, timeout=1.0)
    assert not notify_socket.pending()
