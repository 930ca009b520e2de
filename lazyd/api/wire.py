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
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

if TYPE_CHECKING:
    import asyncio

MAX_FRAME = 16 * 1024 * 1024
"""Largest frame a reply (and any frame read with ``REPLIES``) may be."""

# Per-object limits of the msgpack decoder (docs/protocol.md, "Decoder limits").  Without
# them msgpack bounds each object only by the frame's length.
MAX_STR_LEN = 1024 * 1024
"""Bytes of one msgpack str: 256x the longest string field (4096 characters)."""
MAX_BIN_LEN = 4 * 1024 * 1024
"""Bytes of one msgpack bin: the largest byte-string field (a manifest, index, config or profile)."""
MAX_ARRAY_LEN = 100_000
"""Items of one msgpack array: the longest list field."""
MAX_MAP_LEN = 1024
"""Entries of one msgpack map: every map is a message with named fields (at most a few dozen)."""
MAX_EXT_LEN = 0
"""The protocol uses no msgpack ext types: any ext (timestamps included) is refused."""

# Requests (what a server reads) are limited much more tightly than replies: decoding costs
# up to ~72 bytes of Python objects per input byte (a frame of empty maps), so the limits
# below bound what one request can make a server allocate (measured in
# tests/daemon/test_wire_limits.py; docs/protocol.md, "Request limits").
MAX_REQUEST = 2 * 1024 * 1024
"""Largest ordinary request frame.  The largest valid request is a ``layer_state`` with 4096
reports at the 300-character digest limit (1.4 MiB); a ``fetch`` of 4096 chunks is 80 KiB."""
MAX_REQUEST_CONTAINERS = 16 * 1024
"""Arrays and maps in one ordinary request: 4x the most a valid one holds (4096 chunks or layer
reports, plus the request, its args and the list)."""
MAX_BULK_REQUEST = MAX_BIN_LEN + 64 * 1024
"""Largest request frame at all.  A request above ``MAX_REQUEST`` is a bulk request: a few
fields and byte strings (e.g. a ``profile_put`` carrying a profile of up to ``MAX_BIN_LEN``),
decoded with the tight ``BULK_*`` limits, so its cost stays about its size."""
BULK_MAX_ITEMS = 64
"""Items of one array or map in a bulk request."""
BULK_MAX_CONTAINERS = 64
"""Arrays and maps in one bulk request."""
BULK_MAX_STR_LEN = 64 * 1024
"""Bytes of one msgpack str in a bulk request (bulk data travels as bin)."""


class Limits(NamedTuple):
    """The msgpack decoder limits for one frame: per object, and (``max_containers``) the
    arrays and maps in the whole frame; ``None`` leaves them bounded by the frame length."""

    max_str_len: int = MAX_STR_LEN
    max_bin_len: int = MAX_BIN_LEN
    max_array_len: int = MAX_ARRAY_LEN
    max_map_len: int = MAX_MAP_LEN
    max_containers: int | None = None

    def cannot_break(self, length: int) -> bool:
        """Whether no body of ``length`` bytes can exceed these limits (so ``encode`` need not
        decode it to check): each map entry takes at least 2 bytes, any other item or container
        at least 1, and ``packb`` writes no ext for the values lazyd sends."""
        return (length < 2 * self.max_map_len and length < min(self.max_array_len, self.max_str_len, self.max_bin_len)
                and (self.max_containers is None or length < self.max_containers))


class Policy(NamedTuple):
    """What a reader accepts: frames up to the last tier's size, each decoded with the limits of
    the first tier ``(size, limits)`` it fits.  ``name`` names the frame kind in errors."""

    name: str
    tiers: tuple[tuple[int, Limits], ...]

    @property
    def max_frame(self) -> int:
        return self.tiers[-1][0]

    def limits_for(self, length: int) -> Limits:
        """The limits a frame of ``length`` bytes is decoded with; ``FrameTooLarge`` above them all."""
        for size, limits in self.tiers:
            if length <= size:
                return limits
        raise FrameTooLarge(length, self.max_frame, self.name)


REPLIES = Policy("frame", ((MAX_FRAME, Limits()),))
"""Replies, and every frame read without naming a policy."""
REQUESTS = Policy("request", (
    (MAX_REQUEST, Limits(max_containers=MAX_REQUEST_CONTAINERS)),
    (MAX_BULK_REQUEST, Limits(max_str_len=BULK_MAX_STR_LEN, max_array_len=BULK_MAX_ITEMS,
                              max_map_len=BULK_MAX_ITEMS, max_containers=BULK_MAX_CONTAINERS)),
))
"""Requests, as a server reads them (docs/protocol.md, "Request limits")."""

_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame (the stream stays in step: read on)."""


class FrameTooLarge(ProtocolError):
    """A length prefix above the reader's limit; the body is not read, so the stream cannot go on."""

    def __init__(self, length: int, limit: int, kind: str = "frame") -> None:
        super().__init__(f"frame length {length} exceeds the {limit}-byte {kind} limit")
        self.length = length
        self.limit = limit


class TruncatedFrame(ProtocolError):
    """The connection closed inside a frame."""


class _TooManyContainers(ValueError):
    pass


