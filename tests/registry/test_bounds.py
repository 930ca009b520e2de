"""Bounds against hostile registries: body sizes, config validation and the token cache.

The hostile registry is tests/registry/bounds_server.py (an aiohttp app that misbehaves on
purpose, served on loopback); the multipart allowance is also checked against the real
Debian registry.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lazyd.config import DaemonConfig, load_config
from lazyd.configfile import ConfigError, load_dataclass
from lazyd.registry import Reference, RegistryClient, RegistryConfig
from lazyd.registry.auth import MAX_TOKEN_RESPONSE, MAX_TOKENS, Authorizer, scope_for
from lazyd.registry.client import MULTIPART_PART_OVERHEAD
from lazyd.registry.credentials import CredentialStore
from lazyd.registry.errors import ResponseTooLargeError
from tests.support.lazyd import stop_workers, unmount_all_below
from tests.support.registry import Registry

from .bounds_server import blob_bytes, blob_digest, make_app
from .helpers import BB, FrontLog, blob_file, config, proxy_app, run, serve, ticker

DIGEST = "sha256:" + "ab" * 32
MiB = 1 << 20


async def _peak(coro: Awaitable[Any]) -> tuple[Any, int]:
    """``coro``'s result and the peak bytes traced (tracemalloc) while it ran."""
    tracemalloc.start()
    try:
        result = await coro
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- answer bodies ---------------------------------------------------------------------


