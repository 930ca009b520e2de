"""asyncio Unix-socket server for the lazyd msgpack API.

Each connection carries many requests; each request runs as its own task, so a
slow ``mount`` never blocks a ``fetch`` on the same connection.  Every request
gets a reply: bad frames, unknown ops, invalid args and handler failures become
``{code, message}`` errors.  Only a frame whose length prefix exceeds the limit
ends the connection (after an error reply), since the stream cannot be resynced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from lazyd import unixsocket
from lazyd.api import wire
from lazyd.api.messages import INTERNAL, INVALID_REQUEST, UNKNOWN_OP, ApiError, Message

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Message | None]]
_HEADER = struct.Struct(">I")
MAX_CONCURRENT_PER_CONNECTION = 8192


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
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=wire.MAX_FRAME + 8)
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
        running: set[asyncio.Task[Any]] = set()
        try:
            while True:
                try:
                    header = await reader.readexactly(_HEADER.size)
                except asyncio.IncompleteReadError:
                    return
                (length,) = _HEADER.unpack(header)
                if length > wire.MAX_FRAME:
                    await self._send(writer, lock, wire.error_reply(None, INVALID_REQUEST, f"frame length {length} exceeds the {wire.MAX_FRAME}-byte limit"))
                    return
                try:
                    body = await reader.readexactly(length)
                except asyncio.IncompleteReadError:
                    return
                try:
                    message = wire.decode_body(body)
                except wire.ProtocolError as exc:
                    await self._send(writer, lock, wire.error_reply(None, INVALID_REQUEST, str(exc)))
                    continue
                if len(running) >= MAX_CONCURRENT_PER_CONNECTION:
                    rid = message.get("id") if isinstance(message.get("id"), int) else None
                    await self._send(writer, lock, wire.error_reply(rid, INVALID_REQUEST, "too many requests in flight on this connection"))
                    continue
                task = asyncio.create_task(self._handle(message, writer, lock))
                running.add(task)
                self._tasks.add(task)
                task.add_done_callback(running.discard)
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

    async def _handle(self, message: dict[str, Any], writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        raw_id = message.get("id")
        request_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
        try:
            if request_id is None:
                raise ApiError(INVALID_REQUEST, "request has no integer id")
            op = message.get("op")
            if not isinstance(op, str):
                raise ApiError(INVALID_REQUEST, "request has no string op")
            spec = self.ops.get(op)
            if spec is None:
                raise ApiError(UNKNOWN_OP, f"unknown op {op[:64]!r}")
            args_cls, handler = spec
            args = args_cls.from_args(message.get("args", {}))
            result = await handler(args)
            reply = wire.ok_reply(request_id, result.to_dict() if result is not None else {})
        except ApiError as exc:
            reply = wire.error_reply(request_id, exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler bug must not take the daemon down
            log.exception("request %r failed", message.get("op"))
            reply = wire.error_reply(request_id, INTERNAL, f"{type(exc).__name__}: {exc}")
        await self._send(writer, lock, reply)
