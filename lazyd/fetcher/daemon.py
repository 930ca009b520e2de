"""``lazyd serve``: the fetcher process (API ops, mounts, prefetch, background fetch, workers).

Mount records are persisted in ``<root>/mounts/<mount_id>.json`` so that a new
fetcher (after a crash, ``kill -9`` or SIGTERM) adopts the running workers and
their mounts.  SIGTERM/SIGINT stop the fetcher only; the ``shutdown`` op is the
clean stop that unmounts everything and stops the workers.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lazyd.api.messages import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    INVALID_REQUEST,
    MAX_LAYER_REPORTS,
    NOT_FOUND,
    UNAVAILABLE,
    ApiError,
    CacheArgs,
    CacheStats,
    CheckArgs,
    CheckResult,
    Empty,
    FallbackArgs,
    FallbackInfo,
    FetchArgs,
    LayerPromotion,
    LayerStateArgs,
    LayerStateInfo,
    LayerStateResult,
    LayerStats,
    Message,
    MountArgs,
    MountInfo,
    MountResult,
    MountsResult,
    ProfileData,
    ProfileDigestArgs,
    ProfileListResult,
    ProfilePutArgs,
    ProfileSummary,
    PromoteArgs,
    PromoteResult,
    PullArgs,
    PullProgressArgs,
    PullProgressResult,
    PullResult,
    ResolveArgs,
    ResolveResult,
    StatusResult,
    Totals,
    TraceArgs,
    TraceResult,
    UnmountArgs,
    WorkerInfo,
    WorkerMountArgs,
    WorkerMountStatus,
    WorkerStatusResult,
)
from lazyd import mounttable
from lazyd.api.server import Handler, Server
from lazyd.atomicfile import atomic_write
from lazyd.cache.store import ChunkStore
from lazyd.config import DaemonConfig
from lazyd.fetcher.layers import Layer, LayerTable, Member, ProfilePlan, TOCFile, profile_plan, registry_error
from lazyd.fetcher.profiles import ProfileFinder, ProfileUse
from lazyd.fetcher.scheduler import Scheduler
from lazyd.fetcher.workers import Supervisor, WorkerError, WorkerHandle
from lazyd.metrics import (
    BACKGROUND_FETCH_DOWNLOAD,
    BACKGROUND_FETCH_TOTAL,
    MOUNT,
    PREFETCH_DOWNLOAD,
    READ_ON_DEMAND,
    Metrics,
    MetricsError,
    MetricsServer,
    MountGauge,
    RegistryMetrics,
    Snapshot,
    WorkerCounts,
    render,
)
from lazyd.profile.store import ProfileStore, ProfileStoreError
from lazyd.registry import InvalidReferenceError, Reference, RegistryClient, RegistryError

log = logging.getLogger(__name__)

VERSION = "0.1.0"
MAX_FALLBACKS_SHOWN = 100
COUNTERS_SAVE_INTERVAL = 5.0  # seconds; a kill -9 loses at most this much of the per-layer counts
LAYER_COLLECT_INTERVAL = 60.0  # seconds between passes that forget layers no mount uses
METRICS_WORKER_TIMEOUT = 1.0
"""Longest a scrape waits for a worker's ``worker.status`` (a worker that does not answer in time
is left out of that scrape and counted in ``lazyd_workers_unanswered``)."""


def _parse_ref(text: str) -> Reference:
    """The image reference of a request; ``invalid_request`` naming the field when malformed."""
    try:
        return Reference.parse(text)
    except (InvalidReferenceError, ValueError) as exc:
        raise ApiError(INVALID_REQUEST, f"ref: {exc}") from None


@dataclass
class MountRecord:
    """One mount; the persisted part is everything but ``state`` and ``error``."""

    mount_id: str
    ref: str
    layer_digest: str
    toc_digest: str
    mountpoint: str
    worker_id: int
    state: str = field(default="mounting", compare=False)
    profile: str | None = None  # manifest digest of the prefetch profile used (docs/profiles.md)
    profile_source: str | None = None
    profile_files: int = 0
    profile_bytes: int = 0
    error: str | None = field(default=None, compare=False)

    def persisted(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("state")
        d.pop("error")
        return d


class Daemon:
    """The fetcher: owns the store, registry client, layers, scheduler, workers and API server."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.root = config.root_path
        self.started_at = time.time()
        self.mounts: dict[str, MountRecord] = {}
        self.fallbacks: list[FallbackInfo] = []
        self.fallback_count = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}  # per-layer prefetch/background task
        self._prefetch: dict[str, asyncio.Task[None]] = {}
        self._profile_tasks: set[asyncio.Task[None]] = set()  # profile prefetches of a layer already prefetched
        self._stop = asyncio.Event()
        self._clean = False
        self._mount_lock = asyncio.Lock()
        self._claimed: set[str] = set()  # mountpoints with a mount in progress
        # Layers a worker refused for their extended attributes (config xattr_free_workers).
        self._xattr_layers: set[str] = set()
        self._restored = asyncio.Event()  # set once workers are up and mounts restored
        self._pulls: Any = None  # lazyd.containerd.service.PullService, made by the first ``pull``
        self._pull_imports: asyncio.Task[Any] | None = None
        self.metrics = Metrics()
        self._metrics_server: MetricsServer | None = None
        self._evictions_logged = 0  # store evictions already reported in the log
        # Promotion (docs/design.md "Promotion"): what the snapshotter reports with ``layer_state``.
        self._promote_mode: str | None = None  # its ``promote`` setting; None until it reports
        self._layer_states: dict[str, LayerStateInfo] = {}  # digest -> promoting/local, oldest first
        self._promote_requested: dict[str, float] = {}  # digest -> when ``promote`` asked for it
        self._promote_wakeup = asyncio.Event()  # set (and replaced) by each ``promote``
        self._complete: dict[str, tuple[int, bool]] = {}  # digest -> (fetched_bytes, wholly cached) when checked
        self.store: ChunkStore
        self.registry: RegistryClient
        self.layers: LayerTable
        self.scheduler: Scheduler
        self.supervisor: Supervisor
        self.server: Server

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (workers keep running) or the ``shutdown`` op (clean stop)."""
        cfg = self.config
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "mounts").mkdir(exist_ok=True, mode=0o700)
        self.store = ChunkStore(self.root / "cache", cfg.cache_size)
        self.registry = RegistryClient(cfg.registry, RegistryMetrics(self.metrics))
        self.layers = LayerTable(self.root, self.registry, self.metrics)
        self.profiles = ProfileStore(self.root / "profiles")
        self.profile_finder = ProfileFinder(cfg.profiles, self.profiles, self.registry, self.layers,
                                            cfg.profile_timeout)
        self.scheduler = Scheduler(self.registry, self.store, cfg.max_concurrent_requests, cfg.max_range_size,
                                   window_min=cfg.demand_window_min, window_max=cfg.demand_window_max,
                                   background_share=cfg.background_share, quiet=cfg.background_delay,
                                   share_after=cfg.background_share_after, metrics=self.metrics)
        self.server = Server(cfg.socket, self._ops(), cfg.socket_group)
        await self.server.start()
        log.info("lazyd %s serving %s (root %s)", VERSION, cfg.socket, self.root)
        metrics_address = cfg.metrics
        if metrics_address is not None:
            server = MetricsServer(metrics_address, self._scrape, cfg.socket_group)
            try:
                await server.start()
            except MetricsError as exc:
                log.error("%s", exc)
                await self.server.close()
                await self.registry.close()
                self.scheduler.close()
                self.store.close()
                return 1
            self._metrics_server = server
            log.info("metrics on %s/metrics", f"unix:{metrics_address}" if metrics_address.path else
                     f"http://{metrics_address}")
        self.supervisor = Supervisor(self.root, cfg.workers, cfg.socket, self.root / "cache", cfg.cache_size,
                                     cfg.fetch_timeout, cfg.log_level, cfg.worker_start_timeout,
                                     cfg.health_interval, self._worker_died, cfg.log_format, cfg.fuse_backend,
                                     cfg.xattr_free_workers)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        # gRPC + protobuf for the ``pull`` op: imported off the loop while the workers start, not by the first pull.
        self._pull_imports = asyncio.create_task(asyncio.to_thread(importlib.import_module, "lazyd.containerd.service"))
        try:
            try:
                adopted = await self.supervisor.start()
            except WorkerError as exc:
                log.error("cannot start the FUSE workers: %s", exc)
                return 1
            self.metrics.workers_adopted += len(adopted)
            await self._restore_mounts(adopted)
            await self._retire_idle_workers()
            self._restored.set()
            saver = asyncio.create_task(self._save_counters_every(COUNTERS_SAVE_INTERVAL))
            try:
                await self._stop.wait()
            finally:
                saver.cancel()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._close()
        return 0

    async def _save_counters_every(self, interval: float) -> None:
        """Save the layer counters, and forget the layers no mount uses (``LayerTable.collect``)."""
        collected = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            self.layers.save_counters()
            self._log_evictions()
            if time.monotonic() - collected < LAYER_COLLECT_INTERVAL:
                continue
            collected = time.monotonic()
            in_use = {m.layer_digest for m in self.mounts.values()} | set(self._tasks) | set(self._prefetch)
            for digest in await self.layers.collect(in_use, self._has_chunks):
                self.scheduler.forget(digest)
                self.metrics.forget_layer(digest)

    def _log_evictions(self) -> None:
        """One INFO line for the chunks evicted to stay under ``cache_size`` since the last one
        (evictions come with every store at the cap: a line each would flood the log)."""
        total = self.store.evictions
        if total > self._evictions_logged:
            log.info("cache: evicted %d chunk(s) (least recently used) to stay under cache_size (%d bytes)",
                     total - self._evictions_logged, self.store.size_limit,
                     extra={"event": "eviction", "chunks": total - self._evictions_logged,
                            "evictions_total": total})
            self._evictions_logged = total

    def _has_chunks(self, digest: str) -> bool:
        """Whether the chunk store holds any chunk of layer ``digest`` (runs in a thread)."""
        return self.store.layer_usage(digest)[0] > 0

    async def _close(self) -> None:
        if self._metrics_server is not None:
            await self._metrics_server.close()
        for task in list(self._tasks.values()) + list(self._prefetch.values()) + list(self._profile_tasks):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), *self._prefetch.values(), *self._profile_tasks,
                             return_exceptions=True)
        self.layers.save_counters()
        if self._clean:
            await self._unmount_everything()
        elif hasattr(self, "supervisor"):
            await self.supervisor.detach()
            log.info("stopping without unmounting: %d mount(s) stay served by the workers", len(self.mounts))
        await self.server.close()
        if self._pulls is not None:
            await self._pulls.close()
        await self.registry.close()
        self.scheduler.close()
        self.store.close()

    async def _unmount_everything(self) -> None:
        await self.supervisor.shutdown()
        for record in list(self.mounts.values()):
            await asyncio.to_thread(_lazy_unmount, record.mountpoint)
            self._forget_mount(record)

    # -- mount records ----------------------------------------------------------------

    def _record_path(self, mount_id: str) -> Path:
        return self.root / "mounts" / f"{mount_id}.json"

    def _save_mount(self, record: MountRecord) -> None:
        atomic_write(self._record_path(record.mount_id), json.dumps(record.persisted()).encode(), sync=False)

    def _forget_mount(self, record: MountRecord) -> None:
        self.mounts.pop(record.mount_id, None)
        self._record_path(record.mount_id).unlink(missing_ok=True)
        if not any(m.layer_digest == record.layer_digest for m in self.mounts.values()):
            for tasks in (self._tasks, self._prefetch):
                task = tasks.pop(record.layer_digest, None)
                if task is not None:
                    task.cancel()

    async def _restore_mounts(self, adopted: dict[int, WorkerStatusResult]) -> None:
        """Rebuild the mount table from ``<root>/mounts``: adopt live ones, re-establish the rest."""
        live = {m.mount_id: (wid, m) for wid, st in adopted.items() for m in st.mounts}
        for path in sorted((self.root / "mounts").glob("*.json")):
            try:
                record = MountRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable mount record %s: %s", path, exc)
                continue
            if record.mount_id in self.mounts:
                continue
            self.mounts[record.mount_id] = record
            if await self.layers.load(record.layer_digest) is None:
                record.state, record.error = "error", f"layer metadata of {record.layer_digest} is missing"
                continue
            found = live.pop(record.mount_id, None)
            if found is not None and found[0] == record.worker_id:
                record.state = "ready"
                self.metrics.mounts_adopted += 1
                log.info("adopted mount %s at %s (layer %s, worker %d)", record.mount_id, record.mountpoint,
                         record.layer_digest, record.worker_id,
                         extra={"event": "adoption", "mount_id": record.mount_id, "layer": record.layer_digest,
                                "mountpoint": record.mountpoint, "worker": record.worker_id})
            else:
                record.state = "broken"
                await self._reestablish(record)
            self._start_background(record.layer_digest)
        for mount_id, (wid, m) in live.items():
            log.warning("worker %d serves unknown mount %s at %s; unmounting it", wid, mount_id, m.mountpoint)
            try:
                await self.supervisor.workers[wid].call("worker.unmount", {"mount_id": mount_id})
            except ApiError as exc:
                log.error("unmounting unknown mount %s: %s", mount_id, exc)

    async def _reestablish(self, record: MountRecord) -> None:
        """Mount ``record`` again (same id and mountpoint) on its worker, or the least loaded one."""
        layer = await self.layers.load(record.layer_digest)
        if layer is None:
            record.state, record.error = "error", f"layer {record.layer_digest} is unknown"
            return
        handle = self.supervisor.workers.get(record.worker_id)
        if handle is None or handle.state != "ready" or handle.draining:
            handle = self._pick_worker(record.layer_digest)
        try:
            await self._worker_mount(handle, record, layer.toc_file)
        except ApiError as exc:
            if exc.code == ALREADY_EXISTS and await self._worker_serves(handle, record):
                record.worker_id = handle.worker_id
                record.state, record.error = "ready", None
                return
            record.state, record.error = "broken", f"re-establishing the mount failed: {exc.message}"
            log.error("re-establishing mount %s at %s failed: %s", record.mount_id, record.mountpoint, exc)
            return
        handle = self.supervisor.workers[record.worker_id]  # _worker_mount set it
        record.state, record.error = "ready", None
        self._save_mount(record)
        self.metrics.mounts_reestablished += 1
        log.info("re-established mount %s at %s on worker %d (layer %s)", record.mount_id, record.mountpoint,
                 handle.worker_id, record.layer_digest,
                 extra={"event": "mount", "mount_id": record.mount_id, "layer": record.layer_digest,
                        "mountpoint": record.mountpoint, "worker": handle.worker_id, "reestablished": True})

    async def _worker_serves(self, handle: WorkerHandle, record: MountRecord) -> bool:
        try:
            st: WorkerStatusResult = await handle.call("worker.status", timeout=5.0)  # type: ignore[assignment]
        except ApiError:
            return False
        return any(m.mount_id == record.mount_id and m.mountpoint == record.mountpoint for m in st.mounts)

    async def _worker_mount(self, handle: WorkerHandle, record: MountRecord, toc: TOCFile) -> None:
        """Mount ``record`` on ``handle``'s worker; a worker that has told the kernel it has no
        extended attributes refuses a layer with some, and the next worker is asked (the ones
        that always serve them first), the layer remembered for its next mounts.  On success
        ``record.worker_id`` names the worker that took it (saved when that is another one)."""
        tried: set[int] = set()
        while True:
            try:
                await self._worker_mount_on(handle, record, toc)
            except ApiError as exc:
                if exc.code != FAILED_PRECONDITION:
                    raise
                tried.add(handle.worker_id)
                self._xattr_layers.add(record.layer_digest)
                others = [w for w in self._ready_workers() if w.worker_id not in tried]
                if not others:
                    raise ApiError(UNAVAILABLE, f"no worker can serve layer {record.layer_digest}: {exc.message}") \
                        from None
                handle = self._least_loaded(others, xattrs=True)
                log.info("layer %s has extended attributes: mounting it on worker %d", record.layer_digest,
                         handle.worker_id)
                continue
            if record.worker_id != handle.worker_id:
                record.worker_id = handle.worker_id
                self._save_mount(record)
            return

    async def _worker_mount_on(self, handle: WorkerHandle, record: MountRecord, toc: TOCFile) -> None:
        meta = toc.meta
        args = WorkerMountArgs(mount_id=record.mount_id, mountpoint=record.mountpoint, layer_digest=meta.layer_digest,
                               toc_digest=meta.toc_digest, toc_path=str(toc.toc_path), blob_size=meta.blob_size,
                               inodes_path=str(toc.inodes_path) if toc.inodes_path else None)
        try:
            await handle.call("worker.mount", args, timeout=self.config.mount_timeout)
        except ApiError as exc:
            if args.inodes_path is None or "unknown field 'inodes_path'" not in exc.message:
                raise
            # An adopted worker of an older lazyd: it parses the TOC itself.
            await handle.call("worker.mount", replace(args, inodes_path=None),
                              timeout=self.config.mount_timeout)

    async def _undo_worker_mount(self, handle: WorkerHandle, record: MountRecord,
                                 mounting: asyncio.Future[None]) -> None:
        """A mount failed (its layer's open, or the worker): once the worker has answered, undo
        what it mounted (not cancelled: a worker that mounts after all would leave it behind)."""
        try:
            await asyncio.shield(mounting)
        except (ApiError, asyncio.CancelledError):
            pass
        if mounting.done() and not mounting.cancelled() and mounting.exception() is None:
            handle = self.supervisor.workers.get(record.worker_id, handle)  # it may have moved (_worker_mount)
            try:
                await handle.call("worker.unmount", {"mount_id": record.mount_id})
            except ApiError as exc:
                log.warning("cannot undo mount %s at %s: %s", record.mount_id, record.mountpoint, exc)
        self._forget_mount(record)

    async def _worker_died(self, handle: WorkerHandle) -> None:
        """Mark the worker's mounts broken, start a new worker and mount them again."""
        broken = [m for m in self.mounts.values() if m.worker_id == handle.worker_id]
        for record in broken:
            record.state = "broken"
            record.error = f"worker {handle.worker_id} (pid {handle.pid}) died"
        if handle.draining:  # not replaced: its mounts move to the configured workers
            self.supervisor.workers.pop(handle.worker_id, None)
            for record in broken:
                await self._reestablish(record)
            return
        try:
            new = await self.supervisor.restart(handle)
        except WorkerError as exc:
            log.error("restarting worker %d failed: %s", handle.worker_id, exc,
                      extra={"event": "worker_restart", "worker": handle.worker_id, "ok": False})
            for record in broken:
                record.error = f"{record.error}; restart failed: {exc}"
            return
        self.metrics.worker_restarts += 1
        log.info("restarted worker %d (pid %d, was %d; restart %d); mounting its %d mount(s) again", new.worker_id,
                 new.pid, handle.pid, new.restarts, len(broken),
                 extra={"event": "worker_restart", "worker": new.worker_id, "pid": new.pid, "old_pid": handle.pid,
                        "restarts": new.restarts, "mounts": len(broken)})
        for record in broken:
            await self._reestablish(record)

    async def _retire_idle_workers(self) -> None:
        """Stop the draining workers (ids beyond ``workers``) that serve no mount any more."""
        for handle in list(self.supervisor.workers.values()):
            # Checked per worker: a mount may arrive while an earlier one is being stopped.
            if handle.draining and not any(m.worker_id == handle.worker_id for m in self.mounts.values()):
                await self.supervisor.retire(handle)

    def _ready_workers(self) -> list[WorkerHandle]:
        return [w for w in self.supervisor.workers.values() if w.state == "ready" and not w.draining]

    def _pick_worker(self, layer_digest: str | None = None) -> WorkerHandle:
        """The least loaded worker of those that suit the layer: for a layer known to have extended
        attributes the ones that always serve them, for any other the ones that may turn them off
        (``xattr_free_workers``: the kernel then asks them for none); the others if none is ready."""
        ready = self._ready_workers()
        if not ready:
            raise ApiError(UNAVAILABLE, "no FUSE worker is running")
        return self._least_loaded(ready, xattrs=layer_digest in self._xattr_layers)

    def _least_loaded(self, workers: list[WorkerHandle], xattrs: bool) -> WorkerHandle:
        load = {w.worker_id: 0 for w in workers}
        for m in self.mounts.values():
            if m.worker_id in load:
                load[m.worker_id] += 1
        return min(workers, key=lambda w: ((self.supervisor.xattrs_mode(w.worker_id) == "on") != xattrs,
                                           load[w.worker_id], w.worker_id))

    # -- ops ----------------------------------------------------------------------------

    def _ops(self) -> dict[str, tuple[type[Message], Handler]]:
        return {
            "fetch": (FetchArgs, self.op_fetch),
            "mount": (MountArgs, self._after_restore(self.op_mount)),
            "unmount": (UnmountArgs, self._after_restore(self.op_unmount)),
            "check": (CheckArgs, self._after_restore(self.op_check)),
            "status": (Empty, self._after_restore(self.op_status)),
            "mounts": (Empty, self._after_restore(self.op_mounts)),
            "cache": (CacheArgs, self._after_restore(self.op_cache)),
            "fallback": (FallbackArgs, self.op_fallback),
            "resolve": (ResolveArgs, self.op_resolve),
            "pull": (PullArgs, self.op_pull),
            "pull_progress": (PullProgressArgs, self.op_pull_progress),
            "shutdown": (Empty, self._after_restore(self.op_shutdown)),
            "promote": (PromoteArgs, self._after_restore(self.op_promote)),
            "layer_state": (LayerStateArgs, self._after_restore(self.op_layer_state)),
            "trace": (TraceArgs, self._after_restore(self.op_trace)),
            "profile_put": (ProfilePutArgs, self.op_profile_put),
            "profile_get": (ProfileDigestArgs, self.op_profile_get),
            "profile_list": (Empty, self.op_profile_list),
            "profile_delete": (ProfileDigestArgs, self.op_profile_delete),
        }

    def _after_restore(self, handler: Handler) -> Handler:
        """Hold a request until the workers are up and the mount table is restored."""
        async def wrapped(args: Any) -> Message | None:
            await self._restored.wait()
            return await handler(args)
        return wrapped

    async def op_fetch(self, args: FetchArgs) -> None:
        layer = await self.layers.load(args.layer_digest)
        if layer is None:
            raise ApiError(NOT_FOUND, f"layer {args.layer_digest} is not known to this fetcher")
        members: dict[int, Member] = {}
        for blob_offset, inner_offset in args.chunks:
            member = layer.by_chunk.get((blob_offset, inner_offset))
            if member is None:
                raise ApiError(INVALID_REQUEST, f"layer {layer.digest} has no chunk at blob offset {blob_offset} "
                                                f"inner offset {inner_offset}")
            members[member.blob_offset] = member
        if args.priority != "demand":
            await self.scheduler.fetch(layer, members.values(), args.priority)
            return
        started = time.monotonic()
        try:
            await self.scheduler.fetch(layer, members.values(), args.priority)
        finally:
            # A worker's read that missed the cache waits this long for the fetcher.
            self.metrics.observe_us(READ_ON_DEMAND, layer.digest, time.monotonic() - started)

    async def op_mount(self, args: MountArgs) -> MountResult:
        self.scheduler.note_activity()  # a container is starting: hold background fetch back
        ref = _parse_ref(args.ref)
        mountpoint = os.path.normpath(args.mountpoint)
        if not await asyncio.to_thread(os.path.isdir, mountpoint):
            raise ApiError(INVALID_REQUEST, f"mountpoint {mountpoint} is not a directory")
        async with self._mount_lock:
            if mountpoint in self._claimed or any(m.mountpoint == mountpoint for m in self.mounts.values()):
                raise ApiError(ALREADY_EXISTS, f"{mountpoint} is already mounted")
            self._claimed.add(mountpoint)
        started = time.monotonic()
        try:
            toc, opening = await self.layers.open_toc(ref, args.layer_digest, args.toc_digest,
                                                      self.config.mount_timeout)
            if args.trace:
                try:
                    handle = await self.supervisor.tracer()
                except WorkerError as exc:
                    raise ApiError(UNAVAILABLE, f"cannot start the tracing worker: {exc}") from None
            else:
                handle = self._pick_worker(args.layer_digest)
            record = MountRecord(uuid.uuid4().hex[:16], str(ref), toc.meta.layer_digest, toc.meta.toc_digest,
                                 mountpoint, handle.worker_id)
            self.mounts[record.mount_id] = record
            self._save_mount(record)
            # The worker builds its inode table from the saved TOC while this process parses the
            # same TOC into its chunk index: two processes, so the two parses overlap.
            mounting = asyncio.ensure_future(self._worker_mount(handle, record, toc))
            try:
                layer = await asyncio.shield(opening)
                opened = time.monotonic()
                # The prefetch starts with the fetcher's chunk index, not after the worker's
                # mount: the link is busy while the worker builds its inode table.  A mount
                # that fails after all cancels it (``_forget_mount``).
                plan = None if args.trace or not self.config.prefetch else await self._profile_plan(ref, layer,
                                                                                                    record)
                prefetch = self._start_background(layer.digest, plan, record)
                await mounting
                handle = self.supervisor.workers.get(record.worker_id, handle)  # _worker_mount may have moved it
            except BaseException:
                await self._undo_worker_mount(handle, record, mounting)
                raise
            record.state = "ready"
            took = time.monotonic() - started
            self.metrics.observe_ms(MOUNT, layer.digest, took)
            log.info("mounted layer %s of %s at %s (mount %s, worker %d) in %.3fs (layer open %.3fs)", layer.digest,
                     ref, mountpoint, record.mount_id, handle.worker_id, took, opened - started,
                     extra={"event": "mount", "mount_id": record.mount_id, "layer": layer.digest, "ref": str(ref),
                            "mountpoint": mountpoint, "worker": handle.worker_id, "seconds": round(took, 6)})
        except ApiError as exc:
            log.warning("mounting layer %s of %s at %s failed: %s", args.layer_digest, ref, mountpoint, exc,
                        extra={"event": "mount_failed", "layer": args.layer_digest, "ref": str(ref),
                               "mountpoint": mountpoint, "code": exc.code})
            raise
        finally:
            self._claimed.discard(mountpoint)
        wait = self.config.prefetch_wait if args.prefetch_wait is None else args.prefetch_wait
        if prefetch is not None and wait:
            try:
                await asyncio.wait_for(asyncio.shield(prefetch), self.config.prefetch_timeout)
            except (asyncio.TimeoutError, ApiError):
                pass  # the mount works without it; errors show in status
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this request is being cancelled, not (only) the prefetch
                # the prefetch was cancelled (its mount went away): the mount call itself succeeded
        return MountResult(record.mount_id, layer.meta.toc_digest, layer.meta.blob_size, handle.pid)

    def _start_background(self, digest: str, plan: ProfilePlan | None = None,
                          record: MountRecord | None = None) -> asyncio.Task[None] | None:
        """Start the layer's prefetch (and then background fetch) once; returns the prefetch task.

        ``plan``: a profile's members, fetched with the landmark prefetch; when that has already
        started for another mount, they get a prefetch of their own, which is returned."""
        layer = self.layers.get(digest)
        if layer is None:
            return None
        if plan is not None and digest in self._prefetch and self.config.prefetch:
            task = asyncio.create_task(self._run_prefetch(layer, plan, record, landmark=False))
            self._profile_tasks.add(task)
            task.add_done_callback(self._profile_tasks.discard)
            if digest not in self._tasks and self.config.background_fetch:
                self._tasks[digest] = asyncio.create_task(self._run_background(layer))
            return task
        if digest not in self._prefetch and self.config.prefetch:
            self._prefetch[digest] = asyncio.create_task(self._run_prefetch(layer, plan, record))
        if digest not in self._tasks and self.config.background_fetch:
            self._tasks[digest] = asyncio.create_task(self._run_background(layer))
        return self._prefetch.get(digest)

    async def _run_prefetch(self, layer: Layer, plan: ProfilePlan | None = None, record: MountRecord | None = None,
                            landmark: bool = True) -> None:
        end = layer.prefetch_end if landmark else None
        if not end and plan is None:
            layer.counters.prefetch_state = "none"
            return
        members: list[Member] = layer.members.before(end) if end else []
        profiled: list[Member] = []
        if plan is not None:
            # One fetch for both: the scheduler merges adjacent members and sends the rest as
            # one multi-range request; what the landmark region holds is not asked twice.
            profiled = await self.scheduler.in_store_thread(self.scheduler.missing, layer, plan.members)
            have = {m.blob_offset for m in members}
            members = members + [m for m in plan.members if m.blob_offset not in have]
        layer.counters.prefetch_state = "running"
        started, before = time.monotonic(), layer.counters.prefetch_bytes
        try:
            await self.scheduler.fetch(layer, members, "prefetch", max_range=None)
        except ApiError as exc:
            layer.counters.prefetch_state = "failed"
            layer.counters.last_error = f"prefetch: {exc.message}"
            log.warning("prefetch of layer %s failed: %s", layer.digest, exc.message,
                        extra={"event": "prefetch", "layer": layer.digest, "ok": False})
            return
        layer.counters.prefetch_state = "done"
        if record is not None and plan is not None:
            record.profile_bytes += sum(m.size for m in profiled)
        took, fetched = time.monotonic() - started, layer.counters.prefetch_bytes - before
        self.metrics.observe_ms(PREFETCH_DOWNLOAD, layer.digest, took)
        log.info("prefetch of layer %s done: %d bytes fetched in %.3fs", layer.digest, fetched, took,
                 extra={"event": "prefetch", "layer": layer.digest, "ok": True, "bytes": fetched,
                        "seconds": round(took, 6)})

    async def _run_background(self, layer: Layer) -> None:
        prefetch = self._prefetch.get(layer.digest)
        if prefetch is not None:
            await asyncio.gather(prefetch, return_exceptions=True)
        counters = layer.counters
        if layer.content_size > self.store.size_limit:
            # It could never be wholly cached: fetching it all would only push out chunks in use.
            counters.background_state = "skipped"
            log.info("layer %s: no background fetch, its %d bytes exceed cache_size (%d)", layer.digest,
                     layer.content_size, self.store.size_limit)
            return
        counters.background_state = "running"
        started, before = time.monotonic(), counters.background_bytes
        missing = await self.scheduler.in_store_thread(self.scheduler.missing, layer, layer.members)
        batch: list[Member] = []
        failed = 0
        for i, member in enumerate(missing):
            batch.append(member)
            size = batch[-1].blob_end - batch[0].blob_offset
            if size < self.config.background_batch_size and i + 1 < len(missing):
                continue
            if layer.digest not in self._promote_requested:
                await self._quiet_unless_promoted(layer.digest)
            asked, had = time.monotonic(), counters.background_bytes
            try:
                await self.scheduler.fetch(layer, batch, "background")
            except ApiError as exc:
                failed += 1
                counters.last_error = f"background: {exc.message}"
            else:
                if counters.background_bytes > had:  # not when other fetches had stored the batch meanwhile
                    self.metrics.observe_ms(BACKGROUND_FETCH_DOWNLOAD, layer.digest, time.monotonic() - asked)
            batch = []
        counters.background_state = "done" if not failed else "failed"
        took, fetched = time.monotonic() - started, counters.background_bytes - before
        self.metrics.observe_ms(BACKGROUND_FETCH_TOTAL, layer.digest, took)
        log.log(logging.INFO if not failed else logging.WARNING,
                "background fetch of layer %s %s: %d bytes fetched in %.3fs%s", layer.digest,
                "done" if not failed else "failed", fetched, took,
                f" ({failed} request(s) failed: {counters.last_error})" if failed else "",
                extra={"event": "background_fetch", "layer": layer.digest, "ok": not failed, "bytes": fetched,
                       "seconds": round(took, 6)})

    async def op_unmount(self, args: UnmountArgs) -> None:
        record = self._find(args.mountpoint)
        handle = self.supervisor.workers.get(record.worker_id)
        if handle is not None and handle.state == "ready":
            try:
                await handle.call("worker.unmount", {"mount_id": record.mount_id})
            except ApiError as exc:
                if exc.code != NOT_FOUND:
                    raise
        await asyncio.to_thread(_lazy_unmount, record.mountpoint)
        self._forget_mount(record)
        log.info("unmounted layer %s from %s (mount %s)", record.layer_digest, record.mountpoint, record.mount_id,
                 extra={"event": "unmount", "mount_id": record.mount_id, "layer": record.layer_digest,
                        "mountpoint": record.mountpoint})
        if handle is not None and handle.draining:
            await self._retire_idle_workers()

    async def op_trace(self, args: TraceArgs) -> TraceResult:
        """The files opened so far in a traced mount (``mount`` with ``trace``), from the tracing worker."""
        record = self._find(args.mountpoint)
        handle = self.supervisor.workers.get(record.worker_id)
        if handle is None or not handle.tracing:
            raise ApiError(INVALID_REQUEST, f"the mount at {record.mountpoint} is not traced "
                                            "(mount it with trace, and its tracing worker must still run)")
        result: TraceResult = await handle.call("worker.trace", {"mount_id": record.mount_id})  # type: ignore[assignment]
        return result

    def _find(self, mountpoint: str) -> MountRecord:
        mp = os.path.normpath(mountpoint)
        for record in self.mounts.values():
            if record.mountpoint == mp:
                return record
        raise ApiError(NOT_FOUND, f"nothing is mounted at {mp}")

    async def op_check(self, args: CheckArgs) -> CheckResult:
        record = self._find(args.mountpoint)
        served = False
        handle = self.supervisor.workers.get(record.worker_id)
        if record.state == "ready" and handle is not None and handle.state == "ready" and handle.alive():
            try:
                st: WorkerStatusResult = await handle.call("worker.status", timeout=5.0)  # type: ignore[assignment]
                served = any(m.mount_id == record.mount_id for m in st.mounts)
            except ApiError:
                served = False
        reachable, error = True, record.error
        try:
            await asyncio.wait_for(self.registry.ping(Reference.parse(record.ref), self.config.check_interval), 10.0)
        except (RegistryError, asyncio.TimeoutError, OSError) as exc:
            reachable = False
            error = error or f"registry: {exc or type(exc).__name__}"
        cached = False
        layer = await self.layers.load(record.layer_digest)
        if not reachable and layer is not None:
            cached = not await self.scheduler.in_store_thread(self.scheduler.missing, layer, layer.members)
        state = record.state if served or record.state != "ready" else "broken"
        return CheckResult(served=served, registry_reachable=reachable, state=state, error=error, cached=cached)

    async def _worker_statuses(self, timeout: float = 5.0) -> dict[int, WorkerStatusResult]:
        """``worker.status`` of each ready worker that answers within ``timeout``, by worker id."""
        out: dict[int, WorkerStatusResult] = {}

        async def one(handle: WorkerHandle) -> None:
            try:
                out[handle.worker_id] = await handle.call("worker.status", timeout=timeout)  # type: ignore[assignment]
            except ApiError:
                return

        await asyncio.gather(*(one(h) for h in self.supervisor.workers.values() if h.state == "ready"))
        return out

    async def _worker_mounts(self, statuses: dict[int, WorkerStatusResult] | None = None) -> dict[str, WorkerMountStatus]:
        statuses = await self._worker_statuses() if statuses is None else statuses
        return {m.mount_id: m for st in statuses.values() for m in st.mounts}

    def _layer_stats(self, layer: Layer | None) -> LayerStats:
        if layer is None:
            return LayerStats()
        _, cached = self.store.layer_usage(layer.digest)
        return layer.counters.stats(layer.meta.blob_size, cached)

    async def _scrape(self) -> bytes:
        """The ``/metrics`` body (lazyd.metrics), written in a thread: with many layers it is tens of
        thousands of lines (300 ms for 100 layers), too long to hold the event loop."""
        snapshot = await self._metrics_snapshot()
        return await asyncio.to_thread(render, self.metrics.copy(), snapshot)

    async def _metrics_snapshot(self) -> Snapshot:
        """What a scrape reports besides ``self.metrics``: the workers' read counters (each worker
        asked with a ``METRICS_WORKER_TIMEOUT``), the chunk store's usage and the mounts' layers."""
        statuses: dict[int, WorkerStatusResult] = {}
        workers: dict[str, int] = {}
        unanswered = 0
        if hasattr(self, "supervisor"):  # not while the daemon is starting
            statuses = await self._worker_statuses(METRICS_WORKER_TIMEOUT)
            for h in self.supervisor.workers.values():
                state = "draining" if h.draining and h.state == "ready" else h.state
                workers[state] = workers.get(state, 0) + 1
                unanswered += h.state == "ready" and h.worker_id not in statuses
        per_layer: dict[str, WorkerCounts] = {}
        for st in statuses.values():
            for w in st.mounts:
                c = per_layer.setdefault(w.layer_digest, WorkerCounts())
                c.reads += w.reads
                c.bytes_read += w.bytes_read
                c.cache_hits += w.cache_hits
                c.cache_misses += w.cache_misses
                c.read_errors += w.fetch_errors
        gauges, states = [], {}
        for record in sorted(self.mounts.values(), key=lambda r: r.mountpoint):
            states[record.state] = states.get(record.state, 0) + 1
            layer = await self.layers.load(record.layer_digest)
            if layer is not None:
                c = layer.counters
                gauges.append(MountGauge(layer.digest, record.mountpoint, c.fetched_bytes, c.prefetch_bytes,
                                         layer.meta.blob_size))
        store = await self.scheduler.in_store_thread(self.store.stats)
        rs = self.registry.stats
        return Snapshot(mounts=gauges, mount_states=states, worker_layers=per_layer, workers=workers,
                        workers_unanswered=unanswered, cache_bytes=store.size, cache_limit=store.limit,
                        cache_chunks=store.count, cache_evictions=self.store.evictions,
                        registry_requests=rs.requests, registry_bytes=rs.bytes_received,
                        registry_in_flight=rs.in_flight, verify_errors=self.scheduler.verify_errors)

    async def _mount_infos(self, statuses: dict[int, WorkerStatusResult] | None = None) -> list[MountInfo]:
        live = await self._worker_mounts(statuses)
        infos = []
        for record in sorted(self.mounts.values(), key=lambda r: r.mountpoint):
            handle = self.supervisor.workers.get(record.worker_id)
            w = live.get(record.mount_id)
            layer = await self.layers.load(record.layer_digest)
            error = record.error or (w.last_error if w else None) or (layer.counters.last_error if layer else None)
            infos.append(MountInfo(
                mount_id=record.mount_id, ref=record.ref, layer_digest=record.layer_digest,
                toc_digest=record.toc_digest, mountpoint=record.mountpoint, state=record.state,
                worker_id=record.worker_id, worker_pid=handle.pid if handle else 0,
                layer=await self.scheduler.in_store_thread(self._layer_stats, layer),
                reads=w.reads if w else 0, bytes_read=w.bytes_read if w else 0,
                cache_hits=w.cache_hits if w else 0, cache_misses=w.cache_misses if w else 0,
                fetch_errors=w.fetch_errors if w else 0, error=error,
                profile=record.profile, profile_source=record.profile_source,
                profile_files=record.profile_files, profile_bytes=record.profile_bytes,
                layer_state=self._layer_state(record.layer_digest, layer)))
        return infos

    async def op_mounts(self, _args: Empty) -> MountsResult:
        return MountsResult(await self._mount_infos())

    async def op_status(self, _args: Empty) -> StatusResult:
        statuses = await self._worker_statuses()
        mounts = await self._mount_infos(statuses)
        workers = []
        for h in sorted(self.supervisor.workers.values(), key=lambda h: h.worker_id):
            ws = statuses.get(h.worker_id)
            state = ("tracing" if h.tracing else "draining") if h.draining and h.state == "ready" else h.state
            workers.append(WorkerInfo(worker_id=h.worker_id, pid=h.pid, state=state,
                                      mounts=sum(1 for m in self.mounts.values() if m.worker_id == h.worker_id),
                                      restarts=h.restarts, llfuse_version=ws.llfuse_version if ws else None,
                                      no_open=ws.no_open if ws else None,
                                      fuse_binding=ws.fuse_binding if ws else None,
                                      xattrs=ws.xattrs if ws else None))
        builds = sorted({w.llfuse_version or "unknown" for w in workers if w.llfuse_version is not None})
        layers = self.layers.all()
        rs = self.registry.stats
        totals = Totals(
            registry_requests=rs.requests, registry_bytes=rs.bytes_received, in_flight=rs.in_flight,
            fetched_bytes=sum(layer.counters.fetched_bytes for layer in layers),
            demand_bytes=sum(layer.counters.demand_bytes for layer in layers),
            prefetch_bytes=sum(layer.counters.prefetch_bytes for layer in layers),
            background_bytes=sum(layer.counters.background_bytes for layer in layers),
            fetch_requests=self.scheduler.fetch_requests, verify_errors=self.scheduler.verify_errors,
            fallbacks=self.fallback_count)
        return StatusResult(pid=os.getpid(), version=VERSION, root=str(self.root), socket=self.config.socket,
                            started_at=self.started_at, mounts=mounts, workers=workers,
                            cache=await self._cache_stats(), totals=totals, fallbacks=list(self.fallbacks),
                            llfuse_version=", ".join(builds) or None,
                            local_layers=[s for d, s in self._layer_states.items()
                                          if not any(m.layer_digest == d for m in self.mounts.values())])

    async def _cache_stats(self, evicted: int | None = None) -> CacheStats:
        s = await asyncio.to_thread(self.store.stats)
        return CacheStats(size=s.size, limit=s.limit, count=s.count, directory=s.directory, evicted=evicted)

    async def op_cache(self, args: CacheArgs) -> CacheStats:
        if args.action == "stats":
            return await self._cache_stats()
        if args.layer_digest is not None and args.layer_digest not in {m.layer_digest for m in self.mounts.values()}:
            evicted = await asyncio.to_thread(self.store.evict, args.layer_digest)
        elif args.layer_digest is None and not self.mounts:
            evicted = await asyncio.to_thread(self.store.evict, None)
        else:
            raise ApiError(INVALID_REQUEST, "cannot evict chunks of a mounted layer; unmount it first")
        log.info("cache: evicted %d chunk(s) of %s on request", evicted, args.layer_digest or "every layer",
                 extra={"event": "eviction", "chunks": evicted, "layer": args.layer_digest, "requested": True})
        return await self._cache_stats(evicted)

    async def op_fallback(self, args: FallbackArgs) -> None:
        self.fallback_count += 1
        self.fallbacks.append(FallbackInfo(args.ref, args.layer_digest, args.reason, time.time()))
        del self.fallbacks[:-MAX_FALLBACKS_SHOWN]
        self.metrics.fallback(args.reason)
        log.info("fallback for layer %s of %s: %s", args.layer_digest, args.ref, args.reason,
                 extra={"event": "fallback", "layer": args.layer_digest, "ref": args.ref, "reason": args.reason})

    async def op_resolve(self, args: ResolveArgs) -> ResolveResult:
        self.scheduler.note_activity()  # a pull is starting: hold background fetch back
        ref = _parse_ref(args.ref)
        try:
            image = await asyncio.wait_for(self.registry.resolve(ref), self.config.mount_timeout)
        except asyncio.TimeoutError:
            log.warning("resolving %s took longer than %ss", ref, self.config.mount_timeout,
                        extra={"event": "registry_error", "ref": str(ref), "code": "timeout"})
            raise ApiError("timeout", f"resolving {ref} took longer than {self.config.mount_timeout}s") from None
        except RegistryError as exc:
            error = registry_error(exc)
            log.warning("resolving %s failed: %s", ref, error.message,
                        extra={"event": "registry_error", "ref": str(ref), "code": error.code})
            raise error from None
        self.layers.remember(image)
        self.profile_finder.warm(image)
        return ResolveResult(ref=str(image.ref), manifest_digest=image.manifest_digest,
                             manifest_media_type=image.manifest_media_type, manifest=image.manifest_bytes,
                             config=image.config_bytes, index_digest=image.index_digest,
                             index_media_type=image.index_media_type, index=image.index_bytes)

    async def _pull_service(self) -> Any:
        if self._pulls is None:
            if self._pull_imports is not None:
                await asyncio.gather(self._pull_imports, return_exceptions=True)
            from lazyd.containerd.service import PullService

            def manifest_in(ref: Reference, layers: Any) -> None:
                self.layers.warm(ref, layers, self.config.mount_timeout)

            def remember(image: Any) -> None:
                self.layers.remember(image)
                self.profile_finder.warm(image)  # the registry lookup overlaps the pull, not the mounts

            self._pulls = PullService(self.registry, self.config.registry, remember,
                                      self._last_fallback_reason, manifest_in)
        return self._pulls

    def _last_fallback_reason(self, layer_digest: str) -> str | None:
        found = [f for f in self.fallbacks if f.layer_digest == layer_digest]
        return max(found, key=lambda f: f.time).reason if found else None

    async def op_pull(self, args: PullArgs) -> PullResult:
        self.scheduler.note_activity()  # a pull is starting: hold background fetch back
        service = await self._pull_service()
        result: PullResult = await service.pull(args)
        return result

    async def op_pull_progress(self, args: PullProgressArgs) -> PullProgressResult:
        service = await self._pull_service()
        result: PullProgressResult = service.progress(args)
        return result

    # -- promotion (the snapshotter promotes; lazyd fetches and reports) -----------------

    def _layer_state(self, digest: str, layer: Layer | None) -> str:
        """A mounted layer's state for ``status``: promoting/local (reported), fetching or lazy."""
        reported = self._layer_states.get(digest)
        if reported is not None:
            return reported.state
        if layer is not None and "running" in (layer.counters.prefetch_state, layer.counters.background_state):
            return "fetching"
        return "lazy"

    async def _quiet_unless_promoted(self, digest: str) -> None:
        """Background fetch's wait for a quiet spell, cut short when ``promote`` asks for the layer."""
        while digest not in self._promote_requested:
            quiet = asyncio.ensure_future(self.scheduler.wait_quiet(self.config.background_delay))
            woken = asyncio.ensure_future(self._promote_wakeup.wait())
            try:
                done, _ = await asyncio.wait({quiet, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                quiet.cancel()
                woken.cancel()
            if quiet in done:
                return

    async def _layer_complete(self, digest: str) -> bool:
        """Every chunk of the layer is in the store (verified); checked once the background
        fetch is done, and again only when the layer's fetched bytes changed."""
        layer = await self.layers.load(digest)
        if layer is None or layer.counters.background_state != "done":
            return False
        fetched = layer.counters.fetched_bytes
        known = self._complete.get(digest)
        if known is not None and known[0] == fetched:
            return known[1]
        missing = await self.scheduler.in_store_thread(self.scheduler.missing, layer, layer.members)
        self._complete[digest] = (fetched, not missing)
        while len(self._complete) > MAX_LAYER_REPORTS:
            del self._complete[next(iter(self._complete))]
        return not missing

    async def op_layer_state(self, args: LayerStateArgs) -> LayerStateResult:
        """The snapshotter's report; answers for each ``lazy`` layer whether it may be promoted."""
        self._promote_mode = args.mode
        out = []
        for report in args.layers:
            digest = report.layer_digest
            if report.state == "lazy":
                self._layer_states.pop(digest, None)
                complete = args.mode != "off" and await self._layer_complete(digest)
                out.append(LayerPromotion(digest, complete, digest in self._promote_requested))
                continue
            if report.state == "local":
                self._promote_requested.pop(digest, None)
                self._complete.pop(digest, None)
            self._layer_states.pop(digest, None)  # re-insert: the dict stays oldest-report first
            self._layer_states[digest] = LayerStateInfo(digest, report.state, report.disk_bytes, time.time())
        while len(self._layer_states) > MAX_LAYER_REPORTS:
            del self._layer_states[next(iter(self._layer_states))]
        return LayerStateResult(out)

    async def op_promote(self, args: PromoteArgs) -> PromoteResult:
        """Mark the layers of ``ref`` (or one layer) for promotion and fetch what they miss now."""
        if self._promote_mode is None:
            raise ApiError(UNAVAILABLE, "no snapshotter has reported its promote setting to this lazyd yet "
                                        "(is 'lazyd snapshotter' running with this lazyd socket?)")
        if self._promote_mode == "off":
            raise ApiError(INVALID_REQUEST, "promotion is off: the snapshotter runs with [snapshotter] "
                                            "promote = \"off\" (set \"manual\" or \"after_fetch\")")
        if args.ref is not None:
            ref = _parse_ref(args.ref)
            digests = list(dict.fromkeys(m.layer_digest for m in self.mounts.values() if _same_image(ref, m.ref)))
            what = f"image {ref}"
        else:
            digests = [args.layer_digest] if args.layer_digest else []
            what = f"layer {args.layer_digest}"
        local = [d for d in digests if (s := self._layer_states.get(d)) is not None and s.state == "local"]
        mounted = {m.layer_digest for m in self.mounts.values()}
        wanted = [d for d in digests if d not in local and d in mounted]
        if not wanted and not local:
            raise ApiError(NOT_FOUND, f"no layer of {what} is mounted by lazyd")
        for digest in wanted:
            self._promote_requested[digest] = time.time()
            while len(self._promote_requested) > MAX_LAYER_REPORTS:
                del self._promote_requested[next(iter(self._promote_requested))]
            task = self._tasks.get(digest)
            if task is None or task.done():
                layer = self.layers.get(digest)
                if layer is not None:
                    self._tasks[digest] = asyncio.create_task(self._run_background(layer))
        self._promote_wakeup.set()
        self._promote_wakeup = asyncio.Event()
        log.info("promotion of %s requested: %d layer(s) to fetch and promote, %d already local", what,
                 len(wanted), len(local), extra={"event": "promote", "layers": wanted, "local": local})
        return PromoteResult(layers=wanted, local=local, mode=self._promote_mode)

    # -- prefetch profiles (docs/profiles.md) -------------------------------------------

    async def _profile_plan(self, ref: Reference, layer: Layer, record: MountRecord) -> ProfilePlan | None:
        """The members a prefetch profile asks of ``layer`` (None: no profile, or none applies);
        notes the profile on ``record``.  Never fails the mount: problems are logged."""
        try:
            use: ProfileUse | None = await self.profile_finder.find(ref, layer)
            if use is None:
                return None
            plan = await asyncio.to_thread(profile_plan, layer, use.paths) if use.paths else None
        except Exception as exc:  # noqa: BLE001 -- a profile must never break a mount
            log.warning("prefetch profile for layer %s of %s not used: %s", layer.digest, ref, exc)
            return None
        record.profile, record.profile_source = use.manifest_digest, use.source
        record.profile_files = plan.files if plan else 0
        self._save_mount(record)
        log.info("layer %s (index %d of %s): %s profile, %d file(s) in %d member(s), %d bytes (%d of them gap "
                 "fill)%s%s", layer.digest, use.layer_index, use.manifest_digest, use.source,
                 plan.files if plan else 0, len(plan.members) if plan else 0, plan.size if plan else 0,
                 plan.gap_bytes if plan else 0,
                 f"; {plan.skipped} path(s) not regular files of the layer" if plan and plan.skipped else "",
                 f"; {use.foreign} record(s) for other manifests skipped" if use.foreign else "",
                 extra={"event": "profile", "layer": layer.digest, "manifest": use.manifest_digest,
                        "source": use.source, "files": plan.files if plan else 0,
                        "bytes": plan.size if plan else 0, "foreign": use.foreign})
        return plan if plan and plan.members else None

    def _profile_summary(self, digest: str, data: bytes, records: list[Any]) -> ProfileSummary:
        layers = {r.layer_index for r in records if r.manifest_digest in (None, digest)}
        return ProfileSummary(digest, len(data), len(records), len(layers), time.time())

    async def op_profile_put(self, args: ProfilePutArgs) -> ProfileSummary:
        try:
            records = await asyncio.to_thread(self.profiles.put, args.manifest_digest, args.records)
        except ProfileStoreError as exc:
            raise ApiError(INVALID_REQUEST, str(exc)) from None
        self.profile_finder.forget(args.manifest_digest)
        log.info("stored profile for %s (%d records)", args.manifest_digest, len(records),
                 extra={"event": "profile_put", "manifest": args.manifest_digest})
        return self._profile_summary(args.manifest_digest, args.records, records)

    async def op_profile_get(self, args: ProfileDigestArgs) -> ProfileData:
        try:
            data = await asyncio.to_thread(self.profiles.get, args.manifest_digest)
        except ProfileStoreError as exc:
            raise ApiError(INVALID_REQUEST, str(exc)) from None
        if data is None:
            raise ApiError(NOT_FOUND, f"no profile for {args.manifest_digest} in {self.profiles.directory}")
        return ProfileData(args.manifest_digest, data)

    async def op_profile_list(self, _args: Empty) -> ProfileListResult:
        infos = await asyncio.to_thread(self.profiles.summaries)
        return ProfileListResult([ProfileSummary(i.manifest_digest, i.size, i.records, i.layers, i.mtime)
                                  for i in infos])

    async def op_profile_delete(self, args: ProfileDigestArgs) -> None:
        try:
            found = await asyncio.to_thread(self.profiles.delete, args.manifest_digest)
        except ProfileStoreError as exc:
            raise ApiError(INVALID_REQUEST, str(exc)) from None
        self.profile_finder.forget(args.manifest_digest)
        if not found:
            raise ApiError(NOT_FOUND, f"no profile for {args.manifest_digest} in {self.profiles.directory}")

    async def op_shutdown(self, _args: Empty) -> None:
        self._clean = True
        asyncio.get_running_loop().call_later(0.05, self._stop.set)


def _same_image(ref: Reference, mounted: str) -> bool:
    """Whether a mount's ref (``name:tag@digest`` as pulled) is the image ``ref`` names (by tag,
    digest or both)."""
    try:
        other = Reference.parse(mounted)
    except (InvalidReferenceError, ValueError):
        return False
    if (ref.registry, ref.repository) != (other.registry, other.repository):
        return False
    if ref.digest is not None and ref.digest != other.digest:
        return False
    return ref.tag is None or ref.tag == other.tag or (ref.digest is not None and other.tag is None)


def _lazy_unmount(mountpoint: str) -> None:
    """Detach whatever is still mounted at ``mountpoint`` (a dead bind after a worker died)."""
    try:
        mounttable.unmount_all_at(mountpoint)
    except mounttable.MountError as exc:
        log.warning("could not detach %s: %s", mountpoint, exc)
