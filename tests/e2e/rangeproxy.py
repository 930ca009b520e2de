"""An HTTP reverse proxy in front of a registry that records every blob GET and its Range.

Used to check from the outside which byte ranges of which layer were fetched, and how often.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass

import aiohttp
from aiohttp import web

_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
               "proxy-authorization", "proxy-authenticate", "content-length"}


@dataclass(frozen=True)
class BlobFetch:
    """One GET of a blob: ``ranges`` are inclusive (start, end) pairs; None means the whole blob."""

    digest: str
    ranges: tuple[tuple[int, int], ...] | None
    status: int


def parse_range(header: str, size: int) -> tuple[tuple[int, int], ...]:
    """``bytes=0-9,20-`` -> ((0, 9), (20, size - 1)); suffix ranges are resolved against ``size``."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes":
        raise ValueError(f"unexpected range unit in {header!r}")
    out = []
    for part in spec.split(","):
        start, _, end = part.strip().partition("-")
        if not start:
            out.append((size - int(end), size - 1))
        else:
            out.append((int(start), int(end) if end else size - 1))
    return tuple(out)


class RangeLogProxy:
    """Forward ``http://127.0.0.1:PORT`` to ``upstream`` (``host:port``); ``fetches`` lists blob GETs."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fetches: list[BlobFetch] = []
        self.sizes: dict[str, int] = {}
        self.port = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "RangeLogProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def blob_fetches(self, digest: str) -> list[BlobFetch]:
        with self._lock:
            return [f for f in self.fetches if f.digest == digest]

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 (aiohttp has no public accessor)

    async def _stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self._session:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        url = f"http://{self.upstream}{request.rel_url}"
        async with self._session.request(request.method, url, headers=headers, data=body or None,
                                         allow_redirects=False) as up:
            data = await up.read()
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP}
            status = up.status
        m = _BLOB_PATH.match(request.path)
        if m and request.method in ("GET", "HEAD"):
            digest = m.group("digest")
            if request.method == "HEAD" and status == 200 and "Content-Length" in up.headers:
                with self._lock:
                    self.sizes[digest] = int(up.headers["Content-Length"])
            elif request.method == "GET":
                size = self.sizes.get(digest, 0)
                cr = up.headers.get("Content-Range", "")
                if "/" in cr and cr.rsplit("/", 1)[1].isdigit():
                    size = int(cr.rsplit("/", 1)[1])
                rng = request.headers.get("Range")
                ranges = parse_range(rng, size) if rng and status == 206 else None
                with self._lock:
                    self.fetches.append(BlobFetch(digest, ranges, status))
        if request.method == "HEAD":
            if "Content-Length" in up.headers:
                out_headers["Content-Length"] = up.headers["Content-Length"]
            return web.Response(status=status, headers=out_headers)
        return web.Response(body=data, status=status, headers=out_headers)
