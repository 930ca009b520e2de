"""FUSE worker processes: spawn, adopt, health-check.

Workers run ``python3 -m lazyd.fuse.worker`` in their own session, so they
outlive the fetcher.  A new fetcher adopts a worker whose ``worker.json`` names a
live ``lazyd.fuse.worker`` process with an answering control socket; every worker found
under ``<root>/workers`` is adopted, also one whose id is not below the configured count
(after ``workers`` was lowered): such a worker is *draining*, it keeps serving the mounts it
has, gets no new ones and is stopped once it has none.  Liveness
is checked every ``health_interval`` (child exit status for our own children,
``/proc`` for adopted ones); a death is reported to ``on_death``.

The tracing worker (id ``TRACE_WORKER_ID``, state in ``<root>/workers/trace``, started with
``--trace``) serves only mounts asked for with ``trace``.  It is started on demand
(``tracer``), is not one of the ``count`` workers, is never picked for other mounts (it is
handled like a draining worker), is adopted after a fetcher restart like the others and is
stopped (``retire``) once it serves no mount.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from lazyd.api.client import AsyncClient
from lazyd.api.messages import UNAVAILABLE, ApiError, Empty, Message, WorkerStatusResult

log = logging.getLogger(__name__)

TRACE_WORKER_ID = -1
TRACE_DIR = "trace"


@dataclass
class WorkerHandle:
    """One worker process as the fetcher sees it."""

    worker_id: int
    state_dir: Path
    pid: int = 0
    proc: subprocess.Popen[bytes] | None = None
    client: AsyncClient | None = None
    state: str = "starting"  # starting, ready, dead
    restarts: int = 0
    adopted: bool = False
    draining: bool = False
    started_at: float = field(default_factory=time.time)

    @property
    def tracing(self) -> bool:
        """The tracing worker (it drains: gets no ordinary mounts, stops when idle)."""
        return self.worker_id == TRACE_WORKER_ID

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_is_worker(self.pid)

    async def call(self, op: str, args: Message | dict[str, object] | None = None, timeout: float = 30.0) -> object:
        if self.client is None or self.state == "dead":
            raise ApiError(UNAVAILABLE, f"worker {self.worker_id} is not running")
        return await self.client.request(op, args if args is not None else Empty(), timeout)


def pid_is_worker(pid: int) -> bool:
    """True when ``pid`` is a running (not zombie) ``lazyd.fuse.worker`` process."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and b"lazyd.fuse.worker" in cmdline


class WorkerError(Exception):
    """A worker could not be started."""


