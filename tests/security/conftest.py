"""Fixtures of the security tests: a real unprivileged user, a directory anyone may pass through, umasks.

The user ``lazyd-test-nobody`` (and the group ``lazyd-test-sock``, of which it is a member) are created
with ``useradd``/``groupadd`` when missing and removed again at the end of the session; its connection
attempts run in a child process after ``setpriv`` dropped to its uid, gid and groups.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.estargz_images import EStargzImage, busybox_layers, push_layers
from tests.support.images import build_busybox, layer_tars
from tests.support.lazyd import Lazyd, start_lazyd, unmount_all_below
from tests.support.procs import Proc, wait_until
from tests.support.registry import running_registry

USER = "lazyd-test-nobody"
GROUP = "lazyd-test-sock"
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives below /root, which the user cannot enter

# Runs as the unprivileged user: connect to a socket and print the errno name, or "ok" once the
# server answered like the server it is ("lazyd": a status reply; "grpc": an HTTP/2 SETTINGS frame).
PROBE = r"""
import errno, socket, struct, sys
path, kind, request = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(path)
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
    sys.exit(0)
def exactly(n):
    data = b""
    while len(data) < n:
        more = s.recv(n - len(data))
        if not more:
            raise SystemExit("connection closed after %d bytes" % len(data))
        data += more
    return data
if kind == "lazyd":
    s.sendall(request)
    (length,) = struct.unpack(">I", exactly(4))
    body = exactly(length)
    print("ok" if b"pid" in body and b"version" in body else "unexpected reply %r" % body[:200])
elif kind == "grpc":
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    header = exactly(9)
    print("ok" if header[3] == 4 else "unexpected frame %r" % header)
else:
    print("connected")
"""


@dataclass(frozen=True)
class Unprivileged:
    """A real non-root user; ``socket_group`` is a group it is a member of (in /etc/group)."""

    name: str
    uid: int
    gid: int
    socket_group: str

    def run(self, argv: list[str], in_group: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this user: with its groups from /etc/group (``in_group``), else with none."""
        groups = ["--init-groups"] if in_group else ["--clear-groups"]
        return subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", *groups, *argv],
                              cwd="/", capture_output=True, text=True, timeout=timeout,
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})

    def connect(self, path: Path, kind: str = "raw", in_group: bool = False) -> str:
        """Connect to ``path`` as this user: "ok" (the server answered), or the errno name (EACCES...)."""
        from lazyd.api import wire

        request = wire.encode({"id": 1, "op": "status", "args": {}}).hex()
        r = self.run([SYSTEM_PYTHON, "-c", PROBE, str(path), kind, request], in_group=in_group)
        assert r.returncode == 0, f"probe failed: {r.stdout}{r.stderr}"
        return r.stdout.strip()


def _exists(lookup, name: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        lookup(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="session")
def unprivileged() -> Iterator[Unprivileged]:
    """``lazyd-test-nobody``, a member of ``lazyd-test-sock``: created if missing, removed if created here."""
    made_group = not _exists(grp.getgrnam, GROUP)
    made_user = not _exists(pwd.getpwnam, USER)
    if made_group:
        subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True)
    if made_user:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "--user-group", USER], check=True, capture_output=True)
    if USER not in grp.getgrnam(GROUP).gr_mem:
        subprocess.run(["gpasswd", "--add", USER, GROUP], check=True, capture_output=True)
    pw = pwd.getpwnam(USER)
    assert pw.pw_uid != 0 and pw.pw_gid != grp.getgrnam(GROUP).gr_gid
    try:
        yield Unprivileged(USER, pw.pw_uid, pw.pw_gid, GROUP)
    finally:
        if made_user:
            subprocess.run(["userdel", USER], check=False, capture_output=True)
        if made_group:
            subprocess.run(["groupdel", GROUP], check=False, capture_output=True)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A fresh directory below /tmp that anyone may pass through (0755, so only lazyd's own modes count)."""
    d = Path(tempfile.mkdtemp(prefix="lzsec-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block (and the processes it starts) under ``mask``."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> str:
    """``path``'s permission bits as four octal digits, e.g. "0600"."""
    return f"{path.lstat().st_mode & 0o7777:04o}"


@dataclass
class Stack:
    """A running ``lazyd serve`` (one worker) and ``lazyd snapshotter`` talking to it."""

    lazyd: Lazyd
    snapshotter: Proc
    snapshotter_root: Path
    address: Path

    def worker_socket(self) -> Path:
        return self.lazyd.root / "workers" / "0" / "control.sock"


def write_config(path: Path, hosts_dir: Path, extra: str = "", registry_extra: str = "",
                 snapshotter_extra: str = "") -> Path:
    """A config file for both ``lazyd serve`` and ``lazyd snapshotter`` (its ``[snapshotter]`` table)."""
    path.write_text(f"workers = 1\ncache_size = 1073741824\nfetch_timeout = 10.0\n{extra}\n"
                    f"[registry]\nhosts_dir = \"{hosts_dir}\"\nretries = 0\nbackoff = 0.05\n{registry_extra}\n"
                    f"[snapshotter]\n{snapshotter_extra}\n")
    return path


def start_snapshotter_proc(config: Path, root: Path, address: Path, lazyd_socket: Path, log: Path,
                           timeout: float = 30) -> Proc:
    """``lazyd snapshotter --log-level debug`` of this interpreter; waits for its socket."""
    proc = Proc([sys.executable, "-m", "lazyd.cli.lazyd", "snapshotter", "--config", str(config), "--root", str(root),
                 "--address", str(address), "--lazyd-socket", str(lazyd_socket), "--log-level", "debug"], log)
    try:
        wait_until(lambda: address.exists() or not proc.alive(), timeout, "lazyd snapshotter socket")
    except TimeoutError:
        proc.stop()
        raise
    if not proc.alive():
        raise RuntimeError(f"lazyd snapshotter exited:\n{proc.log_text()[-3000:]}")
    return proc


@contextmanager
def running_stack(work: Path, config: Path, root: Path, socket: Path, address: Path) -> Iterator[Stack]:
    """``lazyd serve`` (debug log, one worker) at ``root``/``socket`` and the snapshotter at ``address``,
    started under the caller's umask; everything is stopped and unmounted on leaving the block."""
    daemon = start_lazyd(root, socket, work / "lazyd.log", config=config, args=("--log-level", "debug"), workers=1)
    sn_root = work / "sn-root"
    snap: Proc | None = None
    try:
        snap = start_snapshotter_proc(config, sn_root, address, socket, work / "snapshotter.log")
        yield Stack(daemon, snap, sn_root, address)
    finally:
        if snap is not None:
            snap.stop()
        daemon.close(unmount=root)
        unmount_all_below(sn_root)


@dataclass(frozen=True)
class Stored:
    """An eStargz busybox image (2 layers) in a registry storage directory, for registries started over it later
    (with auth, with TLS)."""

    storage: Path
    name: str
    image: EStargzImage


@pytest.fixture(scope="session")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    work = tmp_path_factory.mktemp("secure-images")
    build_busybox(work / "layout", "t", with_deletions=True)
    tars = layer_tars(work / "layout", "t", work / "tars")
    layers = busybox_layers(tars, work)
    with running_registry(work, name="anon") as anon:
        image = push_layers(anon.host, "secure/bb:t", layers)
    return Stored(anon.root, "secure/bb:t", image)
