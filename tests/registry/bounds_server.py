"""A hostile registry for the body-bound tests: an aiohttp app that answers blob GETs badly on purpose.

Manifest GETs of ``endless`` and ``liar`` misbehave the same way.  The blob is synthetic (a 65521-byte random pattern repeated to ``size`` bytes), so hundreds of
MiB can be served without holding them in memory.  The repository name picks the misbehaviour:

* ``ignore-range``   200 with the whole blob, whatever ``Range`` says;
* ``bloat-multipart`` a 206 multipart/byteranges answer whose parts carry far more bytes than asked;
* ``coalesce``       a multi-range request answered with one 206 part from the first to the last byte;
* ``honest``         correct single and multipart 206 answers;
* ``endless``        a 200 without Content-Length that never ends (chunked);
* ``liar``           a 200 whose Content-Length announces ``size`` * 1000 bytes.

Run as ``python -m tests.registry.bounds_server SIZE`` it prints its port and serves until killed.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys

from aiohttp import web

PATTERN_LEN = 65521
PATTERN = random.Random(1313).randbytes(PATTERN_LEN)
_DOUBLE = PATTERN * 2
_SEND = 256 * 1024
BOUNDARY = "lazydboundsboundary"


def blob_bytes(offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of the synthetic blob (of any size)."""
    out = bytearray()
    while len(out) < length:
        at = (offset + len(out)) % PATTERN_LEN
        out += _DOUBLE[at : at + min(PATTERN_LEN, length - len(out))]
    return bytes(out)


def blob_digest(size: int) -> str:
    """The sha256 digest of a ``size``-byte synthetic blob."""
    h = hashlib.sha256()
    for off in range(0, size, 1 << 20):
        h.update(blob_bytes(off, min(1 << 20, size - off)))
    return f"sha256:{h.hexdigest()}"


def _ranges(header: str, size: int) -> list[tuple[int, int]]:
    """(first, last) byte pairs of a ``bytes=a-b,c-d`` header (no suffix forms: the client sends none)."""
    out = []
    for spec in header.removeprefix("bytes=").split(","):
        first, _, last = spec.strip().partition("-")
        out.append((int(first), min(int(last), size - 1)))
    return out


async def _stream(resp: web.StreamResponse, offset: int, length: int) -> None:
    pos = offset
    while pos < offset + length:
        n = min(_SEND, offset + length - pos)
        await resp.write(blob_bytes(pos, n))
        pos += n


def make_app(size: int, sent: list[int] | None = None) -> web.Application:
    """The hostile registry serving a ``size``-byte blob under any digest; ``sent`` collects body bytes written."""

    async def v2(request: web.Request) -> web.Response:
        return web.json_response({})

    async def blob(request: web.Request) -> web.StreamResponse:
        mode = request.match_info["repo"]
        rng = request.headers.get("Range", "")
        wanted = _ranges(rng, size) if rng else []
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(size)})
        if mode == "endless":
            resp = web.StreamResponse(status=200)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            pos = 0
            while True:  # until the client hangs up
                await resp.write(blob_bytes(pos, _SEND))
                pos += _SEND
                if sent is not None:
                    sent.append(_SEND)
        if mode == "liar":
            resp = web.StreamResponse(status=200, headers={"Content-Length": str(size * 1000)})
            await resp.prepare(request)
            await _stream(resp, 0, size)
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.05)  # hold the promise open until the client hangs up
            return resp
        if mode == "ignore-range" or not wanted:
            resp = web.StreamResponse(status=200, headers={"Content-Length": str(size)})
            await resp.prepare(request)
            await _stream(resp, 0, size)
            if sent is not None:
                sent.append(size)
            return resp
        if len(wanted) == 1 or mode == "coalesce":
            first, last = wanted[0][0], max(b for _, b in wanted)
            resp = web.StreamResponse(status=206, headers={"Content-Length": str(last - first + 1),
                                                           "Content-Range": f"bytes {first}-{last}/{size}"})
            await resp.prepare(request)
            await _stream(resp, first, last - first + 1)
            return resp
        extra = 8 << 20 if mode == "bloat-multipart" else 0
        resp = web.StreamResponse(status=206, headers={"Content-Type": f"multipart/byteranges; boundary={BOUNDARY}"})
        await resp.prepare(request)
        for first, last in wanted:
            last = min(last + extra, size - 1)
            head = (f"\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n"
                    f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n")
            await resp.write(head.encode())
            await _stream(resp, first, last - first + 1)
        await resp.write(f"\r\n--{BOUNDARY}--\r\n".encode())
        return resp

    async def manifest(request: web.Request) -> web.StreamResponse:
        mode = request.match_info["repo"]
        if mode not in ("endless", "liar"):
            raise web.HTTPNotFound()
        return await blob(request)

    app = web.Application()
    app.router.add_get("/v2/", v2)
    app.router.add_get("/v2/{repo}/manifests/{ref}", manifest)
    app.router.add_route("*", "/v2/{repo}/blobs/{digest}", blob)
    return app


async def _main(size: int) -> None:
    runner = web.AppRunner(make_app(size), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1])))
