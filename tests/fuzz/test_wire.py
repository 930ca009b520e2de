"""Fuzz the frame codec (lazyd.api.wire: decode_body, read_frame, recv_frame) and check its
decoder limits: any bytes give a map or ProtocolError, never another exception, a hang or an
allocation out of proportion to the frame."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from lazyd.api import messages, wire
from tests.fuzz.conftest import FUZZ, CaseCounter, guarded
from tests.fuzz.strategies import msgpack_values, mutated

# msgpack builds at most ~72 bytes of objects per input byte (an empty map per byte, measured
# by test_worst_case_amplification); 1 KiB of frame may thus cost ~72 KiB.
AMPLIFICATION = 80


def frame_budget(n: int) -> int:
    return 256 * 1024 + AMPLIFICATION * n


def check_body(body: bytes) -> dict[str, Any] | None:
    out = guarded(lambda: wire.decode_body(body), (wire.ProtocolError,), max_bytes=frame_budget(len(body)))
    event(f"decode_body: {type(out.error).__name__ if out.error else 'map'}")
    if out.error is None:
        assert isinstance(out.result, dict)
    return out.result


requests = st.fixed_dictionaries({"id": msgpack_values, "op": st.one_of(st.sampled_from(sorted(messages.OPS)),
                                                                          msgpack_values),
                                  "args": msgpack_values})


@FUZZ
@given(body=st.binary(max_size=1024))
def test_decode_body_arbitrary_bytes(cases: CaseCounter, body: bytes) -> None:
    cases.hit()
    check_body(body)


@FUZZ
@given(value=st.one_of(msgpack_values, requests))
def test_decode_body_any_msgpack(cases: CaseCounter, value: Any) -> None:
    """What decodes is exactly the map that was packed (NaN aside); anything else is refused."""
    cases.hit()
    body = msgpack.packb(value, use_bin_type=True)
    got = check_body(body)
    if isinstance(value, dict):
        assert got is not None
        if "nan" not in repr(value):
            assert got == value
    else:
        assert got is None


@FUZZ
@given(data=st.data(), value=requests)
def test_decode_body_mutated(cases: CaseCounter, data: st.DataObject, value: dict[str, Any]) -> None:
    cases.hit()
    check_body(data.draw(mutated(msgpack.packb(value, use_bin_type=True))))


@FUZZ
@given(value=st.dictionaries(st.text(max_size=8), msgpack_values, max_size=6))
def test_encode_decode_round_trip(cases: CaseCounter, value: dict[str, Any]) -> None:
    cases.hit()
    frame = wire.encode(value)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    got = wire.decode_body(frame[4:])
    if "nan" not in repr(value):
        assert got == value


def frames_in(stream: bytes) -> list[dict[str, Any] | None | str]:
    """What a reader makes of ``stream``: per frame its map, None (undecodable), or "oversize"."""
    out: list[dict[str, Any] | None | str] = []
    pos = 0
    while len(stream) - pos >= 4:
        (length,) = struct.unpack_from(">I", stream, pos)
        if length > wire.MAX_FRAME:
            out.append("oversize")
            return out
        if len(stream) - pos - 4 < length:
            return out
        try:
            out.append(wire.decode_body(stream[pos + 4 : pos + 4 + length]))
        except wire.ProtocolError:
            out.append(None)
        pos += 4 + length
    return out


streams = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.builds(lambda v: wire.encode({"v": v}), msgpack_values),
        st.builds(lambda b: struct.pack(">I", len(b)) + b, st.binary(max_size=64)),
        st.builds(lambda n: struct.pack(">I", n), st.sampled_from([0, 1, 7, wire.MAX_FRAME, wire.MAX_FRAME + 1,
                                                                   2**32 - 1])),
    ),
    max_size=6,
).map(b"".join)


_STREAM_ENDS = ("frame length", "connection closed")  # the errors after which a stream cannot go on


async def _read_all(stream: bytes) -> list[dict[str, Any] | str]:
    reader = asyncio.StreamReader(limit=wire.MAX_FRAME + 8)
    reader.feed_data(stream)
    reader.feed_eof()
    got: list[dict[str, Any] | str] = []
    while True:
        try:
            message = await wire.read_frame(reader)
        except wire.ProtocolError as exc:
            got.append(f"error: {exc}")
            if str(exc).startswith(_STREAM_ENDS):
                return got
            continue
        if message is None:
            return got
        got.append(message)


@FUZZ
@given(stream=streams)
def test_read_frame_stream(cases: CaseCounter, stream: bytes) -> None:
    """asyncio reader over any byte stream: maps, ProtocolErrors, then a clean end; never a hang."""
    cases.hit()
    got = asyncio.run(asyncio.wait_for(_read_all(stream), 10))
    want = frames_in(stream)
    decoded = [g for g in got if isinstance(g, dict)]
    assert decoded == [w for w in want if isinstance(w, dict)] or "nan" in repr(want)
    assert sum(isinstance(g, str) and not g[len("error: "):].startswith(_STREAM_ENDS) for g in got) == sum(
        w is None for w in want)


def _recv_all(stream: bytes) -> list[dict[str, Any] | str]:
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: (a.sendall(stream), a.shutdown(socket.SHUT_WR)), daemon=True)
    got: list[dict[str, Any] | str] = []
    with a, b:
        b.settimeout(10)  # a hang raises TimeoutError, which fails the case
        sender.start()
        while True:
            try:
                got.append(wire.recv_frame(b))
            except EOFError:
                break
            except wire.ProtocolError as exc:
                got.append(f"error: {exc}")
                if str(exc).startswith(_STREAM_ENDS):
                    break
        sender.join(10)
    return got


@FUZZ
@given(stream=streams)
def test_recv_frame_stream(cases: CaseCounter, stream: bytes) -> None:
    """Blocking reader over a socket: the same frames as the asyncio reader."""
    cases.hit()
    got = _recv_all(stream)
    want = frames_in(stream)
    assert [g for g in got if isinstance(g, dict)] == [w for w in want if isinstance(w, dict)] or "nan" in repr(want)


# -- the decoder limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, limit, make", [
    ("str", wire.MAX_STR_LEN, lambda n: "x" * n),
    ("bin", wire.MAX_BIN_LEN, lambda n: b"x" * n),
    ("array", wire.MAX_ARRAY_LEN, lambda n: [None] * n),
    ("map", wire.MAX_MAP_LEN, lambda n: {str(i): None for i in range(n)}),
])
def test_limits_are_exact(kind: str, limit: int, make: Any) -> None:
    """An object at the limit passes both ways; one item more is refused by encode (before it is
    sent) and by decode_body, as a ProtocolError naming the limit."""
    ok = {"v": make(limit)}
    assert wire.decode_body(wire.encode(ok)[4:]) == ok
    too_big = {"v": make(limit + 1)}
    with pytest.raises(wire.ProtocolError, match=f"exceeds max_{kind}_len"):
        wire.encode(too_big)
    with pytest.raises(wire.ProtocolError, match=f"exceeds max_{kind}_len"):
        wire.decode_body(msgpack.packb(too_big, use_bin_type=True))


@pytest.mark.parametrize("body", [
    msgpack.packb({"t": msgpack.ExtType(1, b"x")}),
    msgpack.packb({"t": msgpack.ExtType(5, b"")}),
    b"\x81\xa1t\xd6\xff\x00\x00\x00\x00",  # a msgpack timestamp
])
def test_ext_types_are_refused(body: bytes) -> None:
    with pytest.raises(wire.ProtocolError, match="ext"):
        wire.decode_body(body)


def test_limits_fit_the_schemas() -> None:
    """Every field limit of lazyd.api.messages fits the decoder limits (a valid message always decodes)."""
    assert wire.MAX_BIN_LEN >= messages.MAX_BLOB
    assert wire.MAX_ARRAY_LEN >= messages.MAX_LIST >= messages.MAX_FETCH_CHUNKS
    assert wire.MAX_STR_LEN >= 4 * max(messages.MAX_PATH, messages.MAX_TEXT, messages.MAX_REF)  # UTF-8: <= 4 bytes a character
    fields = max(len(c.__dataclass_fields__) for c in vars(messages).values()
                 if isinstance(c, type) and issubclass(c, messages.Message) and c is not messages.Message)
    assert wire.MAX_MAP_LEN >= 10 * fields


def depth_of(value: Any) -> int:
    """Nesting depth of a chain of one-item containers (iteratively: == or repr would recurse)."""
    depth = 0
    while isinstance(value, (list, dict)) and value:
        value = value[0] if isinstance(value, list) else next(iter(value.values()))
        depth += 1
    return depth


def deep_body(depth: int, as_map: bool = False) -> bytes:
    """{"v": <depth nested one-item arrays or maps around nil>}, written by hand: msgpack.packb
    itself refuses to nest deeper than 511."""
    return b"\x81\xa1v" + (b"\x81\xa1k" if as_map else b"\x91") * depth + b"\xc0"


def test_nesting_is_bounded() -> None:
    """msgpack's decoder stack refuses more than 1024 nested containers: a ProtocolError.  (Up to
    that depth values decode; Python's own recursion limit is lower, so code must never compare or
    repr a raw decoded value: the schemas in lazyd.api.messages never recurse into one, see
    test_messages.py::test_deep_values_are_refused.)"""
    for as_map in (False, True):
        assert depth_of(wire.decode_body(deep_body(1000, as_map))["v"]) == 1000
        with pytest.raises(wire.ProtocolError, match="not valid msgpack"):
            wire.decode_body(deep_body(1030, as_map))


def test_worst_case_amplification() -> None:
    """The most objects per byte (empty maps in arrays) stay within AMPLIFICATION x the frame, so a
    full 16 MiB frame costs at most ~1.3 GiB (docs/protocol.md, "Decoder limits")."""
    inner = b"\xdd" + struct.pack(">I", wire.MAX_ARRAY_LEN) + b"\x80" * wire.MAX_ARRAY_LEN  # within every limit
    body = b"\x81\xa1v\x9a" + inner * 10  # ~1 MiB
    out = guarded(lambda: wire.decode_body(body), (), max_bytes=frame_budget(len(body)))
    ratio = out.peak / len(body)
    assert ratio > 50, "the worst case got cheaper: update AMPLIFICATION and docs/protocol.md"
    del out


def test_no_other_module_unpacks_socket_data() -> None:
    """wire.py is the one msgpack decoder of socket data; inodes.py unpacks a local file it wrote."""
    root = Path(__file__).resolve().parents[2] / "lazyd"
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if re.search(r"\bunpackb\b|\bUnpacker\b", p.read_text()))
    assert users == ["api/wire.py", "estargz/inodes.py"], users
