"""``RegistryClient.stream_ranges``: multipart/byteranges answers parsed as they stream in.

Against the real Debian registry (through a logging front) and an odd/hostile registry
(``_OddRegistry``, an aiohttp app on loopback) that splits, reorders, pads, cuts and bloats
its multipart answers.  Every test checks the sink contract: each range's bytes arrive in
order, once, and are exactly the blob's.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from lazyd.registry import Reference, RegistryClient
from lazyd.registry.client import MULTIPART_PART_OVERHEAD
from lazyd.registry.errors import RangeNotSupportedError, RegistryError, ResponseTooLargeError
from tests.support.registry import Registry

from .helpers import BB, FrontLog, blob_file, config, proxy_app, run, serve

DIGEST = "sha256:" + "cd" * 32
SIZE = 64 * 1024
BLOB = bytes((i * 7 + i // 251) % 256 for i in range(SIZE))
BOUNDARY = "b0undary"


class Sink:
    """A ``RangeSink`` that checks each range's bytes come in order and once."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self.bufs = [bytearray() for _ in ranges]
        self.calls: list[int] = []

    async def __call__(self, i: int, pos: int, data: bytes) -> None:
        off, n = self.ranges[i]
        assert pos == off + len(self.bufs[i]), f"range {i}: bytes at {pos} after {len(self.bufs[i])} delivered"
        assert data and len(self.bufs[i]) + len(data) <= n, f"range {i}: more than {n} bytes"
        self.bufs[i] += data
        self.calls.append(i)

    def check(self, blob: bytes) -> None:
        assert [bytes(b) for b in self.bufs] == [blob[o:o + n] for o, n in self.ranges]


@dataclass
class _OddRegistry:
    """Serves ``BLOB`` under any digest; the repository name picks how multi-range GETs are answered.

    honest, reverse (parts last first), stray (an extra part nobody asked for), swap (the
    second range's part replaced by a stray one), split (the body written in two pieces cut at
    ``split_at``), cut (connection dropped inside the second part), short (the body ends
    cleanly inside the second part, no closing delimiter), shortall (single ranges end short
    too), full (200 with the whole blob), span (one 206 span), claim (a part claiming far more
    than asked and sending it), announce (Content-Length far over the allowance).
    """

    split_at: int = 0
    gets: list[str] = field(default_factory=list)  # Range headers of blob GETs

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self.v2)
        app.router.add_get("/v2/{repo}/blobs/{digest}", self.blob)
        return app

    async def v2(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        mode = request.match_info["repo"]
        rng = request.headers.get("Range", "")
        self.gets.append(rng)
        wanted = [tuple(int(x) for x in s.split("-")) for s in rng.removeprefix("bytes=").split(",")] if rng else []
        if mode == "full" or not wanted:
            return web.Response(body=BLOB)
        if len(wanted) == 1:
            first, last = wanted[0]
            body = BLOB[first:min(last, SIZE - 1) + 1]
            if mode == "shortall":
                resp = web.StreamResponse(status=206, headers={"Content-Range": f"bytes {first}-{last}/{SIZE}"})
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                await resp.write(body[: len(body) // 2])
                await resp.write_eof()
                return resp
            return web.Response(status=206, body=body, headers={"Content-Range": f"bytes {first}-{last}/{SIZE}"})
        if mode == "span":
            first, last = wanted[0][0], max(b for _, b in wanted)
            return web.Response(status=206, body=BLOB[first:last + 1],
                                headers={"Content-Range": f"bytes {first}-{last}/{SIZE}"})
        parts = list(wanted)
        if mode == "reverse":
            parts.reverse()
        if mode == "stray":
            parts.insert(1, (SIZE - 100, SIZE - 1))
        if mode == "swap":
            parts[1] = (SIZE - 100, SIZE - 1)
        if mode == "claim":
            parts[0] = (parts[0][0], SIZE - 1)
        body = b"".join(f"\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n"
                        f"Content-Range: bytes {a}-{b}/{SIZE}\r\n\r\n".encode() + BLOB[a:b + 1] for a, b in parts)
        body += f"\r\n--{BOUNDARY}--\r\n".encode()
        ctype = {"Content-Type": f"multipart/byteranges; boundary={BOUNDARY}"}
        if mode == "announce":
            return web.Response(status=206, body=body + b"x" * SIZE, headers=ctype)
        if mode in ("cut", "short", "shortall"):
            second = body.index(f"bytes {parts[1][0]}-".encode())
            keep = second + 60 + (parts[1][1] - parts[1][0]) // 2
            if mode == "cut":
                resp = web.StreamResponse(status=206, headers={**ctype, "Content-Length": str(len(body))})
                await resp.prepare(request)
                await resp.write(body[:keep])
                request.transport.close()  # type: ignore[union-attr]
                return resp
            body = body[:keep]
        resp = web.StreamResponse(status=206, headers=ctype)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if mode == "split":
            for piece in (body[: self.split_at], body[self.split_at:]):
                if piece:
                    await resp.write(piece)
                    await asyncio.sleep(0.002)  # let the first piece reach the client on its own
        else:
            await resp.write(body)
        await resp.write_eof()
        return resp


WANT = [(10, 40), (3000, 5000), (20000, 1), (SIZE - 300, 300)]


async def _stream(c: RegistryClient, port: int, mode: str, want: list[tuple[int, int]] = WANT) -> Sink:
    r = Reference.parse(f"127.0.0.1:{port}/{mode}:x")
    await c.ping(r)
    sink = Sink(want)
    await c.stream_ranges(r, DIGEST, want, sink)
    return sink


def test_real_registry_streams_each_part_once(tmp_path: Path, registry: Registry) -> None:
    """distribution answers one multi-range GET; the sink gets every range in order, and the
    first range before the answer has ended (the parser does not wait for the whole body)."""
    log = FrontLog()

    async def main() -> None:
        async with serve(proxy_app(registry.url, log)) as port:
            async with RegistryClient(config(tmp_path)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/{BB}:v2")
                img = await c.resolve(r)
                layer = max(img.layers, key=lambda d: d.size)
                data = blob_file(registry, layer.digest).read_bytes()
                want = [(len(data) - 5000, 5000), (0, 1), (7, 3000), (len(data) // 2, 300000), (100000, 17)]
                sink = Sink(want)
                before = log.count("GET", layer.digest)
                await c.stream_ranges(r, layer.digest, want, sink)
                sink.check(data)
                assert log.count("GET", layer.digest) - before == 1
                # parts come in blob order, each range's bytes in a row (none held back to the end)
                firsts = [sink.calls.index(i) for i in (1, 2, 4, 3, 0)]
                assert firsts == sorted(firsts)
                assert await c.fetch_ranges(r, layer.digest, want) == [data[o:o + n] for o, n in want]

    run(main())


def test_parts_split_at_every_byte_boundary(tmp_path: Path) -> None:
    """The body arriving in two pieces cut at every byte offset (inside delimiters, headers, CRLFs, data)."""
    odd = _OddRegistry()
    want = [(10, 3), (100, 2), (SIZE - 2, 2)]
    asked = ",".join(f"{o}-{o + n - 1}" for o, n in want)

    async def main() -> None:
        async with serve(odd.app()) as port:
            async with RegistryClient(config(tmp_path)) as c:
                length = sum(len(f"\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n"
                                 f"Content-Range: bytes {o}-{o + n - 1}/{SIZE}\r\n\r\n") + n for o, n in want)
                length += len(f"\r\n--{BOUNDARY}--\r\n")
                for k in range(length + 1):
                    odd.split_at = k
                    odd.gets.clear()
                    (await _stream(c, port, "split", want)).check(BLOB)
                    assert odd.gets == [f"bytes={asked}"], f"split at {k}: fell back to {odd.gets[1:]}"

    run(main())


@pytest.mark.parametrize("mode", ["honest", "reverse", "stray", "full", "span"])
def test_odd_but_usable_answers_need_one_request(tmp_path: Path, mode: str) -> None:
    """Parts in any order, a stray part, a 200 whole blob and one 206 span: one GET, exact bytes;
    a 200 is read no further than the last byte wanted."""
    odd = _OddRegistry()

    async def main() -> None:
        async with serve(odd.app()) as port:
            async with RegistryClient(config(tmp_path)) as c:
                want = WANT if mode != "full" else WANT[:3]
                (await _stream(c, port, mode, want)).check(BLOB)
                assert len([g for g in odd.gets if g]) == 1
                if mode == "full":
                    assert c.stats.bytes_received < 20001 + 4 * (1 << 20)  # bounded by the last wanted byte + a read

    run(main())


@pytest.mark.parametrize("mode", ["swap", "cut", "short"])
def test_missing_or_broken_parts_are_resumed_not_repeated(tmp_path: Path, mode: str) -> None:
    """A range the answer leaves out or breaks off in is completed with a single-range GET from
    its next missing byte; the sink never sees a byte twice."""
    odd = _OddRegistry()

    async def main() -> None:
        async with serve(odd.app()) as port:
            async with RegistryClient(config(tmp_path, retries=2)) as c:
                (await _stream(c, port, mode)).check(BLOB)
                o, n = WANT[1]
                singles = [tuple(int(x) for x in g.removeprefix("bytes=").split("-")) for g in odd.gets[1:] if g]
                assert all(len(s) == 2 for s in singles), odd.gets
                if mode == "swap":
                    assert singles == [(o, o + n - 1)]
                else:  # half of the second range was delivered: its retry asks for the rest only
                    (resumed,) = [(a, b) for a, b in singles if o <= a < o + n]
                    assert o < resumed[0] and resumed[1] == o + n - 1, (resumed, odd.gets)
                    assert {a for a, _ in singles} - {resumed[0]} <= {off for off, _ in WANT[2:]}

    run(main())


def test_truncated_everywhere_is_an_error_naming_the_missing_bytes(tmp_path: Path) -> None:
    """Multipart and single-range answers that all end short: a RegistryError naming the range and bytes missing."""
    odd = _OddRegistry()

    async def main() -> None:
        async with serve(odd.app()) as port:
            async with RegistryClient(config(tmp_path, retries=1)) as c:
                with pytest.raises(RegistryError) as ei:
                    await _stream(c, port, "shortall")
                msg = str(ei.value)
                assert isinstance(ei.value, RangeNotSupportedError), msg
                m = re.search(r"range (\d+)\+(\d+) of blob (\S+) .*the body ended at byte \d+ of the blob, "
                              r"bytes (\d+)-(\d+) missing", msg)
                assert m, msg
                off, n, digest, lo, hi = (int(x) if x.isdigit() else x for x in m.groups())
                assert digest == DIGEST and off <= lo <= hi == off + n - 1
                assert any(o <= off and off + n == o + k for o, k in WANT), msg

    run(main())


@pytest.mark.parametrize("mode", ["claim", "announce"])
def test_oversized_multipart_answers_are_refused(tmp_path: Path, mode: str) -> None:
    """A part claiming (and sending) far more than asked, or a Content-Length over the allowance:
    ResponseTooLargeError after reading no more than the allowance."""
    odd = _OddRegistry()
    limit = sum(n for _, n in WANT) + (len(WANT) + 1) * MULTIPART_PART_OVERHEAD

    async def main() -> None:
        async with serve(odd.app()) as port:
            async with RegistryClient(config(tmp_path)) as c:
                before = c.stats.bytes_received
                with pytest.raises(ResponseTooLargeError, match=f"{limit} are allowed") as ei:
                    await _stream(c, port, mode)
                assert f"127.0.0.1:{port}" in str(ei.value) and DIGEST in str(ei.value)
                assert c.stats.bytes_received - before <= limit + 1

    run(main())


def test_a_sink_error_stops_the_stream(tmp_path: Path) -> None:
    """An exception raised by the sink propagates (and is not mistaken for a broken body to retry)."""
    odd = _OddRegistry()

    class Refused(Exception):
        pass

    async def sink(i: int, pos: int, data: bytes) -> None:
        raise Refused(f"range {i}")

    async def main() -> None:
        async with serve(odd.app()) as port:
            async with RegistryClient(config(tmp_path, retries=2)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/honest:x")
                with pytest.raises(Refused, match="range 0"):
                    await c.stream_ranges(r, DIGEST, WANT, sink)
                assert len([g for g in odd.gets if g]) == 1

    run(main())
