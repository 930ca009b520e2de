"""Peak memory of one range read from a registry that ignores ``Range`` (not a test; run by hand).

``python -m tests.registry.bounds_measure [OFFSET_MIB] [LENGTH_KIB]`` starts the hostile registry
(tests/registry/bounds_server.py) in a subprocess, reads the range with ``fetch_ranges``, a
two-range ``fetch_ranges`` and ``stream_range``, and prints the tracemalloc peak and peak-RSS
growth (VmHWM, reset before each read).

``python -m tests.registry.bounds_measure blob SIZE_MIB DIR`` times ``fetch_blob`` of a synthetic
blob into DIR (three runs) and reports the longest event-loop stall seen meanwhile.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from lazyd.registry import Reference, RegistryClient, RegistryConfig
from tests.registry.bounds_server import blob_bytes, blob_digest
from tests.registry.helpers import ticker

DIGEST = "sha256:" + "ab" * 32


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (peak RSS) to the current RSS
        f.write("5")


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


async def _measure(label: str, fn: Callable[[], Awaitable[object]]) -> None:
    _reset_peak_rss()
    rss0 = _rss_mib("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    await fn()
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{label}: tracemalloc peak {peak / 2**20:.1f} MiB, peak RSS {_rss_mib('VmHWM') - rss0:+.1f} MiB, "
          f"{elapsed:.2f} s", flush=True)


@asynccontextmanager
async def _client_of_server(size: int) -> AsyncIterator[tuple[RegistryClient, int]]:
    """A registry client and the port of the hostile registry (tests/registry/bounds_server.py), started
    in a subprocess with a ``size``-byte blob and stopped on leaving."""
    server = subprocess.Popen([sys.executable, "-m", "tests.registry.bounds_server", str(size)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory() as tmp:
            cfg = RegistryConfig(hosts_dir=f"{tmp}/certs.d", docker_config=f"{tmp}/none.json")
            async with RegistryClient(cfg) as c:
                yield c, port
    finally:
        server.terminate()
        server.wait()


async def main(offset: int, length: int) -> None:
    size = offset + length + (1 << 20)
    async with _client_of_server(size) as (c, port):
        ref = Reference.parse(f"127.0.0.1:{port}/ignore-range:x")
        await c.ping(ref)
        want = blob_bytes(offset, length)

        async def single() -> None:
            (got,) = await c.fetch_ranges(ref, DIGEST, [(offset, length)])
            assert got == want

        async def double() -> None:
            got = await c.fetch_ranges(ref, DIGEST, [(offset, length), (1000, 10)])
            assert got == [want, blob_bytes(1000, 10)]

        async def streamed() -> None:
            parts: list[bytes] = []

            async def sink(pos: int, data: bytes) -> None:
                parts.append(data)

            await c.stream_range(ref, DIGEST, offset, length, sink)
            assert b"".join(parts) == want

        print(f"range {length} B at offset {offset} B of a {size} B blob, server ignores Range")
        await _measure("fetch_ranges, one range ", single)
        await _measure("fetch_ranges, two ranges", double)
        await _measure("stream_range            ", streamed)


async def blob(size: int, directory: str) -> None:
    digest = blob_digest(size)
    async with _client_of_server(size) as (c, port):
        ref = Reference.parse(f"127.0.0.1:{port}/honest:x")
        for _ in range(3):
            stalls: list[float] = []
            tick = asyncio.create_task(ticker(stalls, 0.001))
            t0 = time.perf_counter()
            n = await c.fetch_blob(ref, digest, f"{directory}/bounds-blob")
            elapsed = time.perf_counter() - t0
            tick.cancel()
            print(f"fetch_blob {n} B into {directory}: {elapsed:.2f} s ({n / elapsed / 2**20:.0f} MiB/s), "
                  f"longest loop stall {max(stalls) * 1000:.1f} ms", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["blob"]:
        asyncio.run(blob(int(sys.argv[2]) << 20, sys.argv[3]))
        sys.exit(0)
    off_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    len_kib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    asyncio.run(main(off_mib << 20, len_kib << 10))
