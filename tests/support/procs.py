"""Start and stop real helper processes (registry, containerd, daemons) for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefer_this_interpreters_tools() -> None:
    """Put the directory of ``sys.executable`` first on ``PATH``, and byte-compile lazyd.

    ``lazyctl`` and ``lazyd`` started by name are then the ones installed with this
    interpreter (``/opt/lazyd/venv/bin`` when run with the venv's Python, as ``scripts/test``
    does), not whatever another Python install put earlier on ``PATH``. Their modules have
    up-to-date bytecode, as an install leaves them: under ``PYTHONDONTWRITEBYTECODE`` a
    module edited since the last compile would be compiled again by every process start,
    which benchmarks would time (``lazyctl rpull --help`` 95 ms against 45 ms).
    """
    bindir = os.path.dirname(sys.executable)
    os.environ["PATH"] = os.pathsep.join([bindir, *(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                    if p != bindir)])
    import compileall

    import lazyd
    compileall.compile_dir(os.path.dirname(lazyd.__file__), quiet=2)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true, or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie counts: it has not been reaped yet)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def shutdown_quietly(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """``sock.shutdown(how)``, ignoring the error of a socket that is already closed or never connected."""
    try:
        sock.shutdown(how)
    except OSError:
        pass


class Proc:
    """A background process whose output goes to a log file; stopped with ``stop()``."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.argv = argv
        self.log_path = log
        self._log = open(log, "ab")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process and wait for it (SIGKILL after ``timeout``)."""
        if self.alive():
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode
