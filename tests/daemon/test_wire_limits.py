"""Request limits of the msgpack API (lazyd.api.wire.REQUESTS), measured memory bounds, the one
frame reader, and clients facing a hostile server (docs/protocol.md, "Request limits")."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import struct
import threading
import tracemalloc
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lazyd.api import messages, wire
from lazyd.api.client import AsyncClient, Client
from lazyd.api.messages import ApiError, Empty, LayerReport, LayerStateArgs, Message
from lazyd.api.server import MAX_INFLIGHT_BYTES, Server
from tests.daemon.conftest import DaemonProc

# -- worst-case request bodies --------------------------------------------------------------------


def arrays_of(item: bytes, size: int, per: int = wire.MAX_ARRAY_LEN) -> bytes:
    """A body ``{"v": [[item, ...], ...]}`` of at most ``size`` bytes, each inner array ``per`` items."""
    inner = b"\xdd" + struct.pack(">I", per) + item * per
    k = (size - 16) // len(inner)
    rest = (size - 16 - k * len(inner) - 5) // len(item)
    tail = b"\xdd" + struct.pack(">I", rest) + item * rest if rest > 0 else b""
    body = b"\x81\xa1v\xdc" + struct.pack(">H", k + bool(tail)) + inner * k + tail
    assert size - 64 < len(body) <= size
    return body


def bulk_body(size: int) -> bytes:
    """A bulk request at its most expensive: 60 nested arrays of 63 short strings (within the
    64-container limit) and bins that fill the frame."""
    level = b"\xdc" + struct.pack(">H", wire.BULK_MAX_ITEMS) + b"\xa2ab" * (wire.BULK_MAX_ITEMS - 1)
    head = b"\x83\xa1v" + level * 60 + b"\xc0"
    first = min(wire.MAX_BIN_LEN, size - len(head) - 14)
    second = size - len(head) - 14 - first
    body = (head + b"\xa1w\xc6" + struct.pack(">I", first) + b"x" * first
            + b"\xa1x\xc6" + struct.pack(">I", second) + b"y" * second)
    assert len(body) == size
    return body


WORST_ORDINARY = {  # the costliest shapes per input byte (2-byte strs: a fresh 56-byte object per 3 bytes)
    "short strs": lambda: arrays_of(b"\xa2ab", wire.MAX_REQUEST),
    "3-byte characters": lambda: arrays_of(b"\xa3" + "\u3042".encode(), wire.MAX_REQUEST),
    "16-bit ints": lambda: arrays_of(b"\xcd\x01\x01", wire.MAX_REQUEST),
    "2-byte bins": lambda: arrays_of(b"\xc4\x02ab", wire.MAX_REQUEST),
}
ORDINARY_AMPLIFICATION = 24  # measured: 19.8-21.1 bytes (tracemalloc) per input byte for the shapes above
"""Bytes of objects per input byte an ordinary request may cost at most."""


def peak_of(fn: Callable[[], Any], bound: int) -> tuple[Any, int]:
    """``fn()`` (or the ProtocolError it raised) and the tracemalloc peak it allocated.  A peak
    over ``bound`` is measured up to twice more and the smallest counts (tracemalloc counts every
    thread, and other tests may leave some running; a real excess shows both times)."""
    best: int | None = None
    out: Any = None
    for _ in range(3):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            try:
                out = fn()
            except wire.ProtocolError as exc:
                out = exc
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        best = peak if best is None else min(best, peak)
        if best <= bound:
            break
    assert best is not None
    return out, best


@pytest.mark.parametrize("shape", sorted(WORST_ORDINARY))
def test_worst_ordinary_request_is_bounded(shape: str) -> None:
    """A request at MAX_REQUEST of the costliest scalars decodes within ORDINARY_AMPLIFICATION x its
    size (~42 MiB for 2 MiB); a reply of the same size may cost 3x that (empty maps, below)."""
    body = WORST_ORDINARY[shape]()
    out, peak = peak_of(lambda: wire.decode_body(body, wire.REQUESTS), ORDINARY_AMPLIFICATION * len(body))
    assert isinstance(out, dict), out
    assert peak <= ORDINARY_AMPLIFICATION * len(body), f"{shape}: {peak / len(body):.1f} bytes per byte"
    assert peak >= 8 * len(body), "the worst case got cheaper: update ORDINARY_AMPLIFICATION and docs/protocol.md"


@pytest.mark.parametrize("item", [b"\x80", b"\x90", b"\x81\xa1a\xc0"],
                         ids=["empty maps", "empty arrays", "1-entry maps"])
def test_container_heavy_request_is_refused_cheaply(item: bytes) -> None:
    """Containers cost up to 72 bytes per input byte; a request stops at MAX_REQUEST_CONTAINERS of them."""
    body = arrays_of(item, wire.MAX_REQUEST)
    bound = 1024 * 1024 + 256 * wire.MAX_REQUEST_CONTAINERS
    out, peak = peak_of(lambda: wire.decode_body(body, wire.REQUESTS), bound)
    assert isinstance(out, wire.ProtocolError)
    assert f"holds more than {wire.MAX_REQUEST_CONTAINERS} arrays and maps" in str(out)
    assert peak <= bound, f"refusing it took {peak} bytes"
    # A reply (no container budget) of this shape costs what any request used to (1 MiB of it here).
    small = arrays_of(item, 1024 * 1024)
    out, peak = peak_of(lambda: wire.decode_body(small, wire.REPLIES), 0)
    assert isinstance(out, dict) and peak > 40 * len(small)
    del out


def test_worst_bulk_request_is_bounded() -> None:
    """A bulk request (up to MAX_BULK_REQUEST) costs about its size: its bins, and at most a few
    MiB of small objects (the BULK_* limits)."""
    body = bulk_body(wire.MAX_BULK_REQUEST)
    out, peak = peak_of(lambda: wire.decode_body(body, wire.REQUESTS), len(body) + 2 * 1024 * 1024)
    assert isinstance(out, dict), out
    assert peak <= len(body) + 2 * 1024 * 1024
    def with_filler(first: bytes) -> bytes:  # {"v": <first>, "w": <a bin filling the frame>}
        filler = wire.MAX_BULK_REQUEST - len(first) - 10
        return b"\x82\xa1v" + first + b"\xa1w\xc6" + struct.pack(">I", filler) + b"x" * filler

    many = wire.BULK_MAX_ITEMS  # with the list and the request map: more than BULK_MAX_CONTAINERS
    for bad, what in [(arrays_of(b"\xa2ab", wire.MAX_BULK_REQUEST), "max_array_len"),
                      (with_filler(b"\xdc" + struct.pack(">H", many) + (b"\x9f" + b"\xa2ab" * 15) * many),
                       f"holds more than {wire.BULK_MAX_CONTAINERS} arrays and maps"),
                      (with_filler(b"\xdb" + struct.pack(">I", 100_000) + b"s" * 100_000), "max_str_len")]:
        assert wire.MAX_REQUEST < len(bad) <= wire.MAX_BULK_REQUEST
        out, peak = peak_of(lambda: wire.decode_body(bad, wire.REQUESTS), len(bad) + 2 * 1024 * 1024)
        assert isinstance(out, wire.ProtocolError) and what in str(out), out
        assert peak <= len(bad) + 2 * 1024 * 1024


def test_request_tiers() -> None:
    assert wire.REQUESTS.max_frame == wire.MAX_BULK_REQUEST < wire.MAX_FRAME == wire.REPLIES.max_frame
    assert wire.REQUESTS.limits_for(wire.MAX_REQUEST).max_containers == wire.MAX_REQUEST_CONTAINERS
    assert wire.REQUESTS.limits_for(wire.MAX_REQUEST + 1).max_array_len == wire.BULK_MAX_ITEMS
    with pytest.raises(wire.FrameTooLarge, match=f"frame length {wire.MAX_BULK_REQUEST + 1} exceeds the "
                                                 f"{wire.MAX_BULK_REQUEST}-byte request limit") as info:
        wire.REQUESTS.limits_for(wire.MAX_BULK_REQUEST + 1)
    assert (info.value.length, info.value.limit) == (wire.MAX_BULK_REQUEST + 1, wire.MAX_BULK_REQUEST)
    # A sender learns what the reader would refuse before it sends.
    with pytest.raises(wire.ProtocolError, match="request limit"):
        wire.encode({"v": b"x" * wire.MAX_BIN_LEN, "w": b"x" * 100_000}, wire.REQUESTS)
    with pytest.raises(wire.ProtocolError, match="arrays and maps"):
        wire.encode({"v": [[]] * (wire.MAX_REQUEST_CONTAINERS + 1)}, wire.REQUESTS)
    assert wire.decode_body(wire.encode({"v": [[]] * 100_000})[4:]) == {"v": [[]] * 100_000}  # a reply may


# -- every valid request fits ---------------------------------------------------------------------


@dataclass
class Bound:
    """Upper bounds of an encoded value: its bytes, its arrays and maps, the items of its longest
    array or map, and the bytes of its longest str."""

    size: int = 0
    containers: int = 0
    items: int = 0
    str_len: int = 0

    def add(self, other: Bound, times: int = 1) -> None:
        self.size += times * other.size
        self.containers += times * other.containers
        self.items = max(self.items, other.items)
        self.str_len = max(self.str_len, other.str_len)


def bound_of(tp: Any, meta: dict[str, Any]) -> Bound:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [bound_of(t, meta) for t in typing.get_args(tp) if t is not type(None)]
        out = Bound(max(o.size for o in options), max(o.containers for o in options))
        for o in options:
            out.items, out.str_len = max(out.items, o.items), max(out.str_len, o.str_len)
        return out
    if origin is list:
        n = meta.get("max_items", messages.MAX_LIST)
        out = Bound(5, 1, n)
        out.add(bound_of(typing.get_args(tp)[0], {}), n)
        return out
    if origin is tuple:
        out = Bound(5, 1, len(typing.get_args(tp)))
        for t in typing.get_args(tp):
            out.add(bound_of(t, {}))
        return out
    if isinstance(tp, type) and issubclass(tp, Message):
        return message_bound(tp)
    if tp is str:
        if "choices" in meta:
            n = max(len(c.encode()) for c in meta["choices"])
        else:  # patterned fields are ASCII (digests, ids, names); free text is up to 4 bytes a character
            n = meta.get("max_len", messages.MAX_TEXT) * (1 if "pattern" in meta else 4)
        return Bound(n + 5, 0, 0, n)
    if tp is bytes:
        return Bound(meta.get("max_len", messages.MAX_BLOB) + 5)
    if tp in (int, float, bool):
        return Bound(9)
    raise AssertionError(f"no bound for field type {tp!r}: teach bound_of")


def message_bound(cls: type[Message]) -> Bound:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    out = Bound(5, 1, len(fields))
    for f in fields:
        out.add(Bound(len(f.name) + 2, 0, 0, len(f.name)))
        out.add(bound_of(hints[f.name], dict(f.metadata)))
    return out


ALL_OPS = {**messages.OPS, **messages.WORKER_OPS}


@pytest.mark.parametrize("op", sorted(ALL_OPS))
def test_every_valid_request_fits_the_request_limits(op: str) -> None:
    """The largest valid request of every op (computed from its Args schema) is accepted: within
    MAX_REQUEST with at most MAX_REQUEST_CONTAINERS containers, or a bulk request (a few fields and
    byte strings).  An op whose args break this needs a tighter schema, not a bigger limit."""
    args = message_bound(ALL_OPS[op][0])
    size = 1 + 4 + 9 + 4 + 5 + len(op) + 6 + args.size  # {"id": int, "op": op, "args": ...}
    containers = 1 + args.containers
    if size <= wire.MAX_REQUEST:
        assert containers <= wire.MAX_REQUEST_CONTAINERS, f"{op}: up to {containers} arrays and maps"
    else:
        assert size <= wire.MAX_BULK_REQUEST, f"{op}: a valid request may be {size} bytes"
        assert containers <= wire.BULK_MAX_CONTAINERS and args.items <= wire.BULK_MAX_ITEMS, (
            f"{op}: a request over MAX_REQUEST may have at most {wire.BULK_MAX_CONTAINERS} arrays and maps of at "
            f"most {wire.BULK_MAX_ITEMS} items; carry bulk data as one byte string")
        assert args.str_len <= wire.BULK_MAX_STR_LEN


def test_largest_layer_state_is_accepted(server: Served) -> None:
    """layer_state with 4096 reports at the 300-character digest limit (1.4 MiB) goes through."""
    digest = "a" * 43 + ":" + "b" * 256
    reports = [LayerReport(layer_digest=digest, state="promoting", disk_bytes=2**63 - 1)] * messages.MAX_LAYER_REPORTS
    args = LayerStateArgs(mode="after_fetch", layers=reports)
    assert 1024 * 1024 < len(wire.encode({"id": 1, "op": "layer_state", "args": args.to_dict()}, wire.REQUESTS))
    with Client(server.path, timeout=30) as c:
        assert c.call("layer_state", args) == {"n": messages.MAX_LAYER_REPORTS}


# -- the server -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobArgs(Message):
    data: bytes = field(default=b"")


@dataclass(frozen=True)
class Count(Message):
    n: int


@dataclass
class Served:
    path: str
    loop: asyncio.AbstractEventLoop
    blob_gate: threading.Event
    blob_running: list[int] = field(default_factory=list)  # in-flight "blob" handlers, sampled at each start


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Served]:
    """An in-process Server in a thread: ``status`` (Empty), ``blob`` (a byte string; waits for
    ``blob_gate``) and ``layer_state``."""
    ready = threading.Event()
    gate = threading.Event()
    state: dict[str, Any] = {}
    running = [0]

    async def status(_: Empty) -> Count:
        return Count(n=0)

    async def blob(args: BlobArgs) -> Count:
        running[0] += 1
        served.blob_running.append(running[0])
        try:
            while not gate.is_set():
                await asyncio.sleep(0.01)
        finally:
            running[0] -= 1
        return Count(n=len(args.data))

    async def layer_state(args: LayerStateArgs) -> Count:
        return Count(n=len(args.layers))

    async def main() -> None:
        srv = Server(tmp_path / "s.sock", {"status": (Empty, status), "blob": (BlobArgs, blob),
                                           "layer_state": (LayerStateArgs, layer_state)})
        await srv.start()
        stop = asyncio.Event()
        state["stop"] = stop
        ready.set()
        try:
            await stop.wait()
        finally:
            await srv.close()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    served = Served(str(tmp_path / "s.sock"), loop, gate)
    thread.start()
    assert ready.wait(10)
    try:
        yield served
    finally:
        gate.set()
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(10)
        loop.close()


def raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s


def test_too_big_request_is_answered_and_ends_only_its_connection(server: Served) -> None:
    other = raw(server.path)
    with other, raw(server.path) as s:
        wire.send_frame(other, {"id": 1, "op": "status", "args": {}})
        assert wire.recv_frame(other)["ok"] is True
        s.sendall(struct.pack(">I", wire.MAX_BULK_REQUEST + 1) + b"\x80" * 1000)
        reply = wire.recv_frame(s)
        assert reply["ok"] is False and reply["id"] is None and reply["error"]["code"] == "invalid_request"
        assert reply["error"]["message"] == (f"frame length {wire.MAX_BULK_REQUEST + 1} exceeds the "
                                             f"{wire.MAX_BULK_REQUEST}-byte request limit")
        with pytest.raises(EOFError):
            wire.recv_frame(s)
        wire.send_frame(other, {"id": 2, "op": "status", "args": {}})
        assert wire.recv_frame(other) == {"id": 2, "ok": True, "result": {"n": 0}}
    with Client(server.path, timeout=10) as c:
        assert c.call("status") == {"n": 0}


def test_refused_request_bodies_keep_the_connection(server: Served) -> None:
    """A body over a decoder limit is one error reply; the next request on the connection is served."""
    with raw(server.path) as s:
        for body, what in [(arrays_of(b"\x80", wire.MAX_REQUEST), "arrays and maps"),
                           (arrays_of(b"\xa2ab", wire.MAX_BULK_REQUEST), "max_array_len")]:
            s.sendall(struct.pack(">I", len(body)) + body)
            reply = wire.recv_frame(s)
            assert reply["ok"] is False and reply["error"]["code"] == "invalid_request"
            assert what in reply["error"]["message"]
            wire.send_frame(s, {"id": 7, "op": "status", "args": {}})
            assert wire.recv_frame(s)["id"] == 7


def test_bulk_request_round_trip(server: Served) -> None:
    """A request carrying a MAX_BIN_LEN byte string (a profile_put's profile) is accepted; one too
    big is refused by the client before it is sent."""
    server.blob_gate.set()
    with Client(server.path, timeout=30) as c:
        assert c.call("blob", {"data": b"p" * wire.MAX_BIN_LEN}) == {"n": wire.MAX_BIN_LEN}
        with pytest.raises(ApiError, match="blob request not sent: .*exceeds the 4259840-byte request limit") as info:
            c.call("blob", {"data": b"p" * wire.MAX_BIN_LEN, "more": b"x" * 100_000})
        assert info.value.code == "invalid_request"
        assert c.call("status") == {"n": 0}


def test_pipelined_bulk_requests_are_read_as_handlers_finish(server: Served) -> None:
    """A client pipelining large requests gets no more than MAX_INFLIGHT_BYTES of them into
    running handlers; the rest wait in the socket until some finish, then every one is answered."""
    n = 12
    frame = wire.encode({"id": 0, "op": "blob", "args": {"data": b"q" * wire.MAX_BIN_LEN}}, wire.REQUESTS)
    with raw(server.path) as s:
        s.settimeout(60)
        sender = threading.Thread(target=lambda: [s.sendall(frame) for _ in range(n)], daemon=True)
        sender.start()
        deadline = 50
        while len(server.blob_running) < MAX_INFLIGHT_BYTES // wire.MAX_BIN_LEN and deadline:
            threading.Event().wait(0.1)
            deadline -= 1
        threading.Event().wait(0.5)  # time to read more, were it not held back
        assert max(server.blob_running) <= MAX_INFLIGHT_BYTES // wire.MAX_BIN_LEN + 1 < n
        server.blob_gate.set()
        replies = [wire.recv_frame(s) for _ in range(n)]
        sender.join(30)
    assert [r["result"]["n"] for r in replies] == [wire.MAX_BIN_LEN] * n


def test_live_daemon_memory_for_worst_requests(daemon: DaemonProc) -> None:
    """lazyd serve's peak RSS (VmHWM) grows by less than 32x MAX_REQUEST (measured: 51 MiB) for the worst ordinary
    request, and barely for a refused container bomb or an oversize prefix; it keeps serving."""
    pid = daemon.proc.pid

    def hwm() -> int:
        text = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024

    with daemon.client() as c:
        c.status()
    before = hwm()
    with raw(daemon.socket) as s:
        s.settimeout(60)
        for body in (arrays_of(b"\x80", wire.MAX_REQUEST), WORST_ORDINARY["short strs"]()):
            s.sendall(struct.pack(">I", len(body)) + body)
            assert wire.recv_frame(s)["error"]["code"] == "invalid_request"
        s.sendall(struct.pack(">I", wire.MAX_FRAME))
        assert "request limit" in wire.recv_frame(s)["error"]["message"]
    growth = hwm() - before
    assert growth <= 32 * wire.MAX_REQUEST, f"lazyd's peak RSS grew by {growth >> 20} MiB"
    with daemon.client() as c:
        assert c.status().pid == pid


# -- one frame reader -----------------------------------------------------------------------------


def test_one_frame_reader() -> None:
    """Only wire.py reads frame headers: no other module of lazyd reads raw lengths off a stream."""
    root = Path(__file__).resolve().parents[2] / "lazyd"
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if re.search(r"readexactly|struct\.Struct\(\s*['\"]>I|unpack\(\s*['\"]>I", p.read_text()))
    assert users == ["api/wire.py"], users


# -- clients facing a hostile server --------------------------------------------------------------

DEEP = b"\x91" * 1000 + b"\xc0"  # 1000 nested one-item arrays: decodes (the limit is 1024), str() recurses


def _map(*pairs: tuple[bytes, bytes]) -> bytes:
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


def _s(text: str) -> bytes:
    return bytes([0xA0 | len(text)]) + text.encode()


HOSTILE_REPLIES = {  # request id 1; each a body the codec accepts
    "deep error": _map((_s("id"), b"\x01"), (_s("ok"), b"\xc2"), (_s("error"), DEEP)),
    "deep code": _map((_s("id"), b"\x01"), (_s("ok"), b"\xc2"),
                      (_s("error"), _map((_s("code"), DEEP), (_s("message"), _s("m"))))),
    "deep message": _map((_s("id"), b"\x01"), (_s("ok"), b"\xc2"),
                         (_s("error"), _map((_s("code"), _s("timeout")), (_s("message"), DEEP)))),
    "deep ok": _map((_s("id"), b"\x01"), (_s("ok"), DEEP), (_s("error"), DEEP)),
    "no error": _map((_s("id"), b"\x01")),
    "deep map error": _map((_s("id"), b"\x01"), (_s("ok"), b"\xc2"), (_s("error"), b"\x81\xa1k" * 1000 + b"\xc0")),
}


@contextmanager
def hostile_server(tmp_path: Path, body: bytes) -> Iterator[str]:
    """A Unix socket that answers every request frame with ``body`` as a frame."""
    path = str(tmp_path / "hostile.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                while True:
                    wire.recv_frame(conn, wire.REQUESTS)
                    conn.sendall(struct.pack(">I", len(body)) + body)
            except (EOFError, OSError, wire.ProtocolError):
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        listener.close()
        thread.join(10)
        Path(path).unlink()


@pytest.mark.parametrize("case", sorted(HOSTILE_REPLIES))
def test_clients_survive_hostile_error_replies(tmp_path: Path, case: str) -> None:
    body = HOSTILE_REPLIES[case]
    decoded = wire.decode_body(body)  # the codec accepts it ...
    if case.startswith("deep"):
        with pytest.raises(RecursionError):
            str(decoded)  # ... and a careless str() of it fails
    with hostile_server(tmp_path, body) as path, Client(path, timeout=10) as c:
        with pytest.raises(ApiError) as info:
            c.call("status")
    assert info.value.code == "internal" and "malformed" in info.value.message
    if case == "deep message":
        assert "message is a list of length 1" in info.value.message

    async def via_async() -> ApiError:
        async with AsyncClient(path, timeout=10) as ac:
            with pytest.raises(ApiError) as ainfo:
                await ac.call("status")
        return ainfo.value

    with hostile_server(tmp_path, body) as path:
        assert asyncio.run(via_async()).message == info.value.message


def test_long_error_message_is_cut(tmp_path: Path) -> None:
    text = "é" * 100_000
    body = wire.encode(wire.error_reply(1, "not_found", text))[4:]
    with hostile_server(tmp_path, body) as path, Client(path, timeout=10) as c:
        with pytest.raises(ApiError) as info:
            c.call("status")
    assert info.value.code == "not_found"
    cut = 100_000 - wire.MAX_ERROR_MESSAGE
    assert info.value.message == text[:wire.MAX_ERROR_MESSAGE] + f"... ({cut} more characters)"


def test_reply_error() -> None:
    assert wire.reply_error(wire.ok_reply(3, {"x": 1})) is None
    assert wire.reply_error(wire.error_reply(3, "timeout", "slow")) == ("timeout", "slow")
    code, message = wire.reply_error({"id": 3, "ok": "yes", "error": {"code": "x", "message": "y"}})
    assert code == "internal" and "ok is a str of length 3" in message
    code, message = wire.reply_error({"id": 3, "ok": False, "error": {"code": 5, "message": b"m"}})
    assert code == "internal" and "code is 5 and message is a bytes of length 1" in message
