"""contrib/systemd's units under a real systemd (PID 1 of a sandbox, see tests/systemd/sandbox.py).

Proves the design: Type=notify readiness, ``systemctl restart lazyd`` (and a crash) keeping the
FUSE worker and its mount (KillMode=process), the snapshotter untouched by a lazyd restart
(Wants=, not Requires=), ``systemctl stop`` leaving the mount served, and ``lazyctl shutdown``
(the clean stop) not undone by Restart=on-failure.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyd.api.client import Client
from lazyd.api.messages import StatusResult
from tests.support.estargz_images import EStargzImage
from tests.support.procs import wait_until
from tests.support.registry import Registry
from tests.support.tcpproxy import TCPProxy
from tests.systemd.conftest import HELLO
from tests.systemd.sandbox import Sandbox, start_sandbox

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib" / "systemd"
EXEC = Path("/usr/local/bin/lazyd")
STATE = "/var/lib/lazyd-systemd-test"  # not /var/lib/lazyd: the machine's own state shows through the overlay
MOUNTPOINT = "/var/lib/lazyd-systemd-test-mnt/layer"
SOCKET = "/run/lazyd/lazyd.sock"
LAZYD, SNAPSHOTTER = "lazyd.service", "lazyd-snapshotter.service"
CONFIG = f"""\
root = "{STATE}"
workers = 1
prefetch = false
background_fetch = false

[registry]
hosts_dir = "/etc/lazyd/certs.d"

[snapshotter]
root = "{STATE}/snapshotter"
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    assert EXEC.exists(), f"{EXEC} (the units' ExecStart) is missing: scripts/setup links it"
    files = {
        f"etc/systemd/system/{LAZYD}": (CONTRIB / LAZYD).read_text(),
        f"etc/systemd/system/{SNAPSHOTTER}": (CONTRIB / SNAPSHOTTER).read_text(),
        "etc/systemd/system/containerd.service.d/lazyd.conf": (CONTRIB / "containerd-lazyd.conf").read_text(),
        "etc/tmpfiles.d/lazyd.conf": (CONTRIB / "lazyd.tmpfiles.conf").read_text(),
        "etc/lazyd/config.toml": CONFIG,
        "etc/lazyd/certs.d/README": "no registry host configuration: 127.0.0.1 is plain HTTP\n",
    }
    sb = start_sandbox(tmp_path, files)
    try:
        yield sb
    finally:
        sb.close()


def _status(sb: Sandbox) -> StatusResult:
    """``status`` of the sandbox's lazyd; it must answer at once (no waiting for a start-up)."""
    with Client(str(sb.path(SOCKET)), timeout=10, connect_timeout=1) as c:
        return c.status()


def _cgroup_pids(sb: Sandbox, unit: str) -> set[int]:
    """The pids (in the sandbox) in ``unit``'s cgroup; none once systemd removed it."""
    cgroup = sb.show(unit, "ControlGroup")
    if not cgroup:
        return set()
    procs = sb.run("cat", f"/sys/fs/cgroup{cgroup}/cgroup.procs", check=False)
    return {int(p) for p in procs.stdout.split()} if procs.returncode == 0 else set()


def _mounted(sb: Sandbox, path: str) -> bool:
    """Whether ``path`` is a mount point in the sandbox's mount namespace."""
    return sb.run("mountpoint", "-q", path, check=False).returncode == 0


