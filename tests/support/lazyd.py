"""Start and tear down a real ``lazyd serve`` (for tests and benchmarks).

``start_lazyd(root, socket, log)`` starts the daemon and waits until it answers;
``Lazyd.close()`` then stops whatever it left behind: the daemon (clean ``shutdown``
first), its FUSE workers (they run in their own sessions and outlive the daemon by
design) and the mounts below a directory.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lazyd.api.client import Client
from lazyd.api.messages import ApiError
from lazyd.mounttable import mountpoints_below, unmount_below

from .procs import Proc, wait_until


@dataclass
class Lazyd:
    """A ``lazyd serve`` process with its state ``root``, ``socket`` and log."""

    root: Path
    socket: Path
    proc: Proc

    def alive(self) -> bool:
        return self.proc.alive()

    def log_text(self) -> str:
        return self.proc.log_text()

    def client(self, timeout: float = 120, connect_timeout: float = 5.0) -> Client:
        return Client(str(self.socket), timeout=timeout, connect_timeout=connect_timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the daemon only (SIGTERM/SIGKILL leave the workers and their mounts up)."""
        return self.proc.stop(sig)

    def shutdown(self, timeout: float = 30) -> bool:
        """The clean stop (API ``shutdown``: unmount, stop the workers, exit); False if it did not exit in time."""
        if self.proc.alive():
            try:
                with self.client(timeout=timeout, connect_timeout=1) as c:
                    c.shutdown()
            except ApiError:
                pass  # not answering, or the reply was lost as it exited: wait and see
            try:
                wait_until(lambda: not self.proc.alive(), timeout, "lazyd serve to exit")
            except TimeoutError:
                return False
        self.proc.stop()
        return True

    def worker_pids(self) -> list[int]:
        """The pids the workers recorded in ``<root>/workers/*/worker.json`` (live or not)."""
        return worker_json_pids(self.root)

    def close(self, unmount: Path | None = None, timeout: float = 30) -> bool:
        """Stop everything this daemon started, whatever state it is in; unmount all below ``unmount``.

        Returns whether the clean stop worked (False: the daemon had to be killed).
        """
        clean = self.shutdown(timeout)
        self.proc.stop()
        stop_workers(self.root)
        unmount_all_below(unmount or self.root)
        return clean


def start_lazyd(root: Path, socket: Path, log: Path, *, config: Path | None = None, args: Sequence[str] = (),
                workers: int | None = None, timeout: float = 30) -> Lazyd:
    """Start ``lazyd serve --root root --socket socket [--config config] args`` and wait until it is up.

    It runs as ``python -m lazyd.cli.lazyd`` with this interpreter, so it is the lazyd under test.

    Up means: the socket exists, or with ``workers`` given, ``status`` answers with that many
    ready workers. Raises RuntimeError (with the log's tail) when the daemon exits first.
    """
    socket.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "lazyd.cli.lazyd", "serve", "--root", str(root), "--socket", str(socket)]
    if config is not None:
        argv += ["--config", str(config)]
    daemon = Lazyd(root, socket, Proc([*argv, *args], log))

    def up() -> bool:
        if workers is None:
            return socket.exists()
        try:
            with daemon.client(timeout=5, connect_timeout=0.5) as c:
                st = c.status()
        except ApiError:
            return False
        return len(st.workers) == workers and all(w.state == "ready" for w in st.workers)

    try:
        wait_until(lambda: not daemon.alive() or up(), timeout, "lazyd serve to answer")
    except TimeoutError:
        daemon.close(timeout=5)
        raise
    if not daemon.alive():
        daemon.close(timeout=5)
        raise RuntimeError(f"lazyd serve exited ({daemon.proc.popen.returncode}):\n{daemon.log_text()[-4000:]}")
    return daemon


def cached_chunks(lazyd_root: Path) -> int:
    """Chunks in the chunk store of ``lazyd_root``, read from its SQLite index without asking the daemon."""
    con = sqlite3.connect(f"file:{lazyd_root / 'cache' / 'cache.db'}?mode=ro", uri=True, timeout=30)
    try:
        return int(con.execute("SELECT COUNT(*) FROM Cache WHERE raw = 1").fetchone()[0])
    finally:
        con.close()


def worker_json_pids(lazyd_root: Path) -> list[int]:
    """The worker pids recorded under ``lazyd_root`` (a recorded pid may be dead or reused)."""
    pids = []
    for info in lazyd_root.glob("workers/*/worker.json"):
        try:
            pids.append(int(json.loads(info.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    return pids


def worker_processes(lazyd_root: Path) -> list[int]:
    """Live ``lazyd.fuse.worker`` processes of ``lazyd_root`` (found by command line, so not a reused pid)."""
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ")
            zombie = "State:\tZ" in (proc_dir / "status").read_text()
        except OSError:
            continue
        if not zombie and b"lazyd.fuse.worker" in cmdline and str(lazyd_root).encode() in cmdline:
            pids.append(int(proc_dir.name))
    return pids


def stop_workers(lazyd_root: Path, timeout: float = 10) -> None:
    """SIGTERM the FUSE workers of ``lazyd_root``, then SIGKILL those still running after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = worker_processes(lazyd_root)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not pids or sig == signal.SIGKILL:
            return
        try:
            wait_until(lambda: not worker_processes(lazyd_root), timeout, "FUSE workers to exit", interval=0.1)
            return
        except TimeoutError:
            continue


def unmount_all_below(path: Path, rounds: int = 4) -> None:
    """Lazily unmount everything at or below ``path``, stacked mounts (bind over bind) included."""
    for _ in range(rounds):
        if not mountpoints_below(path):
            return
        unmount_below(path)
        time.sleep(0.05)


def start_snapshotter(root: Path, address: Path, lazyd_socket: Path, log: Path, args: Sequence[str] = (),
                      timeout: float = 30) -> Proc:
    """Start ``lazyd snapshotter`` serving ``address`` for the lazyd at ``lazyd_socket``; wait for its socket.

    Raises RuntimeError (with the log's tail) when it exits first; the caller stops the returned Proc.
    """
    snap = Proc(["lazyd", "snapshotter", "--root", str(root), "--address", str(address),
                 "--lazyd-socket", str(lazyd_socket), *args], log)
    try:
        wait_until(lambda: address.exists() or not snap.alive(), timeout, "lazyd snapshotter socket")
    except TimeoutError:
        snap.stop()
        raise
    if not snap.alive():
        raise RuntimeError(f"lazyd snapshotter exited:\n{snap.log_text()[-3000:]}")
    return snap
