"""Global options before and after the command against a real ``lazyd serve``, and the llfuse build in ``status``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import llfuse
import pytest

from lazyd.api.messages import ApiError
from tests.support.lazyd import Lazyd
from tests.support.procs import Proc, wait_until


def _serve_argv(base: Path, placement: str) -> list[str]:
    options = ["--root", str(base / "root"), "--socket", str(base / "lazyd.sock"), "--config", str(base / "c.toml"),
               "--log-level", "debug"]
    serve = [sys.executable, "-m", "lazyd.cli.lazyd"]
    return [*serve, *options, "serve"] if placement == "before" else [*serve, "serve", *options]


@pytest.fixture(scope="module", params=["before", "after"])
def daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lazyd]:
    """``lazyd [OPTIONS] serve`` or ``lazyd serve [OPTIONS]`` with one worker, once it answers."""
    base = tmp_path_factory.mktemp(f"cli-{request.param}")
    (base / "c.toml").write_text("workers = 1\ncache_size = 104857600\n")
    d = Lazyd(base / "root", base / "lazyd.sock", Proc(_serve_argv(base, request.param), base / "lazyd.log"))

    def ready() -> bool:
        try:
            with d.client(timeout=5, connect_timeout=0.5) as c:
                st = c.status()
        except ApiError:
            return False
        return [w.state for w in st.workers] == ["ready"]

    try:
        wait_until(lambda: not d.alive() or ready(), 60, "lazyd serve to answer")
        assert d.alive(), d.log_text()[-4000:]
        yield d
    finally:
        d.close(unmount=base)


def lazyctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["lazyctl", *args], capture_output=True, text=True, timeout=60)


def test_serve_took_its_options(daemon: Lazyd) -> None:
    """--root, --socket, --config and --log-level reached the daemon wherever they were placed."""
    assert (daemon.root / "cache").is_dir()
    assert " lazyd DEBUG " in daemon.log_text()


@pytest.mark.parametrize("placement", [
    ("--socket", "{s}", "status", "--json"),
    ("status", "--socket", "{s}", "--json"),
    ("--json", "status", "--socket", "{s}"),
    ("--socket", "{s}", "--json", "status"),
])
def test_status_json_either_placement(daemon: Lazyd, placement: tuple[str, ...]) -> None:
    proc = lazyctl(*(a.format(s=daemon.socket) for a in placement))
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["socket"] == str(daemon.socket)
    assert st["llfuse_version"] == llfuse.__version__  # the workers run this interpreter
    [worker] = st["workers"]
    assert worker["llfuse_version"] == llfuse.__version__
    assert worker["no_open"] is llfuse.__version__.endswith("+lazyd.readino")


@pytest.mark.parametrize("before", [True, False])
def test_status_table_names_the_llfuse_build(daemon: Lazyd, before: bool) -> None:
    socket = ["--socket", str(daemon.socket)]
    proc = lazyctl(*socket, "status") if before else lazyctl("status", *socket)
    assert proc.returncode == 0, proc.stderr
    kind = "lazyd's patched build" if llfuse.__version__.endswith("+lazyd.readino") else "stock build"
    assert f"\nllfuse {llfuse.__version__} ({kind}" in proc.stdout
    assert "LLFUSE" in proc.stdout and "NO_OPEN" in proc.stdout


def test_cache_stats_either_placement(daemon: Lazyd) -> None:
    s = str(daemon.socket)
    before = json.loads(lazyctl("--socket", s, "--json", "cache", "stats").stdout)
    after = json.loads(lazyctl("cache", "stats", "--socket", s, "--json").stdout)
    assert before["directory"] == after["directory"] == str(daemon.root / "cache")


def test_wrong_socket_before_the_command_is_used(daemon: Lazyd, tmp_path: Path) -> None:
    """The option before the command is not silently replaced by the default socket."""
    proc = lazyctl("--socket", str(tmp_path / "none.sock"), "status")
    assert proc.returncode == 1
    assert str(tmp_path / "none.sock") in proc.stderr


@pytest.mark.parametrize("placement", ["before", "after"])
def test_snapshotter_takes_options_either_side(placement: str, tmp_path: Path) -> None:
    """``lazyd --root R --address A --lazyd-socket L --log-level warning snapshotter`` (or after) serves on A.

    The default level (info) logs where it serves; at warning that line must be gone.
    """
    sockdir = Path(tempfile.mkdtemp(prefix="cli-sn-", dir="/tmp"))  # short path: sockets have a 108-byte limit
    address, lazyd_socket, root = sockdir / "sn.sock", sockdir / "lazyd.sock", tmp_path / "sn-root"
    options = ["--root", str(root), "--address", str(address), "--lazyd-socket", str(lazyd_socket),
               "--log-level", "warning"]
    argv = [*options, "snapshotter"] if placement == "before" else ["snapshotter", *options]
    proc = Proc([sys.executable, "-m", "lazyd.cli.lazyd", *argv], tmp_path / "sn.log")
    try:
        wait_until(lambda: address.exists() or not proc.alive(), 30, "lazyd snapshotter socket")
        assert proc.alive(), proc.log_text()[-4000:]
        assert root.is_dir()
        assert proc.stop() == 0
        assert "serving containerd snapshots" not in proc.log_text()
    finally:
        proc.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
