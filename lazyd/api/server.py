"""asyncio Unix-socket server for the lazyd msgpack API.

Each connection carries many requests; each request runs as its own task, so a
slow ``mount`` never blocks a ``fetch`` on the same connection.  Every request
gets a reply: bad frames, unknown ops, invalid args and handler failures become
``{code, message}`` errors.  Only a frame whose length prefix exceeds the request
limit (``wire.REQUESTS``) ends the connection (after an error reply naming the size
and the limit), since the stream cannot be resynced.

Frames are read with ``wire.read_sized_frame`` (the one frame reader) and validated
before the next one is read, so the raw decoded form of at most one request exists at a
time; the validated requests a connection has in flight are bounded by
``MAX_INFLIGHT_BYTES`` (reading pauses) and ``MAX_CONCURRENT_PER_CONNECTION`` (an error).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

from lazyd import unixsocket
from lazyd.api import wire
from lazyd.api.messages import INTERNAL, INVALID_REQUEST, UNKNOWN_OP, ApiError, Message

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Message | None]]
MAX_CONCURRENT_PER_CONNECTION = 8192
"""Requests running at once on one connection; one more gets an error reply."""
MAX_INFLIGHT_BYTES = 4 * wire.MAX_BULK_REQUEST
"""Frame bytes of the requests running at once on one connection; above it the server reads
no further request from that connection until some finish."""


class _Request(NamedTuple):
    id: int
    op: str
    handler: Handler
    args: Message


class Server:
    """Serve ``ops`` (name -> (args class, handler)) on a Unix socket created with mode 0600, or 0660
    and group ``group``; missing parent directories are created 0700 (0710 with a group)."""

    def __init__(self, path: str | os.PathLike[str], ops: dict[str, tuple[type[Message], Handler]],
                 group: str | None = None) -> None:
        self.path = Path(path)
        self.ops = ops
        self.group = group
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Listen on ``path`` (see lazyd.unixsocket: never reachable with a wider mode, whatever the umask)."""
        gid = unixsocket.group_id(self.group) if self.group is not None else None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unixsocket.publish(self.path, gid, bind=sock.bind, listen=sock.listen)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                            limit=wire.stream_limit(wire.REQUESTS))
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop accepting, cancel running requests and close connections."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            if self.path.is_socket():
                self.path.unlink()
        except OSError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        lock = asyncio.Lock()
        running: dict[asyncio.Task[Any], int] = {}  # -> its frame's length
        try:
            while True:
                while running and sum(running.values()) > MAX_INFLIGHT_BYTES:
                    await asyncio.wait(list(running), return_when=asyncio.FIRST_COMPLETED)
                try:
                    frame = await wire.read_sized_frame(reader, wire.REQUESTS)
                except wire.FrameTooLarge as exc:
                    await self._send(writer, lock, wire.error_reply(None, INVALID_REQUEST, str(exc)))
                    return
                except wire.TruncatedFrame:
                    return
                except wire.ProtocolError as exc:
                    await self._send(writer, lock, wire.error_reply(None, INVALID_REQUEST, str(exc)))
                    continue
                if frame is None:
                    return
                size = frame[1]
                request = self._parse(frame[0])
                del frame  # the raw decoded request is freed here, before the next one is read
                if not isinstance(request, _Request):
                    await self._send(writer, lock, request)
                    continue
                if len(running) >= MAX_CONCURRENT_PER_CONNECTION:
                    await self._send(writer, lock, wire.error_reply(request.id, INVALID_REQUEST,
                                                                    "too many requests in flight on this connection"))
                    continue
                task = asyncio.create_task(self._handle(request, writer, lock))
                running[task] = size
                self._tasks.add(task)
                task.add_done_callback(lambda t: running.pop(t, None))
                task.add_done_callback(self._tasks.discard)
        except (ConnectionError, OSError):
            return
        finally:
            # Every request gets its reply, also when the client stopped sending after its last
            # one or sent a frame too big (not when the server itself is being stopped).
            current = asyncio.current_task()
            if running and not (current is not None and current.cancelling()):
                await asyncio.gather(*running, return_exceptions=True)
            self._writers.discard(writer)
            writer.close()

    def _parse(self, message: dict[str, Any]) -> _Request | dict[str, Any]:
        """The validated request in ``message``, or the error reply it gets."""
        raw_id = message.get("id")
        request_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
        op = message.get("op")
        try:
            if request_id is None:
                raise ApiError(INVALID_REQUEST, "request has no integer id")
            if not isinstance(op, str):
                raise ApiError(INVALID_REQUEST, "request has no string op")
            spec = self.ops.get(op)
            if spec is None:
                raise ApiError(UNKNOWN_OP, f"unknown op {op[:64]!r}")
            args_cls, handler = spec
            return _Request(request_id, op, handler, args_cls.from_args(message.get("args", {})))
        except ApiError as exc:
            return wire.error_reply(request_id, exc.code, exc.message)
        except Exception as exc:  # a validation bug must not take the daemon down
            log.exception("request %r: validating its args failed", op[:64] if isinstance(op, str) else None)
            return wire.error_reply(request_id, INTERNAL, f"{type(exc).__name__}: {exc}")

    async def _send(self, writer: asyncio.StreamWriter, lock: asyncio.Lock, reply: dict[str, Any]) -> None:
        async with lock:
            if writer.is_closing():
                return
            try:
                await wire.write_frame(writer, reply)
            except (ConnectionError, OSError):
                pass
            except wire.ProtocolError as exc:  # result too large for a frame
                await wire.write_frame(writer, wire.error_reply(reply.get("id"), INTERNAL, str(exc)))

    async def _handle(self, request: _Request, writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        try:
            result = await request.handler(request.args)
            reply = wire.ok_reply(request.id, result.to_dict() if result is not None else {})
        except ApiError as exc:
            reply = wire.error_reply(request.id, exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler bug must not take the daemon down
            log.exception("request %r failed", request.op)
            reply = wire.error_reply(request.id, INTERNAL, f"{type(exc).__name__}: {exc}")
        await self._send(writer, lock, reply)
