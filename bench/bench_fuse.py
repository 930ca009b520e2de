#!/usr/bin/env python3
"""Benchmark: reads through a lazyd FUSE worker mount vs natively from an extracted directory.

The layer's chunks are all in the chunk store (warm cache: no fetcher is needed or
running).  Both sides live on the same filesystem (``--workdir``), and "first
read" drops the kernel caches beforehand, so native reads come from the disk and
FUSE reads come from the chunk store on that same disk.  "Second read" is the
page cache on both sides.  Small files: open+read+close of every file.

Run as root:  python3 bench/bench_fuse.py [--big-mb 256] [--small 3000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from lazyd.api import wire
from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.estargz import (FOOTER_SIZE, TOC, BuildOptions, BuildResult, build, decode_chunk, decode_toc_member,
                           parse_footer)

BLOCK = 1 << 20
MIN_WARM_SECONDS = 0.5


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def make_tar(path: Path, big_mb: int, small: int) -> None:
    rnd = random.Random(7)
    with tarfile.open(path, "w") as tf:
        for name, mode in (("big", 0o755), ("small", 0o755)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = tarfile.DIRTYPE, mode
            tf.addfile(ti)
        per_file = 64 if big_mb >= 64 else big_mb
        for i in range(max(1, big_mb // per_file)):
            # Half-compressible data, like binaries: random bytes interleaved with runs.
            data = b"".join(rnd.randbytes(2048) + bytes(2048) for _ in range(per_file * 256))
            ti = tarfile.TarInfo(f"big/file{i}.bin")
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
        for i in range(small):
            data = rnd.randbytes(rnd.randint(200, 8000))
            ti = tarfile.TarInfo(f"small/d{i % 30:02d}/f{i:05d}")
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))


def fill_store(store: ChunkStore, blob_path: Path, digest: str) -> bytes:
    """Verify and store every chunk, as the fetcher does; returns the TOC JSON."""
    blob = blob_path.read_bytes()
    toc_offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    toc_json = decode_toc_member(blob[toc_offset : len(blob) - FOOTER_SIZE])
    toc = TOC.parse(toc_json, toc_offset=toc_offset)
    for c in toc.chunks:
        store.put(ChunkKey(digest, c.blob_offset, c.inner_offset), decode_chunk(c, blob[c.blob_offset : c.blob_end]))
    return toc_json


def control(sock: Path, op: str, args: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        wire.send_frame(s, {"id": 1, "op": op, "args": args})
        reply = wire.recv_frame(s)
    if not reply["ok"]:
        raise RuntimeError(f"{op}: {reply['error']}")
    return reply["result"]


def start_worker(work: Path, state: Path, args: list[str] | None = None) -> subprocess.Popen[bytes]:
    """A FUSE worker with no fetcher (every chunk must be in the store ``work/cache``), state in ``state``
    and its log in ``work/worker.log``; returns once it is ready (SystemExit with its log if it is not)."""
    log = open(work / "worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazyd.fuse.worker", "--worker-id", "0", "--state-dir", str(state),
         "--fetcher-socket", str(work / "no-fetcher.sock"), "--cache-dir", str(work / "cache"),
         "--cache-size", str(8 << 30), "--fetch-timeout", "1", *(args or [])],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while not (state / "worker.json").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"worker did not start:\n{(work / 'worker.log').read_text()}")
        time.sleep(0.05)
    return proc


def mount_layer(state: Path, mount_id: str, mountpoint: Path, result: BuildResult, toc_path: Path,
                blob: Path) -> None:
    """Mount the layer ``build`` made (``result``, at ``blob``; its TOC JSON at ``toc_path``) at ``mountpoint``."""
    control(state / "control.sock", "worker.mount", {
        "mount_id": mount_id, "mountpoint": str(mountpoint), "layer_digest": result.blob_digest,
        "toc_digest": result.toc_digest, "toc_path": str(toc_path), "blob_size": blob.stat().st_size})


def stop_worker(proc: subprocess.Popen[bytes], state: Path) -> None:
    """Ask the worker to shut down; kill it if it has not exited within 15 s."""
    try:
        control(state / "control.sock", "worker.shutdown", {})
    except OSError:
        pass
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_tree(files: list[Path]) -> int:
    """open+read+close every file into one reused buffer (so the allocator is not measured)."""
    total = 0
    buf = bytearray(BLOCK)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def _files(root: Path) -> tuple[list[Path], list[Path]]:
    big = sorted((root / "big").iterdir())
    small = sorted(p for d in sorted((root / "small").iterdir()) for p in d.iterdir())
    return big, small


def measure(native: Path, fuse: Path, repeat: int) -> dict[str, tuple[float, float]]:
    """Median rates (native, fuse) per measure; the two sides alternate so load changes hit both."""
    sides = {"native": _files(native), "fuse": _files(fuse)}
    cases: list[tuple[str, int, Callable[[], None] | None, float]] = [
        ("seq first read (MB/s)", 0, drop_caches, 1e-6),
        ("seq second read (MB/s)", 0, None, 1e-6),
        ("small files first (files/s)", 1, drop_caches, 0.0),
        ("small files warm (files/s)", 1, None, 0.0),
    ]
    out: dict[str, tuple[float, float]] = {}
    for name, which, before, per_byte in cases:
        rates: dict[str, list[float]] = {"native": [], "fuse": []}
        for _ in range(repeat):
            for side, files in sides.items():
                if before is not None:
                    before()
                else:
                    read_tree(files[which])  # warm the page cache (and dentries) first
                # Cold passes run once (the next would be warm); warm ones repeat for at least
                # MIN_WARM_SECONDS, as one pass over the page cache takes only milliseconds.
                t0 = time.perf_counter()
                n = passes = 0
                while passes == 0 or (before is None and time.perf_counter() - t0 < MIN_WARM_SECONDS):
                    n += read_tree(files[which])
                    passes += 1
                dt = time.perf_counter() - t0
                rates[side].append(n * per_byte / dt if per_byte else passes * len(files[which]) / dt)
        out[name] = (statistics.median(rates["native"]), statistics.median(rates["fuse"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/lazyd-bench-fuse"))
    ap.add_argument("--big-mb", type=int, default=256)
    ap.add_argument("--small", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fuse-threads", type=int, default=None, help="passed to the worker")
    args = ap.parse_args()
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proc = None
    state = work / "worker"
    try:
        tar = work / "layer.tar"
        make_tar(tar, args.big_mb, args.small)
        native = work / "native"
        native.mkdir()
        subprocess.run(["tar", "-xf", str(tar), "-C", str(native)], check=True)
        blob = work / "layer.estargz"
        result = build(tar, blob, BuildOptions())
        store = ChunkStore(work / "cache", 8 << 30)
        toc_json = fill_store(store, blob, result.blob_digest)
        store.close()
        (work / "toc.json").write_bytes(toc_json)
        proc = start_worker(work, state, ["--fuse-threads", str(args.fuse_threads)] if args.fuse_threads else [])
        mnt = work / "mnt"
        mount_layer(state, "bench", mnt, result, work / "toc.json", blob)
        results = measure(native, mnt, args.repeat)
        status = control(state / "control.sock", "worker.status", {})["mounts"][0]
        if status["fetch_errors"] or status["cache_misses"]:
            raise SystemExit(f"unexpected misses/errors through FUSE: {status}")
        targets = {"seq first read (MB/s)": 0.50, "seq second read (MB/s)": 0.90,
                   "small files first (files/s)": 0.25, "small files warm (files/s)": 0.25}
        print(f"lazyd FUSE vs native ({args.big_mb} MiB in big files, {args.small} small files, "
              f"median of {args.repeat} alternating runs, workdir {work})")
        print(f"{'measure':<30} {'native':>12} {'fuse':>12} {'ratio':>8} {'target':>8}")
        for key, (nat, fuse) in results.items():
            ratio = fuse / nat
            print(f"{key:<30} {nat:>12.0f} {fuse:>12.0f} {ratio:>7.0%} {targets[key]:>7.0%}"
                  f"{'' if ratio >= targets[key] else '  MISSED'}")
        print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
        return 0
    finally:
        if proc is not None:
            stop_worker(proc, state)
        subprocess.run(["umount", "-l", str(work / "mnt")], capture_output=True)
        subprocess.run(["umount", "-l", str(state / "fuse")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
