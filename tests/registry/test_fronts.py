"""The client behind misbehaving HTTP fronts (small aiohttp servers) of a real registry."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web

from lazyd.registry import DigestMismatchError, Reference, RegistryClient, UnreachableError
from tests.support.registry import Registry, start_registry

from .helpers import (BB, FrontLog, blob_file, config, docker_auth, proxy_app, run, serve, write_docker_config,
                      write_hosts)

PASSWORD = "front-secret-pw"


def _blob_digest(request: web.Request) -> str | None:
    parts = request.path.split("/blobs/")
    return parts[1] if len(parts) == 2 and request.method in ("GET", "HEAD") and ":" in parts[1] else None


async def _cut_off(request: web.Request, status: int, headers: dict[str, str], sent: bytes) -> web.StreamResponse:
    """Answer with ``headers`` (promising more), send only ``sent``, then drop the connection."""
    resp = web.StreamResponse(status=status, headers=headers)
    await resp.prepare(request)
    await resp.write(sent)
    request.transport.close()  # type: ignore[union-attr]
    return resp


def test_redirect_to_storage_never_forwards_authorization(tmp_path: Path, registry: Registry,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Blob GETs answered 307 to another port: the storage host gets Range but no Authorization."""
    caplog.set_level(logging.DEBUG)
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "carol", PASSWORD], check=True, capture_output=True)
    # An authenticated registry whose storage is the anonymous fixture registry's disk.
    reg = start_registry(tmp_path, name="authreg", auth={"htpasswd": {"realm": "x", "path": str(htpasswd)}},
                         storage_root=registry.root)
    storage_log, front_log = FrontLog(), FrontLog()

    async def storage(request: web.Request) -> web.StreamResponse:
        storage_log.requests.append((request.method, request.path_qs, dict(request.headers)))
        path = blob_file(registry, request.match_info["digest"])
        return web.FileResponse(path)

    async def main() -> None:
        storage_app = web.Application()
        storage_app.router.add_get("/blob/{digest}", storage)
        async with serve(storage_app) as sport:
            async def hook(request: web.Request, headers: dict[str, str]) -> web.StreamResponse | None:
                digest = _blob_digest(request)
                if digest and request.method == "GET":
                    if "Authorization" not in request.headers:
                        return None  # let the registry send its 401 challenge
                    raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{sport}/blob/{digest}?sig=abc")
                return None

            async with serve(proxy_app(reg.url, front_log, hook)) as fport:
                write_docker_config(tmp_path / "docker-config.json",
                                    {"auths": {f"127.0.0.1:{fport}": {"auth": docker_auth("carol", PASSWORD)}}})
                async with RegistryClient(config(tmp_path)) as c:
                    r = Reference.parse(f"127.0.0.1:{fport}/{BB}:v2")
                    img = await c.resolve(r)
                    layer = max(img.layers, key=lambda d: d.size)
                    data = blob_file(registry, layer.digest).read_bytes()
                    want = [(10, 100), (len(data) - 50, 50), (4096, 8192)]
                    assert await c.fetch_ranges(r, layer.digest, want) == [data[o:o + n] for o, n in want]
                    await c.fetch_blob(r, layer.digest, tmp_path / "blob")
                    assert (tmp_path / "blob").read_bytes() == data
    try:
        run(main())
    finally:
        reg.stop()
    assert any(h.get("Authorization", "").startswith("Basic ") for _, _, h in front_log.requests)
    assert storage_log.requests, "the client did not follow the redirect"
    assert all("Authorization" not in h for _, _, h in storage_log.requests)
    assert any("Range" in h for _, _, h in storage_log.requests)
    assert PASSWORD not in caplog.text and docker_auth("carol", PASSWORD) not in caplog.text


