"""The FUSE worker process (``python3 -m lazyd.fuse.worker``).

One FUSE mount at ``<state-dir>/fuse`` with a directory per layer, each exposed
at its requested mountpoint with a read-only bind mount; a control socket
(``worker.mount/unmount/status/shutdown``); ``worker.json`` once ready; and a
reconnecting connection to the fetcher for chunk misses.  See docs/design.md.

``--fuse-backend`` picks the binding: ``llfuse`` (libfuse 2, ``lazyd.fuse.fs``) or ``pyfuse3``
(libfuse 3 with READDIRPLUS and push, ``lazyd.fuse.fs3``).

With ``--trace`` it is the tracing worker: every open reaches it (no "no_open"), and it
records the first open of each file per mount (``worker.trace``; docs/optimize.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llfuse

from lazyd.api import messages, wire
from lazyd.api.messages import ApiError
from lazyd.atomicfile import atomic_write
from lazyd.config import FUSE_BACKENDS
from lazyd.cache.store import ChunkStore
from lazyd.estargz import TOC, EStargzError
from lazyd import logsetup
from lazyd import mounttable as mounts
from lazyd import unixsocket
from lazyd.fuse.fetchconn import FetcherConnection
from lazyd.fuse.fs import LayerFS, LazyFS, Layer, XattrsOff, trace_paths
from lazyd.estargz.inodes import InodeTable, InodeTableError
from lazyd.fuse.reader import ChunkReader

log = logging.getLogger("lazyd.fuse.worker")

FUSE_OPTIONS = {"fsname=lazyd", "subtype=lazyd", "ro", "default_permissions"}
FUSE_THREADS = 4
_XATTRS: dict[str, bool | None] = {"on": True, "auto": None, "off": False}


@dataclass
class WorkerOptions:
    worker_id: int
    state_dir: Path
    fetcher_socket: str
    cache_dir: Path
    cache_size: int
    fetch_timeout: float
    log_level: str = "info"
    fuse_threads: int = FUSE_THREADS
    log_format: str = "text"
    trace: bool = False
    fuse_backend: str = "pyfuse3"
    xattrs: str = "on"  # on, auto or off (LayerFS.xattrs)

    @property
    def fuse_root(self) -> Path:
        return self.state_dir / "fuse"

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def info_file(self) -> Path:
        return self.state_dir / "worker.json"


@dataclass
class MountRecord:
    """A served mount: the layer directory and where it is bound."""

    layer: Layer
    mountpoint: str
    toc_digest: str
    blob_size: int


class Worker:
    """State and control operations of one worker process."""

    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        self.store = ChunkStore(opts.cache_dir, opts.cache_size)
        self.fetcher = FetcherConnection(opts.fetcher_socket, opts.fetch_timeout)
        self.reader = ChunkReader(self.store, self.fetcher, unlocked=lambda: self.fs.unlocked())
        self.fs: LayerFS
        if opts.fuse_backend == "pyfuse3":
            from lazyd.fuse.fs3 import LazyFS3  # imports trio and pyfuse3: only where they are used
            self.fs = LazyFS3(self.reader, trace=opts.trace, xattrs=_XATTRS[opts.xattrs])
        else:
            self.fs = LazyFS(self.reader, trace=opts.trace, xattrs=_XATTRS[opts.xattrs])
        self.mounts: dict[str, MountRecord] = {}
        self._ops_lock = threading.Lock()
        self._server: _ControlServer | None = None
        self.stopping = threading.Event()
        self.shutdown_requested = threading.Event()
        self.shutdown_replied = threading.Event()

    # -- lifecycle ---------------------------------------------------------

    def _check_predecessor(self) -> None:
        try:
            info = json.loads(self.opts.info_file.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if pid == os.getpid():
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"lazyd.fuse.worker" in cmdline:
            raise SystemExit(f"worker pid {pid} is still running for {self.opts.state_dir}")

    def run(self) -> int:
        opts = self.opts
        opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._check_predecessor()
        opts.info_file.unlink(missing_ok=True)
        root = str(opts.fuse_root)
        if mounts.is_mounted(root) or mounts.is_dead(root):
            log.warning("lazily unmounting a stale mount at %s", root)
            mounts.unmount_all_at(root)
        opts.fuse_root.mkdir(exist_ok=True, mode=0o755)
        self.fetcher.start()
        self.fs.mount(root, FUSE_OPTIONS)
        try:
            self._server = _ControlServer(str(opts.control_socket), self)
            threading.Thread(target=self._server.serve_forever, name="control", daemon=True).start()
            self._write_info()
            log.info("worker %d serving %s (pid %d, %s)", opts.worker_id, root, os.getpid(), self.fs.binding)
            try:
                stop = self.fs.serve(opts.fuse_threads)
            except BaseException:
                log.exception("FUSE main loop failed")
                raise
            log.info("FUSE main loop ended (%s)", f"signal {stop}" if stop else "unmounted")
        finally:
            self.stopping.set()
            # Close the FUSE session first: with no server left, requests to the binds
            # fail with ENOTCONN instead of hanging while they are unmounted.
            self.fs.close()
            self._unbind_all()
            if self.shutdown_requested.is_set():
                self.shutdown_replied.wait(5)
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
            opts.control_socket.unlink(missing_ok=True)
            opts.info_file.unlink(missing_ok=True)
            self.reader.close()
            self.fetcher.close()
            self.store.close()
        return 0

    def _write_info(self) -> None:
        info = {
            "pid": os.getpid(),
            "worker_id": self.opts.worker_id,
            "control_socket": str(self.opts.control_socket),
            "fuse_root": str(self.opts.fuse_root),
            "started_at": time.time(),
        }
        tmp = self.opts.info_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.opts.info_file)

    def _unbind_all(self) -> None:
        with self._ops_lock:
            for record in list(self.mounts.values()):
                try:
                    mounts.unmount_all_at(record.mountpoint)
                except mounts.MountError as exc:
                    log.error("unmounting %s: %s", record.mountpoint, exc)
            self.mounts.clear()

    # -- control operations ------------------------------------------------

    def handle(self, op: str, args: Any) -> dict[str, Any]:
        """Run one control op; raises ``ApiError`` with the protocol error code."""
        spec = messages.WORKER_OPS.get(op)
        if spec is None:
            raise ApiError(messages.UNKNOWN_OP, f"unknown worker operation {op!r}")
        parsed = spec[0].from_args(args)
        if op == "worker.status":
            return self.status().to_dict()
        if self.stopping.is_set():
            raise ApiError(messages.UNAVAILABLE, "the worker is shutting down")
        if isinstance(parsed, messages.WorkerMountArgs):
            return self.mount(parsed).to_dict()
        if isinstance(parsed, messages.WorkerUnmountArgs):
            self.unmount(parsed.mount_id)
            return {}
        if isinstance(parsed, messages.WorkerTraceArgs):
            return self.trace(parsed.mount_id).to_dict()
        self.shutdown()
        return {}

    def mount(self, args: messages.WorkerMountArgs) -> messages.WorkerMountResult:
        mount_id = args.mount_id
        if mount_id in (".", ".."):
            raise ApiError(messages.INVALID_REQUEST, f"worker.mount: mount_id {mount_id!r} is not a plain name")
        # Resolve symlinks in the parent only: the mountpoint itself may be a dead mount.
        normalized = os.path.normpath(args.mountpoint)
        mountpoint = os.path.join(os.path.realpath(os.path.dirname(normalized)), os.path.basename(normalized))
        table = self._inode_table(args)  # outside the lock: status and other mounts need not wait for a parse
        with self._ops_lock:
            if mount_id in self.mounts:
                raise ApiError(messages.ALREADY_EXISTS, f"mount id {mount_id!r} is already mounted")
            if any(r.mountpoint == mountpoint for r in self.mounts.values()):
                raise ApiError(messages.ALREADY_EXISTS, f"{mountpoint} is already served by this worker")
            if mounts.is_dead(mountpoint):
                log.warning("lazily unmounting a dead mount at %s", mountpoint)
                mounts.unmount_all_at(mountpoint)
            elif mounts.is_mounted(mountpoint):
                raise ApiError(messages.ALREADY_EXISTS, f"something is already mounted at {mountpoint}")
            try:
                os.makedirs(mountpoint, exist_ok=True)
            except OSError as exc:
                raise ApiError(messages.INVALID_REQUEST, f"cannot create mountpoint {mountpoint}: {exc}") from exc
            with self.fs.lock:
                try:
                    layer = self.fs.add_layer(mount_id, args.layer_digest, table)
                except XattrsOff as exc:
                    raise ApiError(messages.FAILED_PRECONDITION, f"worker {self.opts.worker_id}: {exc}") from None
            fuse_path = str(self.opts.fuse_root / mount_id)
            try:
                mounts.bind_readonly(fuse_path, mountpoint)
            except mounts.MountError as exc:
                with self.fs.lock:
                    self.fs.remove_layer(mount_id)
                raise ApiError(messages.INTERNAL, str(exc)) from exc
            self.mounts[mount_id] = MountRecord(layer, mountpoint, args.toc_digest, args.blob_size)
            log.info("mounted %s (%s, %d inodes) at %s", mount_id, args.layer_digest, len(table), mountpoint)
            return messages.WorkerMountResult(fuse_path=fuse_path)

    def _inode_table(self, args: messages.WorkerMountArgs) -> InodeTable:
        """The layer's inode table: the dump at ``inodes_path`` when it is sound, else built from
        the TOC (the first mount of a layer) and dumped there for the next mount."""
        saved = Path(args.inodes_path) if args.inodes_path is not None else None
        if saved is not None:
            try:
                return InodeTable.loads(saved.read_bytes(), args.toc_digest)
            except FileNotFoundError:
                pass  # not built yet
            except (OSError, InodeTableError) as exc:
                log.warning("inode table %s unusable (%s); building it from the TOC", saved, exc)
        try:
            data = Path(args.toc_path).read_bytes()
        except OSError as exc:
            raise ApiError(messages.INVALID_REQUEST, f"worker.mount: cannot read toc_path: {exc}") from exc
        try:
            table = InodeTable.from_toc(TOC.parse(data, expected_digest=args.toc_digest))
        except (EStargzError, InodeTableError) as exc:
            raise ApiError(messages.INVALID_REQUEST, f"worker.mount: TOC of {args.layer_digest}: {exc}") from exc
        if saved is not None:
            try:  # a derived cache (checked when loaded): no fsync
                atomic_write(saved, table.dumps(args.toc_digest), sync=False)
            except OSError as exc:
                log.warning("cannot save the inode table of %s at %s: %s", args.layer_digest, saved, exc)
        return table

    def unmount(self, mount_id: str) -> None:
        with self._ops_lock:
            record = self.mounts.get(mount_id)
            if record is None:
                raise ApiError(messages.NOT_FOUND, f"mount id {mount_id!r} is not mounted by this worker")
            try:
                mounts.unmount_all_at(record.mountpoint)
            except mounts.MountError as exc:
                raise ApiError(messages.INTERNAL, str(exc)) from exc
            del self.mounts[mount_id]
            with self.fs.lock:
                self.fs.remove_layer(mount_id)
            log.info("unmounted %s from %s", mount_id, record.mountpoint)

    def trace(self, mount_id: str) -> messages.TraceResult:
        """The files opened so far in ``mount_id`` (first opens, in order)."""
        with self._ops_lock:
            record = self.mounts.get(mount_id)
            if record is None:
                raise ApiError(messages.NOT_FOUND, f"mount id {mount_id!r} is not mounted by this worker")
        trace = record.layer.trace
        if trace is None:
            raise ApiError(messages.INVALID_REQUEST, f"worker {self.opts.worker_id} does not trace (no --trace)")
        with self.fs.lock:
            order, seqs, truncated = trace.snapshot()
        paths, seqs, truncated = trace_paths(record.layer.table, order, seqs, truncated)
        return messages.TraceResult(paths=paths, truncated=truncated, seqs=seqs)

    def status(self) -> messages.WorkerStatusResult:
        with self._ops_lock:
            records = list(self.mounts.values())
        out = []
        for r in records:
            c = r.layer.counters
            out.append(messages.WorkerMountStatus(
                mount_id=r.layer.mount_id, mountpoint=r.mountpoint, layer_digest=r.layer.layer_digest,
                toc_digest=r.toc_digest, blob_size=r.blob_size, reads=c.reads, bytes_read=c.bytes_read,
                cache_hits=c.cache_hits, cache_misses=c.cache_misses, fetch_errors=c.fetch_errors,
                last_error=c.last_error, opens=c.opens,
                pushed_files=c.pushed_files, pushed_bytes=c.pushed_bytes))
        return messages.WorkerStatusResult(pid=os.getpid(), worker_id=self.opts.worker_id,
                                           fuse_root=str(self.opts.fuse_root),
                                           fetcher_connected=self.fetcher.connected, mounts=out,
                                           no_open=self.fs.no_open, llfuse_version=llfuse.__version__,
                                           tracing=self.fs.trace, fuse_binding=self.fs.binding,
                                           xattrs=self.fs.xattrs is not False)

    def shutdown(self) -> None:
        """Unmount every bind and the FUSE mount; the main loop then ends and the process exits."""
        self.shutdown_requested.set()
        self.stopping.set()
        self._unbind_all()
        try:
            mounts.unmount_all_at(str(self.opts.fuse_root), lazy=False)
        except mounts.MountError:
            mounts.unmount_all_at(str(self.opts.fuse_root), lazy=True)


class _Handler(socketserver.BaseRequestHandler):
    server: "_ControlServer"

    def handle(self) -> None:
        sock: socket.socket = self.request
        worker = self.server.worker
        while True:
            try:
                request = wire.recv_frame(sock, wire.REQUESTS)
            except (EOFError, OSError):
                return
            except wire.ProtocolError as exc:
                self._send(wire.error_reply(None, "invalid_request", str(exc)))
                return
            request_id = request.get("id")
            op, args = request.get("op"), request.get("args", {})
            if not isinstance(request_id, int) or not isinstance(op, str) or not isinstance(args, dict):
                self._send(wire.error_reply(request_id if isinstance(request_id, int) else None, "invalid_request",
                                            "a request is a map {id: int, op: str, args: map}"))
                continue
            try:
                reply = wire.ok_reply(request_id, worker.handle(op, args))
            except ApiError as exc:
                reply = wire.error_reply(request_id, exc.code, exc.message)
            except Exception as exc:  # noqa: BLE001 - reported to the caller, never a dropped connection
                log.exception("%s failed", op)
                reply = wire.error_reply(request_id, "internal", f"{op}: {exc}")
            self._send(reply)
            if op == "worker.shutdown":
                worker.shutdown_replied.set()

    def _send(self, reply: dict[str, Any]) -> None:
        try:
            wire.send_frame(self.request, reply)
        except OSError:
            pass


class _ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, worker: Worker) -> None:
        """Listen on ``path`` with mode 0600 (only the daemon, root, talks to a worker), whatever the umask.

        The socket is bound, chmod-ed and made to listen in a private 0700 directory, then renamed
        to ``path`` (lazyd.unixsocket), so it is never reachable with a wider mode.
        """
        self.worker = worker
        super().__init__(path, _Handler, bind_and_activate=False)
        try:
            unixsocket.publish(Path(path), None, bind=self.socket.bind, listen=self.server_activate)
        except BaseException:
            self.server_close()
            raise
        self.server_address = path


def parse_args(argv: list[str] | None = None) -> WorkerOptions:
    p = argparse.ArgumentParser(prog="python3 -m lazyd.fuse.worker", description=__doc__.splitlines()[0])
    p.add_argument("--worker-id", type=int, required=True)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--fetcher-socket", required=True)
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--cache-size", type=int, required=True)
    p.add_argument("--fetch-timeout", type=float, required=True)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=logsetup.LOG_FORMATS)
    p.add_argument("--fuse-threads", type=int, default=FUSE_THREADS,
                   help="llfuse request threads (>= 2 so cached reads go on while one waits for the fetcher)")
    p.add_argument("--fuse-backend", default="pyfuse3", choices=FUSE_BACKENDS,
                   help="llfuse (libfuse 2) or pyfuse3 (libfuse 3: READDIRPLUS, page-cache push)")
    p.add_argument("--xattrs", default="on", choices=sorted(_XATTRS),
                   help="on: serve extended attributes; off: answer the kernel's first GETXATTR with ENOSYS, so "
                        "it sends none after (overlayfs asks for two or three a file), and refuse layers that have "
                        "extended attributes; auto: off at the first GETXATTR if no mounted layer has any, else on")
    p.add_argument("--trace", action="store_true",
                   help="tracing worker: see every open and record the first open of each file per mount")
    a = p.parse_args(argv)
    if a.fuse_threads < 1:
        p.error("--fuse-threads must be at least 1")
    return WorkerOptions(a.worker_id, a.state_dir.resolve(), a.fetcher_socket, a.cache_dir, a.cache_size,
                         a.fetch_timeout, a.log_level, a.fuse_threads, a.log_format, a.trace, a.fuse_backend,
                         a.xattrs)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logsetup.configure(opts.log_level, opts.log_format, f"worker{opts.worker_id}")
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    return Worker(opts).run()


if __name__ == "__main__":
    sys.exit(main())