def test_units_under_systemd_keep_the_mount_across_restart(sandbox: Sandbox, registry: Registry,
                                                           image: EStargzImage, layer_files: dict[str, bytes]) -> None:
    sb = sandbox
    layer = image.layers[0]
    # The tmpfiles.d entry (what systemd-tmpfiles-setup does at boot) makes /run/lazyd, root only.
    sb.systemctl("start", "systemd-tmpfiles-setup.service")
    run_dir = os.stat(sb.path("/run/lazyd"))
    assert (stat.S_IMODE(run_dir.st_mode), run_dir.st_uid, run_dir.st_gid) == (0o700, 0, 0)
    # The containerd drop-in orders containerd after the snapshotter and pulls it in.
    assert SNAPSHOTTER in sb.show("containerd.service", "Wants").split()
    assert SNAPSHOTTER in sb.show("containerd.service", "After").split()

    # Starting the snapshotter pulls in lazyd (Wants=) and waits for it (After=, Type=notify).
    sb.systemctl("start", SNAPSHOTTER)
    for unit in (LAZYD, SNAPSHOTTER):
        assert sb.show(unit, "ActiveState") == "active", sb.journal(unit)
    assert sb.show(LAZYD, "StatusText") == f"serving {SOCKET}: 1 worker(s), 0 mount(s)"
    assert sb.show(SNAPSHOTTER, "StatusText") == "serving containerd snapshots on /run/lazyd/snapshotter.sock"
    lazyd_pid, snapshotter_pid = sb.main_pid(LAZYD), sb.main_pid(SNAPSHOTTER)
    st = _status(sb)
    assert st.pid == lazyd_pid and [w.state for w in st.workers] == ["ready"]

    with TCPProxy(registry.port) as proxy:
        ref = image.ref.replace(registry.host, proxy.host, 1)
        sb.path(MOUNTPOINT).mkdir(parents=True)
        with Client(str(sb.path(SOCKET)), timeout=60) as c:
            mount = c.mount(ref, layer.digest, MOUNTPOINT, layer.toc_digest)
        mp = sb.path(MOUNTPOINT)  # the sandbox's FUSE mount, read from here through /proc/<pid>/root
        assert (mp / "etc/hello.txt").read_bytes() == HELLO
        assert (mp / "data/first.bin").read_bytes() == layer_files["data/first.bin"]
        worker = mount.worker_pid
        assert worker in _cgroup_pids(sb, LAZYD)

        # systemctl restart: a new fetcher adopts the same worker; the mount keeps working.
        fetched = len(proxy.range_requests(layer.digest))
        sb.systemctl("restart", LAZYD)
        new_pid = sb.main_pid(LAZYD)
        assert new_pid != lazyd_pid
        st = _status(sb)
        assert st.pid == new_pid
        assert [(m.mount_id, m.state, m.worker_pid) for m in st.mounts] == [(mount.mount_id, "ready", worker)]
        assert (mp / "data/second.bin").read_bytes() == layer_files["data/second.bin"]
        assert len(proxy.range_requests(layer.digest)) > fetched, "second.bin came from the registry after the restart"
        assert _cgroup_pids(sb, LAZYD) == {worker, new_pid}
        journal = sb.journal(LAZYD)
        assert f"adopted worker 0 (pid {worker}) with 1 mount(s)" in journal
        assert f"adopted mount {mount.mount_id} at {MOUNTPOINT}" in journal
        # ... and the snapshotter was neither restarted nor stopped.
        assert (sb.show(SNAPSHOTTER, "ActiveState"), sb.main_pid(SNAPSHOTTER)) == ("active", snapshotter_pid)

        # A crash of the fetcher: Restart=on-failure starts a new one, which adopts the worker again.
        sb.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", LAZYD)
        wait_until(lambda: sb.main_pid(LAZYD) not in (0, new_pid) and sb.show(LAZYD, "ActiveState") == "active",
                   60, "systemd to restart lazyd after its crash")
        assert sb.show(LAZYD, "NRestarts") == "1"
        assert [m.worker_pid for m in _status(sb).mounts] == [worker]
        assert (mp / "data/third.bin").read_bytes() == layer_files["data/third.bin"]

    # systemctl stop: the fetcher exits; the worker and the mount stay (containers keep running).
    sb.systemctl("stop", LAZYD)
    assert sb.show(LAZYD, "ActiveState") == "inactive"
    assert worker in _cgroup_pids(sb, LAZYD)
    assert _mounted(sb, MOUNTPOINT)
    assert (mp / "data/first.bin").read_bytes() == layer_files["data/first.bin"]  # in lazyd's cache

    # The clean stop (API 'shutdown', as 'lazyctl shutdown'): unmounts, stops the workers, exits 0, and
    # Restart=on-failure does not start it again.
    sb.systemctl("start", LAZYD)
    with Client(str(sb.path(SOCKET)), timeout=60) as c:
        c.shutdown()
    wait_until(lambda: sb.show(LAZYD, "ActiveState") == "inactive", 30, "lazyd to stop after shutdown")
    assert (sb.show(LAZYD, "Result"), sb.show(LAZYD, "ExecMainStatus")) == ("success", "0")
    wait_until(lambda: not _cgroup_pids(sb, LAZYD), 30, "the worker to exit after shutdown")
    assert not _mounted(sb, MOUNTPOINT)
    assert sb.show(SNAPSHOTTER, "ActiveState") == "active"
