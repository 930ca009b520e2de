"""Snapshot semantics through a real containerd: pull, unpack, run, remove (no lazyd: plain overlay)."""

from __future__ import annotations

import stat

from tests.snapshotter.conftest import SnapshotterProc
from tests.support.containerd import Containerd
from tests.support.procs import wait_until

SN = "lazyd"


def _snapshots(cd: Containerd) -> dict[str, str]:
    """name -> kind, from ``ctr snapshots ls`` (through our List RPC)."""
    out = cd.ctr("snapshots", "--snapshotter", SN, "ls").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[-1] for line in out if line.strip()}


def test_socket_is_0600(snapshotter: SnapshotterProc) -> None:
    mode = snapshotter.address.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_pull_and_run_like_overlayfs(containerd: Containerd, snapshotter: SnapshotterProc, busybox: str) -> None:
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", SN, busybox)
    committed = _snapshots(containerd)
    assert len(committed) == 2 and set(committed.values()) == {"Committed"}, committed
    out = containerd.ctr("run", "--rm", "--snapshotter", SN, busybox, "t1", "/bin/echo", "hi").stdout
    assert out == "hi\n"
    # The second layer's whiteouts and opaque dir are applied by containerd on our overlay.
    out = containerd.ctr("run", "--rm", "--snapshotter", SN, busybox, "t2", "/bin/sh", "-c",
                         "cat /etc/hello.txt /data/file.txt; ls /var/log; test -e /etc/group || echo nogroup").stdout
    assert out == "hello from lazyd\npayload\nnew.log\nnogroup\n"
    # The container's active snapshot was removed with it.
    assert _snapshots(containerd) == committed
    # Writes in one container do not leak into the image or another container.
    containerd.ctr("run", "--rm", "--snapshotter", SN, busybox, "t3", "/bin/sh", "-c", "echo x > /etc/hello.txt")
    out = containerd.ctr("run", "--rm", "--snapshotter", SN, busybox, "t4", "/bin/cat", "/etc/hello.txt").stdout
    assert out == "hello from lazyd\n"
    assert "falling back" not in snapshotter.log_text()  # plain pulls send no remote labels


def test_image_remove_removes_snapshots(containerd: Containerd, snapshotter: SnapshotterProc, busybox: str) -> None:
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", SN, busybox)
    dirs_before = set((snapshotter.root / "snapshots").iterdir())
    assert len(dirs_before) == 2
    containerd.ctr("images", "rm", "--sync", busybox)
    # containerd's GC removes the snapshots through our Remove.
    wait_until(lambda: not _snapshots(containerd), 20, "snapshots to be garbage collected")
    wait_until(lambda: not any((snapshotter.root / "snapshots").iterdir()), 20, "snapshot dirs to go")


def test_restart_keeps_snapshots_and_running_container(containerd: Containerd, snapshotter: SnapshotterProc,
                                                        busybox: str) -> None:
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", SN, busybox)
    containerd.ctr("run", "-d", "--snapshotter", SN, busybox, "long", "/bin/sleep", "600")
    try:
        before = _snapshots(containerd)
        snapshotter.stop()
        snapshotter.start()
        # containerd's proxy re-dials with a backoff of at most 3 s.
        wait_until(lambda: containerd.ctr("snapshots", "--snapshotter", SN, "ls", check=False).returncode == 0,
                   15, "containerd to reconnect to the snapshotter")
        assert _snapshots(containerd) == before
        out = containerd.ctr("tasks", "exec", "--exec-id", "e1", "long", "/bin/cat", "/etc/hello.txt").stdout
        assert out == "hello from lazyd\n"
        out = containerd.ctr("run", "--rm", "--snapshotter", SN, busybox, "after", "/bin/echo", "hi").stdout
        assert out == "hi\n"
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", "long", check=False)
        containerd.ctr("tasks", "delete", "-f", "long", check=False)
        containerd.ctr("containers", "delete", "long", check=False)
