"""Fuzz a live ``lazyd serve``: hostile frames on its main socket and on its worker's control
socket.  Every complete frame gets exactly one well-formed reply (an oversize length prefix
one error, then the connection ends), no reply is an "internal" error (a bug), and the daemon
and its worker still answer ``status`` afterwards.

Requests that would be valid are defused first (``defuse``): no shutdown, and mount, pull and
resolve point at a registry port and paths that do not exist, so every case is quick and the
machine is never touched.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from lazyd.api import messages, wire
from lazyd.api.client import Client
from lazyd.api.messages import ERROR_CODES, INTERNAL, ApiError
from tests.fuzz.conftest import FUZZ, CaseCounter
from tests.fuzz.strategies import msgpack_values
from tests.fuzz.test_messages import VALID_ARGS
from tests.support.lazyd import Lazyd, start_lazyd

REPLY_TIMEOUT = 10.0
SAFE_REF = "127.0.0.1:9/fuzz/nothing:here"  # the discard port: connection refused at once


@dataclass
class Live:
    daemon: Lazyd
    base: Path

    def worker_socket(self) -> str:
        info = json.loads(next((self.daemon.root / "workers").glob("*/worker.json")).read_text())
        return str(info["control_socket"])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("fuzz-live")
    config = base / "config.toml"
    config.write_text(f"workers = 1\nfetch_timeout = 5.0\n[registry]\nhosts_dir = \"{base / 'certs.d'}\"\n"
                      "retries = 0\n")
    daemon = start_lazyd(base / "root", base / "run" / "lazyd.sock", base / "lazyd.log", config=config,
                         args=("--log-level", "info"), workers=1)
    try:
        yield Live(daemon, base)
    finally:
        daemon.close(unmount=base)


def defuse(op: Any, args: Any, base: Path) -> tuple[Any, Any]:
    """The request with anything that would act on the machine or the network replaced."""
    if op in ("shutdown", "worker.shutdown"):
        return ("status" if op == "shutdown" else "worker.status"), args
    spec = messages.OPS.get(op) if isinstance(op, str) else None
    spec = spec or (messages.WORKER_OPS.get(op) if isinstance(op, str) else None)
    if spec is None or not isinstance(args, dict):
        return op, args
    try:
        spec[0].from_args(args)
    except ApiError:
        return op, args  # refused before any handler runs
    nowhere = str(base / "nowhere")
    safe: dict[str, Any] = {
        "mount": {"mountpoint": nowhere, "ref": SAFE_REF},
        "resolve": {"ref": SAFE_REF},
        "pull": {"ref": SAFE_REF, "address": nowhere + ".sock", "hosts_dir": nowhere},
        "worker.mount": {"mountpoint": nowhere, "toc_path": nowhere, "inodes_path": nowhere},
    }.get(op, {})
    return op, {**args, **{k: v for k, v in safe.items() if k in args}}


@st.composite
def requests(draw: st.DrawFn, ops: list[str]) -> tuple[Any, Any, Any]:
    op = draw(st.one_of(st.sampled_from(ops), msgpack_values))
    cls = (messages.OPS.get(op) or messages.WORKER_OPS.get(op) or (None,))[0] if isinstance(op, str) else None
    if cls is not None and cls in VALID_ARGS and draw(st.booleans()):
        args = dict(VALID_ARGS[cls])
        for _ in range(draw(st.integers(0, 2))):
            args[draw(st.sampled_from(sorted(args) or ["x"]))] = draw(msgpack_values)
    else:
        args = draw(msgpack_values)
    return draw(st.one_of(st.integers(0, 2**32), msgpack_values)), op, args


def pieces(ops: list[str]) -> st.SearchStrategy[list[Any]]:
    """Stream pieces: raw bytes, framed garbage, framed msgpack values, requests (framed later,
    after defuse), and a last oversize length prefix."""
    piece = st.one_of(
        st.binary(max_size=48).map(lambda b: ("raw", b)),
        st.binary(max_size=48).map(lambda b: ("raw", struct.pack(">I", len(b)) + b)),
        msgpack_values.map(lambda v: ("raw", wire.encode({"v": v}) if isinstance(v, dict) else
                                      struct.pack(">I", len(p := msgpack.packb(v))) + p)),
        requests(ops).map(lambda r: ("request", r)),
        requests(ops).map(lambda r: ("request", r)),
    )
    return st.tuples(st.lists(piece, min_size=1, max_size=6),
                     st.sampled_from([b"", b"", b"", struct.pack(">I", wire.MAX_FRAME + 1),
                                      struct.pack(">I", wire.MAX_BULK_REQUEST + 1), b"\x00\x00"])
                     ).map(lambda t: [*t[0], ("raw", t[1])])


def assemble(parts: list[Any], base: Path) -> bytes:
    out = []
    for kind, value in parts:
        if kind == "raw":
            out.append(value)
        else:
            rid, op, args = value
            op, args = defuse(op, args, base)
            out.append(wire.encode({"id": rid, "op": op, "args": args}))
    return b"".join(out)


@dataclass
class Frame:
    start: int
    end: int
    reply_id: Any  # the id the reply must carry
    ends_connection: bool


def frames_of(stream: bytes, bad_frame_ends: bool, bool_ids: bool, policy: wire.Policy) -> list[Frame]:
    """The frames a server reading with ``policy`` reads from ``stream`` up to the first one that
    ends the connection (an oversize length prefix, or for the worker an undecodable frame).  Each
    is owed one reply; its id is None when the frame has no usable id.  Bytes after the last
    complete frame are read as the start of one more and get no reply."""
    frames: list[Frame] = []
    pos = 0
    while len(stream) - pos >= 4:
        (length,) = struct.unpack_from(">I", stream, pos)
        if length > policy.max_frame:
            frames.append(Frame(pos, pos + 4, None, True))
            break
        if len(stream) - pos - 4 < length:
            break
        end = pos + 4 + length
        try:
            message = wire.decode_body(stream[pos + 4 : end], policy)
        except wire.ProtocolError:
            frames.append(Frame(pos, end, None, bad_frame_ends))
            if bad_frame_ends:
                break
        else:
            rid = message.get("id")
            usable = isinstance(rid, int) and (bool_ids or not isinstance(rid, bool))
            frames.append(Frame(pos, end, rid if usable else None, False))
        pos = end
    return frames


def exchange(path: str, stream: bytes, bad_frame_ends: bool, bool_ids: bool, policy: wire.Policy) -> None:
    """Send ``stream`` and check every reply it is owed, in any order; after a frame that ends the
    connection, the replies of the requests still running come too, then the end of stream.
    (Nothing after that frame is sent: a Unix socket closed with unread data makes the peer's
    next read fail with ECONNRESET, replies or not.)"""
    frames = frames_of(stream, bad_frame_ends, bool_ids, policy)
    ends = bool(frames) and frames[-1].ends_connection
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(REPLY_TIMEOUT)  # a hung server fails the case with TimeoutError
        s.connect(path)
        s.sendall(stream[: frames[-1].end] if ends else stream)
        check_replies([wire.recv_frame(s) for _ in frames], [f.reply_id for f in frames])
        if ends:
            with pytest.raises(EOFError):
                wire.recv_frame(s)


def check_replies(replies: list[dict[str, Any]], want_ids: list[Any]) -> None:
    for reply in replies:
        assert reply.get("ok") in (True, False), reply
        if reply["ok"]:
            assert "result" in reply
            event("ok")
        else:
            error = reply["error"]
            assert error["code"] in ERROR_CODES and isinstance(error["message"], str), reply
            assert error["code"] != INTERNAL, f"internal error (a bug): {error['message']}"
            event(f"error {error['code']}")
    assert sorted(map(repr, (r.get("id") for r in replies))) == sorted(map(repr, want_ids))


@FUZZ
@given(parts=pieces(sorted(messages.OPS)))
def test_main_socket(cases: CaseCounter, live: Live, parts: list[Any]) -> None:
    cases.hit()
    exchange(str(live.daemon.socket), assemble(parts, live.base), bad_frame_ends=False, bool_ids=False,
             policy=wire.REQUESTS)
    with Client(str(live.daemon.socket), timeout=REPLY_TIMEOUT, connect_timeout=5) as c:
        status = c.status()
    assert status.pid == live.daemon.proc.pid and [w.state for w in status.workers] == ["ready"]


@FUZZ
@given(parts=pieces(sorted(messages.WORKER_OPS)))
def test_worker_control_socket(cases: CaseCounter, live: Live, parts: list[Any]) -> None:
    cases.hit()
    path = live.worker_socket()
    # The worker's control server (lazyd/fuse/worker.py) reads requests with the default policy.
    exchange(path, assemble(parts, live.base), bad_frame_ends=True, bool_ids=True, policy=wire.REPLIES)
    with Client(path, timeout=REPLY_TIMEOUT, connect_timeout=5) as c:
        status = c.request("worker.status")
    assert status.mounts == [] and status.pid > 0
    with Client(str(live.daemon.socket), timeout=REPLY_TIMEOUT, connect_timeout=5) as c:
        assert [w.state for w in c.status().workers] == ["ready"]


@pytest.mark.parametrize("ending", ["oversize length prefix", "end of stream"])
def test_replies_before_the_connection_ends_are_sent(tmp_path: Path, ending: str) -> None:
    from lazyd.api.server import Server

    async def slow(_args: messages.Empty) -> None:
        await asyncio.sleep(0.3)

    async def main() -> list[Any]:
        path = tmp_path / "s.sock"
        server = Server(path, {"slow": (messages.Empty, slow)})
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(wire.encode({"id": 1, "op": "slow", "args": {}}))
            if ending == "end of stream":
                writer.write_eof()
            else:
                writer.write(struct.pack(">I", wire.MAX_FRAME + 1))
            await writer.drain()
            ids = []
            while (reply := await asyncio.wait_for(wire.read_frame(reader), 5)) is not None:
                ids.append(reply["id"])
            writer.close()
            return ids
        finally:
            await server.close()

    ids = asyncio.run(main())
    assert 1 in ids, f"replies {ids}: the slow request's reply was dropped"
