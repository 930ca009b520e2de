"""An HTTP/1.1 reverse proxy in front of a registry that injects faults into blob GETs.

``FaultProxy(upstream)`` listens on ``127.0.0.1:port`` and forwards every request to the
registry at ``upstream`` (``host:port``), streaming the answers back.  ``inject(Fault(...))``
makes it misbehave on blob GETs (``GET /v2/<name>/blobs/<digest>``, the only requests a
mounted layer's reads send), for a number of requests, a number of seconds, or until
``clear()``; manifests, HEADs and ``/v2/`` always pass.  The faults:

* ``reset``: the answer's headers and part of its body, then a TCP RST;
* ``status``: an error status (500, 503, 429 ...) with distribution's JSON error body and,
  optionally, ``Retry-After``;
* ``stall``: nothing for ``stall`` seconds, before the headers or half-way through the body,
  then the rest (if the client is still there);
* ``truncate``: headers promising the whole body, part of it, then a clean close (FIN);
* ``flip``: the whole answer, with one byte in the middle of the body inverted.

``go_down()`` is the registry gone: the listening socket is closed (connects get
ECONNREFUSED) and every open connection is reset; ``come_up()`` listens again on the same
port.  ``events()`` lists every request with its timing, the
status sent and the fault applied, which is what the tests measure retries and recovery from.

Neither ``tests/support/tcpproxy.py`` (bytes only, no notion of a response) nor
``tests/e2e/rangeproxy.py`` (buffers whole answers) can cut, stall or corrupt an answer
part-way, and neither can refuse connections on a port that stays the registry's address.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import aiohttp

BLOB_GET = re.compile(r"^/v2/.+/blobs/[a-z0-9]+:[a-f0-9]+$")
FAULT_KINDS = ("reset", "status", "stall", "truncate", "flip")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "proxy-connection", "content-length"}
_REASONS = {200: "OK", 206: "Partial Content", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
_ERROR_CODES = {429: "TOOMANYREQUESTS", 500: "UNKNOWN", 503: "UNAVAILABLE"}
_BODY_CHUNK = 64 * 1024


class FaultProxyError(Exception):
    """The proxy could not start, stop, or go down/up as asked."""


@dataclass(frozen=True)
class Fault:
    """What to do to blob GETs: the first ``times`` of them, those within ``seconds`` of
    ``inject``, or (both None) every one until ``clear``."""

    kind: str
    times: int | None = None
    seconds: float | None = None
    status: int = 503
    retry_after: int | None = None
    stall: float = 0.0
    mid_body: bool = False
    at: float = 0.5
    """Fraction of the body sent before a reset, truncation or mid-body stall."""

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (one of {', '.join(FAULT_KINDS)})")
        if self.times is not None and self.times < 1:
            raise ValueError(f"fault times must be at least 1, not {self.times}")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError(f"fault seconds must be positive, not {self.seconds}")
        if not 0.0 <= self.at < 1.0:
            raise ValueError(f"fault at must be in [0, 1), not {self.at}")
        if self.kind == "status" and not 400 <= self.status <= 599:
            raise ValueError(f"a status fault needs an error status, not {self.status}")
        if self.kind == "stall" and self.stall <= 0:
            raise ValueError("a stall fault needs stall > 0 seconds")


@dataclass
class Event:
    """One request as the proxy saw it, listed as soon as it arrives: ``status`` is what the
    client was sent (0: nothing yet, or the connection was cut before the headers); ``end``
    is None while it is being answered; ``fault`` is the kind applied, or None."""

    start: float
    method: str
    path: str
    range: str | None
    fault: str | None
    status: int = 0
    end: float | None = None

    @property
    def blob_get(self) -> bool:
        return self.method == "GET" and BLOB_GET.match(self.path) is not None


@dataclass
class _Active:
    fault: Fault
    since: float
    applied: int = 0


@dataclass
class _Head:
    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


class FaultProxy:
    """The proxy; use as a context manager (or ``start``/``stop``). Thread-safe controls."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = 0
        self._lock = threading.Lock()
        self._active: _Active | None = None
        self._events: list[Event] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FaultProxy:
        self._thread.start()
        self._run(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, coro: object, timeout: float = 15) -> object:
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise FaultProxyError(f"fault proxy for {self.upstream} did not answer within {timeout}s") from exc

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        await self._listen()

    async def _stop(self) -> None:
        self._stopping.set()  # wakes stalls up
        await self._close_listener()
        self._abort_all()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._session is not None:
            await self._session.close()

    async def _listen(self) -> None:
        try:
            self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)
        except OSError as exc:
            raise FaultProxyError(f"fault proxy cannot listen on 127.0.0.1:{self.port}: {exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _abort_all(self) -> None:
        for writer in list(self._conns):
            _reset(writer)
        self._conns.clear()

    # -- controls (from the test's thread) --------------------------------------------------

    def inject(self, fault: Fault) -> float:
        """Start misbehaving as ``fault`` says (replacing any fault); returns the monotonic time."""
        now = time.monotonic()
        with self._lock:
            self._active = _Active(fault, now)
        return now

    def clear(self) -> float:
        """Stop misbehaving; returns the monotonic time."""
        with self._lock:
            self._active = None
        return time.monotonic()

    def applied(self) -> int:
        """How many requests the current fault has been applied to."""
        with self._lock:
            return self._active.applied if self._active else 0

    def go_down(self) -> float:
        """Refuse connections (the listening socket is closed) and reset the open ones.

        Returns the monotonic time the registry went away."""
        async def down() -> float:
            await self._close_listener()
            self._abort_all()
            return time.monotonic()

        return self._run(down())  # type: ignore[return-value]

    def come_up(self) -> float:
        """Listen again on the same port; returns the monotonic time."""
        async def up() -> float:
            if self._server is None:
                await self._listen()
            return time.monotonic()

        return self._run(up())  # type: ignore[return-value]

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def blob_gets(self, since: float = 0.0, until: float = float("inf")) -> list[Event]:
        """Blob GETs that started in ``[since, until]``."""
        return [e for e in self.events() if e.blob_get and since <= e.start <= until]

    def _take_fault(self, head: _Head) -> Fault | None:
        """The fault to apply to this request (counting it), or None."""
        if head.method != "GET" or not BLOB_GET.match(head.target.split("?", 1)[0]):
            return None
        with self._lock:
            active = self._active
            if active is None:
                return None
            f = active.fault
            if f.seconds is not None and time.monotonic() - active.since > f.seconds:
                return None
            if f.times is not None and active.applied >= f.times:
                return None
            active.applied += 1
            return f

    def _record(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    # -- serving --------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # accepted just before going down
            _reset(writer)
            return
        self._conns.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            first = await reader.read(1)
            if first == b"\x16":  # a TLS handshake: answer as Go's server does, so lazyd's probe picks http
                writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                await writer.drain()
                return
            if not first:
                return
            while True:
                head = await _read_head(reader, first)
                first = b""
                if head is None:
                    return
                length = int(head.get("Content-Length") or 0)
                body = await reader.readexactly(length) if length else b""
                keep = await self._serve(head, body, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                aiohttp.ClientError):
            return
        finally:
            self._tasks.discard(task)
            self._conns.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _serve(self, head: _Head, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must not be used again."""
        fault = self._take_fault(head)
        event = Event(time.monotonic(), head.method, head.target.split("?", 1)[0], head.get("Range"),
                      fault.kind if fault else None)
        self._record(event)
        try:
            if fault is not None and fault.kind == "status":
                event.status = fault.status
                await _answer_error(writer, fault.status, fault.retry_after)
                return True
            if fault is not None and fault.kind == "stall" and not fault.mid_body:
                await self._pause(fault.stall)  # then answer, if the client is still there
            assert self._session is not None
            headers = [(k, v) for k, v in head.headers if k.lower() not in _HOP_BY_HOP]
            try:
                upstream = await self._session.request(head.method, f"http://{self.upstream}{head.target}",
                                                       headers=headers, data=body or None, allow_redirects=False,
                                                       skip_auto_headers=("Accept-Encoding", "User-Agent"))
            except (aiohttp.ClientError, OSError):
                event.status = 502
                await _answer_error(writer, 502, None)
                return True
            async with upstream:
                event.status = upstream.status
                return await self._relay(head, upstream, writer, fault)
        finally:
            event.end = time.monotonic()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the proxy is stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _relay(self, head: _Head, up: aiohttp.ClientResponse, writer: asyncio.StreamWriter,
                     fault: Fault | None) -> bool:
        """Send the upstream answer to the client, applying ``fault`` to its body."""
        length = up.content_length
        data: bytes | None = None
        if head.method != "HEAD" and length is None:
            data = await up.read()  # chunked upstream: send it with a length
            length = len(data)
        lines = [f"HTTP/1.1 {up.status} {up.reason or _REASONS.get(up.status, '')}"]
        lines += [f"{k}: {v}" for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        if head.method == "HEAD" or not length:
            return True
        cut = int(length * fault.at) if fault is not None else length
        flip_at = length // 2 if fault is not None and fault.kind == "flip" else -1
        sent = 0
        chunks = _chunks(data) if data is not None else up.content.iter_chunked(_BODY_CHUNK)
        async for chunk in chunks:
            if fault is not None and fault.kind in ("reset", "truncate", "stall") and sent + len(chunk) >= cut:
                writer.write(chunk[: cut - sent])
                await writer.drain()
                if fault.kind == "reset":
                    _reset(writer)
                    return False
                if fault.kind == "truncate":
                    writer.close()
                    return False
                await self._pause(fault.stall)  # mid-body stall, then the rest
                writer.write(chunk[cut - sent:])
                fault = None
                sent += len(chunk)
                await writer.drain()
                continue
            if sent <= flip_at < sent + len(chunk):
                b = bytearray(chunk)
                b[flip_at - sent] ^= 0xFF
                chunk = bytes(b)
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
        return (head.get("Connection") or "").lower() != "close"


async def _chunks(data: bytes):  # type: ignore[no-untyped-def]
    for i in range(0, len(data), _BODY_CHUNK):
        yield data[i : i + _BODY_CHUNK]


async def _read_head(reader: asyncio.StreamReader, first: bytes = b"") -> _Head | None:
    """The next request head on a connection (``first``: its bytes already read), or None at a clean end."""
    try:
        raw = first + await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if (first + exc.partial).strip():
            raise
        return None
    lines = raw.decode("latin-1").split("\r\n")
    m = re.match(r"^([A-Z]+) (\S+) HTTP/1\.[01]$", lines[0])
    if not m:
        raise ValueError(f"not an HTTP request line: {lines[0]!r}")
    head = _Head(m.group(1), m.group(2))
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            head.headers.append((k.strip(), v.strip()))
    if (head.get("Transfer-Encoding") or "").lower() == "chunked":
        raise ValueError("chunked request bodies are not supported by the fault proxy")
    return head


async def _answer_error(writer: asyncio.StreamWriter, status: int, retry_after: int | None) -> None:
    """An error answer as distribution words it (JSON ``errors``), optionally with Retry-After."""
    code = _ERROR_CODES.get(status, "UNKNOWN")
    body = json.dumps({"errors": [{"code": code, "message": f"fault proxy: injected HTTP {status}",
                                   "detail": None}]}).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    if retry_after is not None:
        lines.append(f"Retry-After: {retry_after}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