class Supervisor:
    """Starts (or adopts) ``count`` workers and watches them."""

    def __init__(self, root: Path, count: int, socket_path: str, cache_dir: Path, cache_size: int,
                 fetch_timeout: float, log_level: str, start_timeout: float, interval: float,
                 on_death: Callable[[WorkerHandle], Awaitable[None]], log_format: str = "text",
                 fuse_backend: str = "pyfuse3", xattr_free: bool = False) -> None:
        self.root = root
        self.count = count
        self.socket_path = socket_path
        self.cache_dir = cache_dir
        self.cache_size = cache_size
        self.fetch_timeout = fetch_timeout
        self.log_level = log_level
        self.log_format = log_format
        self.fuse_backend = fuse_backend
        self.xattr_free = xattr_free
        self.start_timeout = start_timeout
        self.interval = interval
        self.on_death = on_death
        self.workers: dict[int, WorkerHandle] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._restarting: set[int] = set()
        self._tracer_lock = asyncio.Lock()

    def xattrs_mode(self, worker_id: int) -> str:
        """``--xattrs`` of a worker: ``auto`` for every ordinary worker but the last with
        ``xattr_free``, so that one always serves layers with extended attributes; else ``on``."""
        return "auto" if self.xattr_free and 0 <= worker_id < self.count - 1 else "on"

    def state_dir(self, worker_id: int) -> Path:
        if worker_id == TRACE_WORKER_ID:
            return self.root / "workers" / TRACE_DIR
        return self.root / "workers" / str(worker_id)

    def found_ids(self) -> set[int]:
        """Ids of the worker state directories under ``<root>/workers``."""
        try:
            names = [p.name for p in (self.root / "workers").iterdir() if p.is_dir()]
        except OSError:
            return set()
        return {int(name) for name in names if name.isdecimal()}

    async def start(self) -> dict[int, WorkerStatusResult]:
        """Adopt every live worker, spawn the missing ones; returns the status of adopted workers.

        A live worker whose id is ``count`` or more is adopted as draining."""
        (self.root / "workers").mkdir(parents=True, exist_ok=True, mode=0o700)
        adopted: dict[int, WorkerStatusResult] = {}

        async def one(worker_id: int) -> None:
            status = await self._adopt(worker_id)
            if status is not None:
                adopted[worker_id] = status
                if worker_id == TRACE_WORKER_ID:
                    self.workers[worker_id].draining = True  # it stops once it serves no mount
                elif worker_id >= self.count:
                    self.workers[worker_id].draining = True
                    log.info("worker %d is beyond workers = %d: it drains (%d mount(s)) and then stops",
                             worker_id, self.count, len(status.mounts))
            elif 0 <= worker_id < self.count:
                self.workers[worker_id] = await self.spawn(worker_id)

        ids = set(range(self.count)) | self.found_ids() | {TRACE_WORKER_ID}
        # Concurrently: a worker spends its start-up in its own process, so N start in about the time of one.
        results = await asyncio.gather(*(one(worker_id) for worker_id in sorted(ids)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._monitor = asyncio.create_task(self._watch())
        return adopted

    async def _adopt(self, worker_id: int) -> WorkerStatusResult | None:
        info_path = self.state_dir(worker_id) / "worker.json"
        try:
            info = json.loads(info_path.read_text())
            pid = int(info["pid"])
            control = str(info["control_socket"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not pid_is_worker(pid):
            return None
        client = AsyncClient(control, timeout=10.0, connect_timeout=2.0)
        try:
            status: WorkerStatusResult = await client.request("worker.status", Empty(), 10.0)
        except ApiError as exc:
            log.warning("worker %d (pid %d) does not answer (%s); starting a new one", worker_id, pid, exc)
            await client.close()
            return None
        self.workers[worker_id] = WorkerHandle(worker_id, self.state_dir(worker_id), pid=pid, client=client,
                                               state="ready", adopted=True)
        log.info("adopted worker %d (pid %d) with %d mount(s)", worker_id, pid, len(status.mounts),
                 extra={"event": "adoption", "worker": worker_id, "pid": pid, "mounts": len(status.mounts)})
        return status

    async def spawn(self, worker_id: int, restarts: int = 0) -> WorkerHandle:
        """Start a worker process and wait until its control socket answers."""
        state_dir = self.state_dir(worker_id)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        info_path = state_dir / "worker.json"
        info_path.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "lazyd.fuse.worker", "--worker-id", str(worker_id), "--state-dir", str(state_dir),
                "--fetcher-socket", self.socket_path, "--cache-dir", str(self.cache_dir),
                "--cache-size", str(self.cache_size), "--fetch-timeout", str(self.fetch_timeout),
                "--log-level", self.log_level, "--log-format", self.log_format, "--fuse-backend", self.fuse_backend,
                "--xattrs", self.xattrs_mode(worker_id)]
        if worker_id == TRACE_WORKER_ID:
            argv.append("--trace")
        fd = os.open(state_dir / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                                    close_fds=True)
        finally:
            os.close(fd)
        handle = WorkerHandle(worker_id, state_dir, pid=proc.pid, proc=proc, restarts=restarts)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                raise WorkerError(f"worker {worker_id} exited with status {proc.returncode} while starting; "
                                  f"see {state_dir / 'worker.log'}")
            try:
                info = json.loads(info_path.read_text())
                if int(info["pid"]) == proc.pid:
                    break
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise WorkerError(f"worker {worker_id} did not start within {self.start_timeout}s; "
                                  f"see {state_dir / 'worker.log'}")
            await asyncio.sleep(0.05)
        handle.client = AsyncClient(str(info["control_socket"]), timeout=30.0, connect_timeout=2.0)
        handle.state = "ready"
        log.info("started worker %d (pid %d)", worker_id, proc.pid,
                 extra={"event": "worker_start", "worker": worker_id, "pid": proc.pid})
        return handle

    async def restart(self, dead: WorkerHandle) -> WorkerHandle:
        """Replace a dead worker by a new process with the same id."""
        if dead.client is not None:
            await dead.client.close()
        if dead.proc is not None:
            dead.proc.poll()
        handle = await self.spawn(dead.worker_id, restarts=dead.restarts + 1)
        self.workers[dead.worker_id] = handle
        return handle

    async def retire(self, handle: WorkerHandle) -> None:
        """Stop a draining worker that serves nothing any more and forget it."""
        if handle.tracing:
            async with self._tracer_lock:  # a tracer() waiting for it starts a new one after it exited
                if self.workers.get(handle.worker_id) is handle:
                    self.workers.pop(handle.worker_id, None)
                    await self._stop_one(handle)
                    log.info("stopped the tracing worker (pid %d)", handle.pid)
            return
        self.workers.pop(handle.worker_id, None)
        await self._stop_one(handle)
        log.info("stopped draining worker %d (pid %d)", handle.worker_id, handle.pid)

    async def tracer(self) -> WorkerHandle:
        """The tracing worker, started if none is running."""
        async with self._tracer_lock:
            handle = self.workers.get(TRACE_WORKER_ID)
            if handle is not None and handle.state == "ready":
                return handle
            if handle is not None:  # dead: on_death forgets it; do not wait for that
                self.workers.pop(TRACE_WORKER_ID, None)
                if handle.client is not None:
                    await handle.client.close()
            handle = await self.spawn(TRACE_WORKER_ID)
            handle.draining = True
            self.workers[TRACE_WORKER_ID] = handle
            return handle

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for handle in list(self.workers.values()):
                if handle.state == "ready" and not handle.alive():
                    handle.state = "dead"
                    log.error("worker %d (pid %d) died", handle.worker_id, handle.pid,
                              extra={"event": "worker_death", "worker": handle.worker_id, "pid": handle.pid})
                    try:
                        await self.on_death(handle)
                    except Exception:  # noqa: BLE001 - keep watching the others
                        log.exception("handling the death of worker %d failed", handle.worker_id)

    async def stop_watching(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except (asyncio.CancelledError, Exception):
                pass
            self._monitor = None

    async def detach(self) -> None:
        """Stop watching and close control connections; the workers keep running."""
        await self.stop_watching()
        for handle in self.workers.values():
            if handle.client is not None:
                await handle.client.close()

    async def shutdown(self) -> None:
        """Ask every worker to unmount everything and exit; wait for them."""
        await self.stop_watching()
        for handle in self.workers.values():
            await self._stop_one(handle)

    async def _stop_one(self, handle: WorkerHandle) -> None:
        """Ask one worker to unmount everything and exit; kill it after 15 s."""
        if handle.state != "dead":
            try:
                await handle.call("worker.shutdown", timeout=30.0)
            except ApiError as exc:
                log.warning("worker %d shutdown: %s", handle.worker_id, exc)
        deadline = time.monotonic() + 15
        while handle.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if handle.alive():
            log.error("worker %d (pid %d) did not exit; killing it", handle.worker_id, handle.pid)
            try:
                os.kill(handle.pid, 9)
            except ProcessLookupError:
                pass
        if handle.proc is not None:
            await asyncio.to_thread(handle.proc.wait)
        if handle.client is not None:
            await handle.client.close()
        (handle.state_dir / "worker.json").unlink(missing_ok=True)
        handle.state = "dead"
