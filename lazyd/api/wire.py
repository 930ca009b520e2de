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

# Per-object limits of the msgpack decoder (docs/protocol.md, "Decoder limits").  Without
# them msgpack bounds each object only by the frame's length.
MAX_STR_LEN = 1024 * 1024
"""Bytes of one msgpack str: 256x the longest string field (4096 characters)."""
MAX_BIN_LEN = 4 * 1024 * 1024
"""Bytes of one msgpack bin: the largest byte-string field (a manifest, index or config)."""
MAX_ARRAY_LEN = 100_000
"""Items of one msgpack array: the longest list field."""
MAX_MAP_LEN = 1024
"""Entries of one msgpack map: every map is a message with named fields (at most a few dozen)."""
MAX_EXT_LEN = 0
"""The protocol uses no msgpack ext types: any ext (timestamps included) is refused."""

_LIMITS = {
    "max_str_len": MAX_STR_LEN,
    "max_bin_len": MAX_BIN_LEN,
    "max_array_len": MAX_ARRAY_LEN,
    "max_map_len": MAX_MAP_LEN,
    "max_ext_len": MAX_EXT_LEN,
}
# A body this short cannot break a limit: each map entry takes at least 2 bytes, the other
# length limits are larger still, and packb writes no ext for the values lazyd sends.
# Longer bodies are checked by decoding them before they are sent.
_SURELY_WITHIN_LIMITS = 2 * MAX_MAP_LEN

_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame."""


def encode(message: dict[str, Any]) -> bytes:
    """Frame one message."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    if len(body) > _SURELY_WITHIN_LIMITS:
        try:
            _unpack(body)  # what the peer would refuse is refused here, as one error, not a torn connection
        except Exception as exc:
            raise ProtocolError(f"message exceeds a decoder limit: {exc}") from None
    return _HEADER.pack(len(body)) + body


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not part of the protocol")


def _unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext, **_LIMITS)


def decode_body(body: bytes) -> dict[str, Any]:
    """Unpack one frame body into a map, rejecting anything else.

    The body is bounded by the frame length and each object in it by the ``MAX_*_LEN``
    limits; nesting is bounded by msgpack's own decoder stack (1024 containers).
    """
    try:
        message = _unpack(body)
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
