"""Fixtures: a real ``lazyd snapshotter`` process, a real containerd using it, a registry with busybox."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from lazyd.mounttable import unmount_below
from tests.support.containerd import Containerd, start_containerd
from tests.support.images import build_busybox, push
from tests.support.procs import Proc, wait_until
from tests.support.registry import Registry, running_registry


@dataclass
class SnapshotterProc:
    """A running ``lazyd snapshotter`` with its root, socket and log."""

    root: Path
    address: Path
    lazyd_socket: Path
    log: Path
    proc: Proc | None = None

    def start(self, *extra: str) -> SnapshotterProc:
        self.address.unlink(missing_ok=True)
        self.proc = Proc(["lazyd", "snapshotter", "--root", str(self.root), "--address", str(self.address),
                          "--lazyd-socket", str(self.lazyd_socket), "--log-level", "debug", *extra], self.log)
        wait_until(lambda: self.address.exists() or not self.proc.alive(), 30, "lazyd snapshotter socket")
        assert self.proc.alive(), self.log.read_text()
        return self

    def stop(self) -> int | None:
        assert self.proc is not None
        code = self.proc.stop(timeout=15)
        return code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix:{self.address}")

    def stub(self, channel: grpc.Channel) -> snapshots_pb2_grpc.SnapshotsStub:
        return snapshots_pb2_grpc.SnapshotsStub(channel)


def make_snapshotter(tmp_path: Path, lazyd_socket: Path | None = None) -> SnapshotterProc:
    sockdir = Path(tempfile.mkdtemp(prefix="sn-", dir="/tmp"))
    return SnapshotterProc(root=tmp_path / "sn-root", address=sockdir / "snapshotter.sock",
                           lazyd_socket=lazyd_socket or sockdir / "lazyd.sock", log=tmp_path / "snapshotter.log")


def _teardown(sn: SnapshotterProc) -> None:
    if sn.proc is not None:
        sn.proc.stop(timeout=15)
    unmount_below(sn.root)
    subprocess.run(["rm", "-rf", str(sn.address.parent)], check=False)


@pytest.fixture
def snapshotter(tmp_path: Path) -> Iterator[SnapshotterProc]:
    """A started snapshotter with no lazyd behind it (every remote attempt falls back)."""
    sn = make_snapshotter(tmp_path).start()
    try:
        yield sn
    finally:
        _teardown(sn)


@pytest.fixture
def stub(snapshotter: SnapshotterProc) -> Iterator[snapshots_pb2_grpc.SnapshotsStub]:
    with snapshotter.channel() as ch:
        yield snapshotter.stub(ch)


@pytest.fixture
def containerd(snapshotter: SnapshotterProc, tmp_path: Path) -> Iterator[Containerd]:
    cd = start_containerd(tmp_path / "containerd", snapshotter_address=str(snapshotter.address))
    try:
        yield cd
    finally:
        cd.stop()


@pytest.fixture(scope="package")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("sn-registry")) as reg:
        yield reg


@pytest.fixture(scope="package")
def busybox(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer busybox image (the second layer deletes files) pushed to the registry."""
    layout = tmp_path_factory.mktemp("sn-images") / "busybox"
    build_busybox(layout, "latest", with_deletions=True)
    return push(f"oci:{layout}:latest", registry.host, "busybox:latest")