class _ContainerBudget:
    """msgpack ``list_hook``/``object_hook`` that refuses the container after the ``n``-th."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.left = n

    def __call__(self, value: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise _TooManyContainers(f"more than {self.n} arrays and maps")
        return value


def encode(message: dict[str, Any], policy: Policy = REPLIES) -> bytes:
    """Frame one message; ``ProtocolError`` if a reader with ``policy`` would refuse it (so the
    sender gets one clear error, not a torn connection)."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > policy.max_frame:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {policy.max_frame}-byte {policy.name} limit")
    limits = policy.limits_for(len(body))
    if not limits.cannot_break(len(body)):
        try:
            _unpack(body, limits)
        except Exception as exc:
            raise ProtocolError(f"message exceeds a decoder limit: {exc}") from None
    return _HEADER.pack(len(body)) + body


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not part of the protocol")


def _unpack(body: bytes, limits: Limits) -> Any:
    hooks: dict[str, Any] = {}
    if limits.max_containers is not None:
        budget = _ContainerBudget(limits.max_containers)
        hooks = {"list_hook": budget, "object_hook": budget}
    return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext, max_ext_len=MAX_EXT_LEN,
                           max_str_len=limits.max_str_len, max_bin_len=limits.max_bin_len,
                           max_array_len=limits.max_array_len, max_map_len=limits.max_map_len, **hooks)


def decode_body(body: bytes, policy: Policy = REPLIES) -> dict[str, Any]:
    """Unpack one frame body into a map, rejecting anything else.

    The body is bounded by the policy's frame size and decoded with the limits of its tier;
    nesting is bounded by msgpack's own decoder stack (1024 containers).
    """
    limits = policy.limits_for(len(body))
    try:
        message = _unpack(body, limits)
    except _TooManyContainers as exc:
        raise ProtocolError(f"{policy.name} of {len(body)} bytes holds {exc} (its limit)") from None
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(f"frame holds a {type(message).__name__}, expected a map")
    return message


def stream_limit(policy: Policy) -> int:
    """The ``limit`` for an ``asyncio.StreamReader`` that reads frames with ``policy`` (it buffers
    up to twice this before it stops reading the socket)."""
    return policy.max_frame + _HEADER.size


async def read_sized_frame(reader: asyncio.StreamReader, policy: Policy = REPLIES) -> tuple[dict[str, Any], int] | None:
    """Read one message and its body's length; ``None`` on a clean end of stream between frames.

    Raises ``FrameTooLarge`` (nothing more can be read), ``TruncatedFrame``, or ``ProtocolError``
    for a body that does not decode (the next frame can be read).
    """
    import asyncio

    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise TruncatedFrame("connection closed inside a frame header") from exc
    (length,) = _HEADER.unpack(header)
    policy.limits_for(length)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise TruncatedFrame(f"connection closed after {len(exc.partial)} of {length} body bytes") from exc
    return decode_body(body, policy), length


async def read_frame(reader: asyncio.StreamReader, policy: Policy = REPLIES) -> dict[str, Any] | None:
    """Read one message; ``None`` on a clean end of stream between frames (see ``read_sized_frame``)."""
    frame = await read_sized_frame(reader, policy)
    return None if frame is None else frame[0]


async def write_frame(writer: asyncio.StreamWriter, message: dict[str, Any], policy: Policy = REPLIES) -> None:
    """Write one message (checked against ``policy``) and wait until the transport accepts it."""
    writer.write(encode(message, policy))
    await writer.drain()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    remaining = n
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            if remaining == n:
                raise EOFError("connection closed")
            raise TruncatedFrame(f"connection closed with {remaining} of {n} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, policy: Policy = REPLIES) -> dict[str, Any]:
    """Blocking read of one message; ``EOFError`` on a clean close between frames; the
    ``ProtocolError``s of ``read_sized_frame``."""
    (length,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    policy.limits_for(length)
    try:
        body = _recv_exactly(sock, length)
    except EOFError:
        raise TruncatedFrame(f"connection closed after 0 of {length} body bytes") from None
    return decode_body(body, policy)


def send_frame(sock: socket.socket, message: dict[str, Any], policy: Policy = REPLIES) -> None:
    """Blocking write of one message (checked against ``policy``)."""
    sock.sendall(encode(message, policy))


def ok_reply(request_id: int, result: Any) -> dict[str, Any]:
    """A success reply to request ``request_id``."""
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    """An error reply; ``request_id`` is None when the request had no usable id."""
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


MAX_ERROR_MESSAGE = 8192
"""Characters of an error message ``reply_error`` passes on (the rest is cut, marked)."""


def reply_error(reply: dict[str, Any]) -> tuple[str, str] | None:
    """``None`` for a success reply, else the ``(code, message)`` of the error reply.

    Safe for any reply ``decode_body`` returns, however deep: a reply that is not a success and
    has no ``{code: str, message: str}`` error map gives ``("internal", <what is wrong with it>)``;
    no value from the reply is ever ``str()``-ed or ``repr()``-ed (which would recurse into it).
    """
    if reply.get("ok") is True:
        return None
    error = reply.get("error")
    if reply.get("ok") is not False or not isinstance(error, dict):
        return "internal", (f"malformed reply from the peer: ok is {_kind(reply.get('ok'))} and error is "
                            f"{_kind(error)}, expected ok true, or ok false and an error map")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        return "internal", (f"malformed error reply from the peer: code is {_kind(code)} and message is "
                            f"{_kind(message)}, expected two strings")
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE] + f"... ({len(message) - MAX_ERROR_MESSAGE} more characters)"
    return code[:64], message


def _kind(value: Any) -> str:
    """A bounded description of a decoded value: its type, and its length for a container or string."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)  # msgpack ints have at most 64 bits
    if isinstance(value, (str, bytes, list, dict)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"
