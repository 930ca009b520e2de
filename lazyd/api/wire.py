"""Framing for the msgpack Unix-socket protocol (see docs/protocol.md).

Every frame is a 4-byte big-endian length followed by that many bytes of one
msgpack map.  A request is ``{"id": int, "op": str, "args": map}``; a reply is
``{"id": int, "ok": True, "result": any}`` or
``{"id": int, "ok": False, "error": {"code": str, "message": str}}``.
Replies may arrive out of order, so one connection can carry many requests.

This module only frames and unframes; the message schemas live in
``lazyd.api.messages``.  It imports nothing but msgpack at load time (asyncio only when
an async function runs), so a short-lived client such as ``lazyctl rpull`` starts fast.
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    import asyncio

MAX_FRAME = 16 * 1024 * 1024
"""Largest frame either side accepts; a bigger length prefix is a protocol error."""

_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame."""


def encode(message: dict[str, Any]) -> bytes:
    """Frame one message."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Unpack one frame body into a map, rejecting anything else."""
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
        )  # the length prefix already bounds the body to MAX_FRAME
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(f"frame holds a {type(message).__name__}, expected a map")
    return message


def _check_length(length: int) -> None:
    if length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} exceeds the {MAX_FRAME}-byte limit")


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Read one message; ``None`` on a clean end of stream between frames."""
    import asyncio

    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed inside a frame header") from exc
    (length,) = _HEADER.unpack(header)
    _check_length(length)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"connection closed after {len(exc.partial)} of {length} body bytes") from exc
    return decode_body(body)


async def write_frame(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    """Write one message and wait until the transport accepts it."""
    writer.write(encode(message))
    await writer.drain()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    remaining = n
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            if remaining == n:
                raise EOFError("connection closed")
            raise ProtocolError(f"connection closed with {remaining} of {n} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Blocking read of one message; ``EOFError`` on a clean close between frames."""
    (length,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    _check_length(length)
    return decode_body(_recv_exactly(sock, length))


def send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    """Blocking write of one message."""
    sock.sendall(encode(message))


def ok_reply(request_id: int, result: Any) -> dict[str, Any]:
    """A success reply to request ``request_id``."""
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    """An error reply; ``request_id`` is None when the request had no usable id."""
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}
