"""Socket permissions: 0600 (0660 with ``socket_group``) under any umask, and a real non-root user is refused.

Every Unix socket lazyd listens on is covered: the daemon's API socket, the snapshotter's gRPC
socket and a FUSE worker's control socket.  The connection attempts run as ``lazyd-test-nobody``.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from lazyd import unixsocket
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

from .conftest import Unprivileged, mode_of, running_stack, umask, write_config

UMASKS = [pytest.param(0o000, id="umask000"), pytest.param(0o077, id="umask077")]


def _owner(path: Path) -> tuple[int, str]:
    st = path.lstat()
    return st.st_uid, grp.getgrgid(st.st_gid).gr_name


# -- lazyd.unixsocket: the socket is never reachable before it has its final mode --------------------------


@pytest.mark.parametrize("mask", UMASKS)
@pytest.mark.parametrize("group", [False, True], ids=["root-only", "group"])
def test_socket_is_staged_privately_until_it_has_its_mode(public_dir: Path, unprivileged: Unprivileged,
                                                          mask: int, group: bool) -> None:
    gid = grp.getgrnam(unprivileged.socket_group).gr_gid if group else None
    target = public_dir / "new" / "deeper" / "api.sock"
    seen: dict[str, object] = {}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def bind(staging: str) -> None:
        staging_dir = Path(staging).parent
        st = staging_dir.stat()
        seen["staging dir"] = (f"{stat.S_IMODE(st.st_mode):04o}", st.st_uid, staging_dir.parent)
        seen["target at bind"] = target.exists()
        sock.bind(staging)

    def listen() -> None:
        staging = next(target.parent.glob(".l*/s"))
        st = staging.lstat()
        seen["staged socket"] = (stat.S_ISSOCK(st.st_mode), f"{stat.S_IMODE(st.st_mode):04o}", st.st_gid)
        seen["target at listen"] = target.exists()
        sock.listen()

    try:
        with umask(mask):
            unixsocket.publish(target, gid, bind=bind, listen=listen)
        want_sock, want_dir = ("0660", "0710") if group else ("0600", "0700")
        want_gid = gid if group else 0
        # Bound in a private 0700 directory (root's) next to the target; the target appears only
        # once the socket has its final mode and group and is listening.
        assert seen["staging dir"] == ("0700", 0, target.parent)
        assert seen["target at bind"] is False and seen["target at listen"] is False
        assert seen["staged socket"] == (True, want_sock, want_gid)
        assert mode_of(target) == want_sock and target.lstat().st_gid == want_gid
        for d in (public_dir / "new", public_dir / "new" / "deeper"):
            assert mode_of(d) == want_dir and d.stat().st_gid == want_gid, d
        assert sorted(p.name for p in target.parent.iterdir()) == ["api.sock"]  # staging dir removed
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(target))
        assert unprivileged.connect(target) == "EACCES"
        if group:
            assert unprivileged.connect(target, in_group=True) == "connected"
    finally:
        sock.close()


def test_stale_socket_is_replaced_but_never_another_file(public_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(public_dir / "api.sock"))
    stale.close()  # a socket file nobody listens on, as a crashed daemon leaves it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unixsocket.publish(public_dir / "api.sock", None, bind=sock.bind, listen=sock.listen)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(public_dir / "api.sock"))
    finally:
        sock.close()
    victim = public_dir / "config.toml"
    victim.write_text("precious")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(unixsocket.SocketSetupError, match=f"{victim} exists and is not a socket"):
            unixsocket.publish(victim, None, bind=other.bind, listen=other.listen)
    finally:
        other.close()
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in public_dir.iterdir()) == ["api.sock", "config.toml"]


def test_existing_directory_the_group_cannot_pass_is_a_warning(public_dir: Path, unprivileged: Unprivileged,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    closed = public_dir / "closed"
    closed.mkdir(mode=0o700)
    gid = grp.getgrnam(unprivileged.socket_group).gr_gid
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unixsocket.publish(closed / "api.sock", gid, bind=sock.bind, listen=sock.listen)
    finally:
        sock.close()
    assert mode_of(closed) == "0700"  # not lazyd's to change
    assert f"members of group {gid} cannot reach sockets below {closed}: its mode 0700" in caplog.text


# -- the real daemon, worker and snapshotter --------------------------------------------------------------


@pytest.mark.parametrize("mask", UMASKS)
@pytest.mark.parametrize("layout", ["existing-dirs", "new-dirs"])
def test_sockets_are_root_only_under_any_umask(tmp_path: Path, public_dir: Path, unprivileged: Unprivileged,
                                               mask: int, layout: str) -> None:
    """0600 sockets; lazyd-made directories 0700; a non-root user gets EACCES on every socket.

    "existing-dirs": the sockets' directories (and the worker's state directory) already exist with
    mode 0755, so only the socket's own mode stands between the user and the server.  "new-dirs":
    lazyd creates them.
    """
    root = public_dir / "root"
    if layout == "existing-dirs":
        for d in (public_dir / "run", root, root / "workers", root / "workers" / "0"):
            d.mkdir(mode=0o755)
            d.chmod(0o755)
        socket_path, address = public_dir / "run" / "lazyd.sock", public_dir / "run" / "snapshotter.sock"
    else:
        socket_path = public_dir / "run-a" / "b" / "lazyd.sock"
        address = public_dir / "run-s" / "snapshotter.sock"
    config = write_config(tmp_path / "config.toml", tmp_path / "certs.d")
    with umask(mask), running_stack(tmp_path, config, root, socket_path, address) as stack:
        worker = stack.worker_socket()
        table = {str(p): mode_of(p) for p in (socket_path, address, worker)}
        assert table == {str(socket_path): "0600", str(address): "0600", str(worker): "0600"}
        assert {_owner(p) for p in (socket_path, address, worker)} == {(0, "root")}
        if layout == "new-dirs":
            made = [public_dir / "run-a", public_dir / "run-a" / "b", public_dir / "run-s", root, root / "workers",
                    root / "workers" / "0"]
            assert {str(d): mode_of(d) for d in made} == {str(d): "0700" for d in made}
        # root gets served
        with stack.lazyd.client(timeout=30) as c:
            assert c.status().pid == stack.lazyd.proc.pid
        with grpc.insecure_channel(f"unix:{address}") as ch:
            list(pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest(snapshotter="lazyd"), timeout=30))
        # a real non-root user is refused at connect()
        assert unprivileged.connect(socket_path, "lazyd") == "EACCES"
        assert unprivileged.connect(address, "grpc") == "EACCES"
        assert unprivileged.connect(worker) == "EACCES"
        # even a member of the group: no socket_group is configured
        assert unprivileged.connect(socket_path, "lazyd", in_group=True) == "EACCES"
        assert unprivileged.connect(address, "grpc", in_group=True) == "EACCES"


@pytest.mark.parametrize("mask", UMASKS)
def test_socket_group_lets_its_members_in(tmp_path: Path, public_dir: Path, unprivileged: Unprivileged,
                                          mask: int) -> None:
    group = unprivileged.socket_group
    root = public_dir / "root"
    socket_path = public_dir / "run" / "lazyd.sock"
    address = public_dir / "run-sn" / "snapshotter.sock"
    config = write_config(tmp_path / "config.toml", tmp_path / "certs.d", extra=f'socket_group = "{group}"',
                          snapshotter_extra=f'socket_group = "{group}"')
    with umask(mask), running_stack(tmp_path, config, root, socket_path, address) as stack:
        worker = stack.worker_socket()
        assert {str(p): (mode_of(p), _owner(p)) for p in (socket_path, address, socket_path.parent, address.parent)} == {
            str(socket_path): ("0660", (0, group)), str(address): ("0660", (0, group)),
            str(socket_path.parent): ("0710", (0, group)), str(address.parent): ("0710", (0, group))}
        # the worker's control socket is only ever the daemon's business
        assert (mode_of(worker), _owner(worker)) == ("0600", (0, "root")) and mode_of(root) == "0700"
        assert unprivileged.connect(socket_path, "lazyd", in_group=True) == "ok"
        assert unprivileged.connect(address, "grpc", in_group=True) == "ok"
        assert unprivileged.connect(socket_path, "lazyd") == "EACCES"  # the same user without the group
        assert unprivileged.connect(address, "grpc") == "EACCES"
        assert unprivileged.connect(worker, in_group=True) == "EACCES"


def test_missing_socket_group_is_a_startup_error(tmp_path: Path, public_dir: Path) -> None:
    config = write_config(tmp_path / "config.toml", tmp_path / "certs.d", extra='socket_group = "lazyd-no-such-group"',
                          snapshotter_extra='socket_group = "lazyd-no-such-group"')
    root, sock = public_dir / "root", public_dir / "run" / "lazyd.sock"
    r = subprocess.run([sys.executable, "-m", "lazyd.cli.lazyd", "serve", "--config", str(config), "--root", str(root),
                        "--socket", str(sock)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "config key socket_group: 'lazyd-no-such-group' is not a group on this host" in r.stderr
    address = public_dir / "run-sn" / "snapshotter.sock"
    r = subprocess.run([sys.executable, "-m", "lazyd.cli.lazyd", "snapshotter", "--config", str(config),
                        "--root", str(public_dir / "sn-root"), "--address", str(address)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "snapshotter.socket_group: 'lazyd-no-such-group' is not a group on this host" in r.stderr
    assert sorted(os.listdir(public_dir)) == []  # nothing was created


def test_directory_others_can_write_is_a_warning(public_dir: Path, unprivileged: Unprivileged,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    theirs = public_dir / "theirs"
    theirs.mkdir()
    os.chown(theirs, unprivileged.uid, unprivileged.gid)  # its owner could swap the socket for their own
    for parent in (public_dir, theirs):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unixsocket.publish(parent / "api.sock", None, bind=sock.bind, listen=sock.listen)
        finally:
            sock.close()
    warnings = [r.getMessage() for r in caplog.records if "lets others replace the socket" in r.getMessage()]
    assert warnings == [f"socket directory {theirs} (mode 0755, owner {unprivileged.uid}:{unprivileged.gid}) lets "
                        "others replace the socket; put it in a directory only root can write to"]
