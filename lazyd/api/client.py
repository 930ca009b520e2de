"""Clients of the lazyd msgpack API: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

Both multiplex many requests on one Unix-socket connection (replies matched by
``id``) and reconnect after the connection drops.  A request whose connection
dropped before its reply raises ``ApiError("unavailable")``; a request with no
reply within its timeout raises ``ApiError("timeout")``.  Error replies raise
``ApiError`` with the server's code and message.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lazyd.api import wire
from lazyd.api.messages import (
    INVALID_REQUEST,
    OPS,
    TIMEOUT,
    UNAVAILABLE,
    WORKER_OPS,
    ApiError,
    CacheStats,
    CheckResult,
    Message,
    MountResult,
    MountsResult,
    StatusResult,
    WorkerMountResult,
    WorkerStatusResult,
)

DEFAULT_SOCKET = "/run/lazyd/lazyd.sock"

M = TypeVar("M", bound=Message)


def _args(args: Message | dict[str, Any] | None) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Message):
        return args.to_dict()
    return {k: v for k, v in args.items() if v is not None}


def _unwrap(reply: dict[str, Any]) -> Any:
    """The result of a success reply; ``ApiError`` for an error reply (``internal`` for a
    malformed one, whatever its shape or depth: see ``wire.reply_error``)."""
    error = wire.reply_error(reply)
    if error is None:
        return reply.get("result")
    raise ApiError(*error)


def _typed(op: str, result: Any) -> Any:
    spec = OPS.get(op) or WORKER_OPS.get(op)
    if spec is None:
        return result
    return spec[1].from_args(result)


# -- blocking client -------------------------------------------------------------


@dataclass
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None
    lost: bool = False


class Client:
    """Thread-safe blocking client; any number of threads may call at once."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 60.0, connect_timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sock, self._sock = self._sock, None
            self._fail_all_locked()
        if sock is not None:
            _shutdown(sock)

    def _fail_all_locked(self) -> None:
        for pending in self._pending.values():
            pending.lost = True
            pending.event.set()

    def _connect(self, deadline: float) -> socket.socket:
        """The current connection, connecting (retrying for up to ``connect_timeout``) if needed."""
        deadline = min(deadline, time.monotonic() + self.connect_timeout)
        while True:
            with self._lock:
                if self._closed:
                    raise ApiError(UNAVAILABLE, "client is closed")
                if self._sock is not None:
                    return self._sock
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(max(0.1, min(self.connect_timeout, deadline - time.monotonic())))
                    sock.connect(self.socket_path)
                    sock.settimeout(None)
                except OSError as exc:
                    sock.close()
                    if time.monotonic() + 0.05 >= deadline:
                        raise ApiError(UNAVAILABLE, f"cannot connect to {self.socket_path}: {exc}") from None
                    error: OSError | None = exc
                else:
                    self._sock = sock
                    threading.Thread(target=self._receive, args=(sock,), name="lazyd-client", daemon=True).start()
                    return sock
            if error is not None:
                time.sleep(0.05)

    def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                reply = wire.recv_frame(sock)
            except (EOFError, OSError, wire.ProtocolError):
                break
            request_id = reply.get("id")
            with self._lock:
                pending = self._pending.get(request_id) if isinstance(request_id, int) else None
            if pending is not None:
                pending.reply = reply
                pending.event.set()
        with self._lock:
            if self._sock is sock:
                self._sock = None
            self._fail_all_locked()
        sock.close()

    def call(self, op: str, args: Message | dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Send one request and return its raw result (a map); raise ``ApiError`` on failure."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        sock = self._connect(deadline)
        request_id = next(self._ids)
        pending = _Pending()
        with self._lock:
            self._pending[request_id] = pending
        try:
            try:
                frame = wire.encode({"id": request_id, "op": op, "args": _args(args)}, wire.REQUESTS)
            except wire.ProtocolError as exc:
                raise ApiError(INVALID_REQUEST, f"{op} request not sent: {exc}") from None
            try:
                with self._send_lock:
                    sock.sendall(frame)
            except OSError as exc:
                _shutdown(sock)
                raise ApiError(UNAVAILABLE, f"connection to {self.socket_path} lost: {exc}") from None
            if not pending.event.wait(max(0.0, deadline - time.monotonic())):
                raise ApiError(TIMEOUT, f"no reply to {op} from {self.socket_path} in time")
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        if pending.reply is None:
            raise ApiError(UNAVAILABLE, f"connection to {self.socket_path} lost before the reply to {op}")
        return _unwrap(pending.reply)

    def request(self, op: str, args: Message | dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Like ``call`` but returns the op's typed result dataclass."""
        return _typed(op, self.call(op, args, timeout))

    # Typed helpers for the main ops.
    def fetch(self, layer_digest: str, chunks: list[tuple[int, int]], priority: str = "demand", timeout: float | None = None) -> None:
        self.call("fetch", {"layer_digest": layer_digest, "chunks": [list(c) for c in chunks], "priority": priority}, timeout)

    def mount(self, ref: str, layer_digest: str, mountpoint: str, toc_digest: str | None = None,
              prefetch_wait: bool | None = None, timeout: float | None = None) -> MountResult:
        return self.request("mount", {"ref": ref, "layer_digest": layer_digest, "mountpoint": mountpoint,
                                      "toc_digest": toc_digest, "prefetch_wait": prefetch_wait}, timeout)

    def unmount(self, mountpoint: str) -> None:
        self.call("unmount", {"mountpoint": mountpoint})

    def check(self, mountpoint: str) -> CheckResult:
        return self.request("check", {"mountpoint": mountpoint})

    def status(self) -> StatusResult:
        return self.request("status")

    def mounts(self) -> MountsResult:
        return self.request("mounts")

    def cache(self, action: str, layer_digest: str | None = None) -> CacheStats:
        return self.request("cache", {"action": action, "layer_digest": layer_digest})

    def fallback(self, ref: str, layer_digest: str, reason: str) -> None:
        self.call("fallback", {"ref": ref, "layer_digest": layer_digest, "reason": reason})

    def shutdown(self, timeout: float | None = None) -> None:
        self.call("shutdown", {}, timeout)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- asyncio client -----------------------------------------------------------------


class AsyncClient:
    """asyncio client; one connection, many concurrent requests, reconnect on demand."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 60.0, connect_timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._connect_lock = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass
            self._reader_task = None
        self._fail_all()

    def _fail_all(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ApiError(UNAVAILABLE, f"connection to {self.socket_path} lost"))
        self._pending.clear()

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connect_lock:
            if self._closed:
                raise ApiError(UNAVAILABLE, "client is closed")
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.socket_path, limit=wire.stream_limit(wire.REPLIES)),
                    self.connect_timeout,
                )
            except (OSError, asyncio.TimeoutError) as exc:
                raise ApiError(UNAVAILABLE, f"cannot connect to {self.socket_path}: {exc}") from None
            self._writer = writer
            self._reader_task = asyncio.create_task(self._receive(reader, writer))
            return writer

    async def _receive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                reply = await wire.read_frame(reader)
                if reply is None:
                    break
                fut = self._pending.pop(reply.get("id"), None) if isinstance(reply.get("id"), int) else None
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        except (OSError, wire.ProtocolError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            self._fail_all()

    async def call(self, op: str, args: Message | dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Send one request and return its raw result; raise ``ApiError`` on failure."""
        writer = await self._connect()
        request_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            await wire.write_frame(writer, {"id": request_id, "op": op, "args": _args(args)}, wire.REQUESTS)
            reply = await asyncio.wait_for(fut, self.timeout if timeout is None else timeout)
        except wire.ProtocolError as exc:
            raise ApiError(INVALID_REQUEST, f"{op} request not sent: {exc}") from None
        except asyncio.TimeoutError:
            raise ApiError(TIMEOUT, f"no reply to {op} from {self.socket_path} in time") from None
        except OSError as exc:
            raise ApiError(UNAVAILABLE, f"connection to {self.socket_path} lost: {exc}") from None
        finally:
            self._pending.pop(request_id, None)
            if fut.done() and not fut.cancelled():
                # The connection failed (``_fail_all``) while the request was being written: that
                # error is the one raised here, so the future's own is retrieved, not reported by
                # asyncio as "never retrieved" when it is collected.
                fut.exception()
        return _unwrap(reply)

    async def request(self, op: str, args: Message | dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Like ``call`` but returns the op's typed result dataclass."""
        return _typed(op, await self.call(op, args, timeout))

    async def worker_mount(self, **args: Any) -> WorkerMountResult:
        return await self.request("worker.mount", args)

    async def worker_status(self) -> WorkerStatusResult:
        return await self.request("worker.status")