def test_front_ignoring_range_still_gives_correct_bytes_efficiently(tmp_path: Path, registry: Registry) -> None:
    log = FrontLog()

    async def strip_range(request: web.Request, headers: dict[str, str]) -> None:
        headers.pop("Range", None)
        return None

    async def main() -> None:
        async with serve(proxy_app(registry.url, log, strip_range)) as port:
            write_hosts(tmp_path, f"127.0.0.1:{port}", '[header]\n  x-lazyd-test = "from-hosts-toml"\n')
            async with RegistryClient(config(tmp_path)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/{BB}:v2")
                img = await c.resolve(r)
                layer = max(img.layers, key=lambda d: d.size)
                data = blob_file(registry, layer.digest).read_bytes()
                assert len(data) > 4 << 20
                before = c.stats.bytes_received
                want = [(0, 100), (200, 300), (1 << 20, 10)]
                assert await c.fetch_ranges(r, layer.digest, want) == [data[o:o + n] for o, n in want]
                # one request, read only up to the last byte needed, not the whole blob
                assert c.stats.bytes_received - before <= (1 << 20) + 10
                assert log.count("GET", layer.digest) == 1
                (tail,) = await c.fetch_ranges(r, layer.digest, [(len(data) - 7, 7)])
                assert tail == data[-7:]
    run(main())
    assert all(h.get("x-lazyd-test") == "from-hosts-toml" for _, _, h in log.requests)


def test_front_rejecting_multi_range_falls_back_to_single_ranges(tmp_path: Path, registry: Registry) -> None:
    log = FrontLog()

    async def no_multi(request: web.Request, headers: dict[str, str]) -> web.StreamResponse | None:
        if "," in request.headers.get("Range", ""):
            return web.Response(status=416, text="multi-range not supported")
        return None

    async def main() -> None:
        async with serve(proxy_app(registry.url, log, no_multi)) as port:
            async with RegistryClient(config(tmp_path)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/{BB}:v2")
                img = await c.resolve(r)
                layer = max(img.layers, key=lambda d: d.size)
                data = blob_file(registry, layer.digest).read_bytes()
                want = [(0, 10), (500, 10), (9000, 1000)]
                assert await c.fetch_ranges(r, layer.digest, want) == [data[o:o + n] for o, n in want]
                assert log.count("GET", layer.digest) == 4  # 1 refused multi-range + 3 single
                assert await c.fetch_ranges(r, layer.digest, want[:2]) == [data[:10], data[500:510]]
                assert log.count("GET", layer.digest) == 6  # remembered: singles straight away
    run(main())


def test_dropped_connections_are_retried(tmp_path: Path, registry: Registry) -> None:
    """The first GETs of a blob are cut off mid-body or answered 503; the client retries and gets it right."""
    log = FrontLog()
    failures = {"drop": 2, "503": 1}

    async def flaky(request: web.Request, headers: dict[str, str]) -> web.StreamResponse | None:
        digest = _blob_digest(request)
        if not digest or request.method != "GET":
            return None
        if failures["503"]:
            failures["503"] -= 1
            return web.Response(status=503)
        if failures["drop"]:
            failures["drop"] -= 1
            return await _cut_off(request, 200, {"Content-Length": str(10 << 20)}, b"x" * 1000)
        return None

    async def main() -> None:
        async with serve(proxy_app(registry.url, log, flaky)) as port:
            async with RegistryClient(config(tmp_path, retries=3)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/{BB}:v1")
                img = await c.resolve(r)
                digest = img.layers[0].digest
                data = blob_file(registry, digest).read_bytes()
                assert await c.fetch_ranges(r, digest, [(100, 1000)]) == [data[100:1100]]
                failures["drop"] = 1
                await c.fetch_blob(r, digest, tmp_path / "blob")
                assert (tmp_path / "blob").read_bytes() == data
    run(main())


def test_lying_front_is_caught_by_digests(tmp_path: Path, registry: Registry) -> None:
    """A front that alters manifests and blobs: every lie is a DigestMismatchError, never wrong bytes."""
    log = FrontLog()

    def tamper(request: web.Request, body: bytes) -> bytes:
        if "/manifests/" in request.path and request.method == "GET":
            doc = json.loads(body)
            doc.setdefault("annotations", {})["evil"] = "yes"
            return json.dumps(doc).encode()
        if _blob_digest(request) and body:
            return body[:-1] + bytes([body[-1] ^ 0xFF])
        return body

    async def main() -> None:
        async with RegistryClient(config(tmp_path)) as honest:
            good = await honest.resolve(Reference.parse(f"{registry.host}/{BB}:v1"))
        async with serve(proxy_app(registry.url, log, edit_body=tamper)) as port:
            async with RegistryClient(config(tmp_path)) as c:
                with pytest.raises(DigestMismatchError, match="manifest v1"):
                    await c.resolve(Reference.parse(f"127.0.0.1:{port}/{BB}:v1"))  # Docker-Content-Digest differs
                with pytest.raises(DigestMismatchError, match=good.manifest_digest):
                    await c.resolve(Reference.parse(f"127.0.0.1:{port}/{BB}@{good.manifest_digest}"))
                r = Reference.parse(f"127.0.0.1:{port}/{BB}:v1")
                with pytest.raises(DigestMismatchError, match=good.layers[0].digest):
                    await c.fetch_blob(r, good.layers[0].digest, tmp_path / "blob")
                assert not (tmp_path / "blob").exists()
    run(main())


def test_hanging_front_times_out_with_retries(tmp_path: Path, registry: Registry) -> None:
    log = FrontLog()

    async def hang(request: web.Request, headers: dict[str, str]) -> None:
        if "/manifests/" in request.path:
            await asyncio.sleep(2)
        return None

    async def main() -> None:
        async with serve(proxy_app(registry.url, log, hang)) as port:
            async with RegistryClient(config(tmp_path, timeout=0.5, retries=2, backoff=0.05)) as c:
                t0 = time.monotonic()
                with pytest.raises(UnreachableError, match="unreachable for manifest v1"):
                    await c.resolve(Reference.parse(f"127.0.0.1:{port}/{BB}:v1"))
                assert time.monotonic() - t0 < 5
                assert log.count("GET", "/manifests/") == 3  # first try + 2 retries (GET is idempotent)
    run(main())


def test_stream_range_resumes_a_cut_body_and_reads_past_an_ignored_range(tmp_path: Path, registry: Registry) -> None:
    """``stream_range`` hands over every byte once, in order: a 206 body cut off half-way is
    resumed from the next byte, and a front that ignores Range is read from the start."""
    log = FrontLog()
    mode = {"cut": 2, "strip": False}

    async def front(request: web.Request, headers: dict[str, str]) -> web.StreamResponse | None:
        digest = _blob_digest(request)
        if not digest or request.method != "GET":
            return None
        if mode["strip"]:
            headers.pop("Range", None)
            return None
        if mode["cut"] and "Range" in request.headers:
            mode["cut"] -= 1
            first, last = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
            body = blob_file(registry, digest).read_bytes()[first:last + 1]
            return await _cut_off(request, 206, {"Content-Length": str(len(body)),
                                                 "Content-Range": f"bytes {first}-{last}/*"}, body[: len(body) // 2])
        return None

    async def main() -> None:
        async with serve(proxy_app(registry.url, log, front)) as port:
            async with RegistryClient(config(tmp_path, retries=3)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/{BB}:v2")
                img = await c.resolve(r)
                layer = max(img.layers, key=lambda d: d.size)
                data = blob_file(registry, layer.digest).read_bytes()
                got: list[tuple[int, bytes]] = []

                async def sink(pos: int, chunk: bytes) -> None:
                    got.append((pos, chunk))

                off, n = 1000, 3 << 20
                await c.stream_range(r, layer.digest, off, n, sink)
                assert b"".join(chunk for _, chunk in got) == data[off:off + n]
                assert all(pos == off + sum(len(ch) for _, ch in got[:i]) for i, (pos, _) in enumerate(got))
                ranges = [h["Range"] for m, p, h in log.requests if m == "GET" and layer.digest in p]
                # each retry asks for the rest only: half of what is left after every cut
                assert ranges == [f"bytes={off}-{off + n - 1}", f"bytes={off + n // 2}-{off + n - 1}",
                                  f"bytes={off + n // 2 + n // 4}-{off + n - 1}"]
                mode["strip"] = True
                got.clear()
                await c.stream_range(r, layer.digest, 5000, 777, sink)
                assert b"".join(chunk for _, chunk in got) == data[5000:5777] and got[0][0] == 5000
    run(main())