def test_range_from_server_ignoring_range_is_streamed_not_buffered(tmp_path: Path) -> None:
    """A 200 (whole blob) answer to a range GET: the bytes before the offset are discarded as they
    arrive and the read stops after the range, so memory is O(length), not O(offset + length)."""
    off, n = 64 * MiB, MiB
    size = off + 32 * MiB  # more than loopback socket buffers hold
    sent: list[int] = []

    async def main() -> None:
        async with serve(make_app(size, sent)) as port:
            async with RegistryClient(config(tmp_path)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/ignore-range:x")
                await c.ping(r)
                got, peak = await _peak(c.fetch_ranges(r, DIGEST, [(off, n)]))
                assert got == [blob_bytes(off, n)]
                assert peak < 8 * MiB, f"peak {peak} bytes for a {n}-byte range at {off}"
                assert c.stats.bytes_received <= off + n + MiB  # stopped after the range
                got, peak = await _peak(c.fetch_ranges(r, DIGEST, [(off, n), (1000, 10), (off + 3 * MiB, 5)]))
                assert got == [blob_bytes(off, n), blob_bytes(1000, 10), blob_bytes(off + 3 * MiB, 5)]
                assert peak < 8 * MiB, f"peak {peak} bytes for three ranges read past a skipped {off} bytes"
        assert not sent, "the server wrote the whole blob: the client did not hang up after the range"

    run(main())


def test_one_span_for_several_ranges_is_streamed(tmp_path: Path) -> None:
    """A multi-range GET answered with one 206 span from the first to the last byte: the gap is skipped."""
    far = 48 * MiB

    async def main() -> None:
        async with serve(make_app(far + 4 * MiB)) as port:
            async with RegistryClient(config(tmp_path)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/coalesce:x")
                await c.ping(r)
                want = [(10, 100), (far, MiB)]
                got, peak = await _peak(c.fetch_ranges(r, DIGEST, want))
                assert got == [blob_bytes(o, k) for o, k in want]
                assert peak < 8 * MiB, f"peak {peak} bytes for a span of {far} bytes"

    run(main())


def test_bloated_multipart_answer_is_a_clear_error(tmp_path: Path) -> None:
    """Multipart parts carrying 8 MiB more than asked: ResponseTooLargeError naming host, blob and
    sizes, after reading no more than the allowance; honest multipart answers still work."""
    want = [(0, 100), (5000, 100), (9000, 50)]
    limit = 250 + 4 * MULTIPART_PART_OVERHEAD

    async def main() -> None:
        async with serve(make_app(32 * MiB)) as port:
            async with RegistryClient(config(tmp_path)) as c:
                honest = Reference.parse(f"127.0.0.1:{port}/honest:x")
                await c.ping(honest)
                assert await c.fetch_ranges(honest, DIGEST, want) == [blob_bytes(o, k) for o, k in want]
                before = c.stats.bytes_received
                bloat = Reference.parse(f"127.0.0.1:{port}/bloat-multipart:x")
                with pytest.raises(ResponseTooLargeError) as ei:
                    await c.fetch_ranges(bloat, DIGEST, want)
                msg = str(ei.value)
                assert f"127.0.0.1:{port}" in msg and DIGEST in msg and "bloat-multipart" in msg
                assert f"more than {limit} bytes" in msg and "250 bytes asked for" in msg
                assert c.stats.bytes_received - before <= limit + 1

    run(main())


def test_real_registry_multipart_fits_the_allowance(tmp_path: Path, registry: Registry) -> None:
    """distribution's multipart answers (64 ranges in one GET) pass the per-part allowance."""
    log = FrontLog()

    async def main() -> None:
        async with serve(proxy_app(registry.url, log)) as port:
            async with RegistryClient(config(tmp_path)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/{BB}:v2")
                img = await c.resolve(r)
                layer = max(img.layers, key=lambda d: d.size)
                data = blob_file(registry, layer.digest).read_bytes()
                want = [(i * 4001, 1 + i % 7) for i in range(64)]
                assert await c.fetch_ranges(r, layer.digest, want) == [data[o:o + k] for o, k in want]
                assert log.count("GET", layer.digest) == 1

    run(main())


def test_endless_and_lying_answers_to_whole_reads(tmp_path: Path) -> None:
    """Manifests, small blobs and ``fetch_blob(size=...)`` stop at their bound: an endless body fails
    after the bound, an announced oversize body fails unread, and no partial file is left."""
    sent: list[int] = []

    async def main() -> None:
        async with serve(make_app(2 * MiB, sent)) as port:
            async with RegistryClient(config(tmp_path)) as c:
                endless = Reference.parse(f"127.0.0.1:{port}/endless:x")
                liar = Reference.parse(f"127.0.0.1:{port}/liar:x")
                await c.ping(endless)
                with pytest.raises(ResponseTooLargeError, match=rf"127.0.0.1:{port} answered manifest x of "
                                                                rf".*endless with more than 4194304 bytes"):
                    await c.get_manifest(endless)
                with pytest.raises(ResponseTooLargeError, match=r"with 2097152000 bytes \(Content-Length\)"):
                    await asyncio.wait_for(c.get_manifest(liar), 5)
                before = c.stats.bytes_received
                with pytest.raises(ResponseTooLargeError, match=rf"blob {DIGEST} of .*endless with more than 1048576"):
                    await c.fetch_bytes(endless, DIGEST, max_size=MiB)
                assert c.stats.bytes_received - before <= MiB + 1
                dst = tmp_path / "blob"
                before = c.stats.bytes_received
                with pytest.raises(ResponseTooLargeError, match=r"more than 3145728 bytes.*descriptor's size"):
                    await c.fetch_blob(endless, DIGEST, dst, size=3 * MiB)
                assert c.stats.bytes_received - before <= 4 * MiB
                with pytest.raises(ResponseTooLargeError, match=r"2097152000 bytes \(Content-Length\).*descriptor"):
                    await asyncio.wait_for(c.fetch_blob(liar, DIGEST, dst, size=2 * MiB), 5)
                assert list(tmp_path.glob(".blob.part-*")) == [] and not dst.exists()

    run(main())


def test_fetch_blob_writes_off_the_event_loop(tmp_path: Path) -> None:
    """The download's file is a FIFO whose reader starts late and reads slowly: opening and writing
    it block, but only a worker thread; the event loop keeps ticking and the bytes arrive intact."""
    size = 9 * MiB + 123  # three write batches
    digest = blob_digest(size)
    dst = tmp_path / "blob"
    fifo = tmp_path / f".blob.part-{os.getpid()}"  # fetch_blob's temporary name
    os.mkfifo(fifo)
    keep = tmp_path / "fifo"  # a second name, to release a reader the client never connected to
    os.link(fifo, keep)
    received = bytearray()

    def reader() -> None:
        time.sleep(1.0)
        with open(fifo, "rb") as f:
            while chunk := f.read(MiB):
                received.extend(chunk)
                time.sleep(0.02)

    async def main() -> None:
        stalls: list[float] = []
        async with serve(make_app(size)) as port:
            async with RegistryClient(config(tmp_path)) as c:
                r = Reference.parse(f"127.0.0.1:{port}/honest:x")
                await c.ping(r)
                tick = asyncio.create_task(ticker(stalls, 0.005))
                progress: list[int] = []
                try:
                    assert await c.fetch_blob(r, digest, dst, progress=progress.append, size=size) == size
                finally:
                    tick.cancel()
                assert sum(progress) == size
        assert max(stalls) < 0.3, f"the event loop stalled for {max(stalls):.2f} s"

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        run(main())
    finally:
        t.join(30)
        if t.is_alive():  # the client failed before opening the FIFO: let the reader see EOF
            os.close(os.open(keep, os.O_WRONLY | os.O_NONBLOCK))
            t.join(5)
    assert bytes(received) == blob_bytes(0, size)


# -- [registry] validation ---------------------------------------------------------------


@pytest.mark.parametrize("line,message", [
    ("retries = -1", "config key registry.retries: -1 must be between 0 and 10"),
    ("retries = 11", "config key registry.retries: 11 must be between 0 and 10"),
    ("retries = true", "registry.retries: expected an integer, got bool True"),
    ("timeout = 0", "config key registry.timeout: 0.0 must be a positive number of seconds"),
    ("timeout = inf", "config key registry.timeout: inf must be a positive number of seconds"),
    ("connect_timeout = -1.5", "config key registry.connect_timeout: -1.5 must be a positive number"),
    ("backoff = -0.5", "config key registry.backoff: -0.5 must be a number of seconds >= 0"),
    ("backoff = nan", "config key registry.backoff: nan must be a number of seconds >= 0"),
    ("max_connections_per_host = 0", "config key registry.max_connections_per_host: 0 must be at least 1"),
    ("upload_chunk_size = 1000", "config key registry.upload_chunk_size: 1000 must be between 65536 and"),
    ("upload_chunk_size = 4294967296", "config key registry.upload_chunk_size: 4294967296 must be between"),
    ("max_ranges_per_request = 0", "config key registry.max_ranges_per_request: 0 must be at least 1"),
    ('hosts_dir = ""', "config key registry.hosts_dir: '' must not be empty"),
    ('docker_config = ""', "config key registry.docker_config: '' must not be empty"),
    ('plain_http = ["registry.internal:5000", "http://evil"]',
     "config key registry.plain_http[1]: 'http://evil' is not a host[:port]"),
    ('plain_http = ["a:70000"]', "config key registry.plain_http[0]: 'a:70000' is not a host[:port]"),
    ('plain_http = ["a/b"]', "config key registry.plain_http[0]: 'a/b' is not a host[:port]"),
    ('plain_http = "a:5000"', "registry.plain_http: expected a list"),
    ("plain_http = [5000]", "registry.plain_http[0]: expected a string"),
])
def test_bad_registry_table_is_rejected_by_the_loader(tmp_path: Path, line: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[registry]\n{line}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(cfg)
    assert message in str(ei.value)


def test_good_registry_table_loads() -> None:
    table = {"registry": {"retries": 0, "timeout": 1, "backoff": 0, "max_connections_per_host": 1,
                          "upload_chunk_size": 65536, "max_ranges_per_request": 1,
                          "plain_http": ["registry.internal:5000", "10.0.0.1", "[::1]:5000", "reg-1.example"]}}
    cfg = load_dataclass(DaemonConfig, table).registry
    assert cfg.retries == 0 and cfg.timeout == 1.0 and isinstance(cfg.timeout, float)
    assert cfg.plain_http == ["registry.internal:5000", "10.0.0.1", "[::1]:5000", "reg-1.example"]
    with pytest.raises(ConfigError, match=r"registry.retries: -1"):
        RegistryConfig(retries=-1)  # constructed directly, as the CLIs do


def test_serve_refuses_a_bad_registry_table(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[registry]\nretries = -1\n")
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-m", "lazyd.cli.lazyd", "serve", "--config", str(cfg), "--root",
                             str(root), "--socket", str(tmp_path / "s.sock")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # it started serving: stop it and the workers it left behind
            proc.kill()
            proc.wait()
        if root.exists():
            stop_workers(root)
            unmount_all_below(root)
    assert proc.returncode == 2, stderr
    assert "config key registry.retries: -1 must be between 0 and 10" in stderr
    assert not root.exists() and not (tmp_path / "s.sock").exists()


# -- token cache -------------------------------------------------------------------------


def _token_app(issued: list[str], expires_in: list[int], pad: list[int]) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        value = uuid.uuid4().hex
        issued.append(request.query.get("scope", ""))
        return web.json_response({"token": value, "expires_in": expires_in[0], "pad": "x" * pad[0]})

    app = web.Application()
    app.router.add_get("/token", token)
    return app


def test_token_cache_drops_expired_and_least_recently_used_tokens(tmp_path: Path) -> None:
    issued: list[str] = []
    expires_in, pad = [300], [0]
    host = "registry.test"

    async def main() -> None:
        async with serve(_token_app(issued, expires_in, pad)) as port, aiohttp.ClientSession() as session:
            auth = Authorizer(CredentialStore(str(tmp_path / "none.json")), lambda h: True)
            challenge = f'Bearer realm="http://127.0.0.1:{port}/token",service="test"'

            def scopes(i: int) -> tuple[str, ...]:
                return (scope_for(f"repo{i}", "pull"),)

            await auth.unauthorized(session, host, scopes(0), challenge, None, False)
            for i in range(1, MAX_TOKENS + 40):
                await auth.header(session, host, scopes(i), False)
                if i == 100:
                    await auth.header(session, host, scopes(0), False)  # repo0 is used again: kept
            assert auth.token_count() == MAX_TOKENS
            assert len(issued) == MAX_TOKENS + 40
            await auth.header(session, host, scopes(0), False)  # still held
            assert len(issued) == MAX_TOKENS + 40
            await auth.header(session, host, scopes(1), False)  # evicted: fetched again
            assert len(issued) == MAX_TOKENS + 41 and issued[-1] == scopes(1)[0]
            assert len(auth.secrets()) == MAX_TOKENS and len(auth._locks) <= MAX_TOKENS

            # short-lived tokens: once expired they are dropped when the next token comes in
            short = Authorizer(CredentialStore(str(tmp_path / "none.json")), lambda h: True)
            expires_in[0] = 1
            await short.unauthorized(session, host, scopes(0), challenge, None, False)
            for i in range(1, 5):
                await short.header(session, host, scopes(i), False)
            assert short.token_count() == 5
            await asyncio.sleep(1.1)
            await short.header(session, host, scopes(99), False)
            assert short.token_count() == 1

            # a token answer bigger than MAX_TOKEN_RESPONSE is refused
            pad[0] = MAX_TOKEN_RESPONSE
            with pytest.raises(ResponseTooLargeError, match=rf"token server 127.0.0.1:{port} .*registry.test.*"
                                                            rf"at most {MAX_TOKEN_RESPONSE}"):
                await short.header(session, host, scopes(100), False)

    run(main())
