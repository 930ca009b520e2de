#!/usr/bin/env python3
"""Benchmark: the ceilings of warm reads through FUSE here, without Python.

Builds ``bench/fuse_ceiling.c`` (a libfuse 2 low-level filesystem in C, the library that
llfuse wraps) and compares, with the page cache warm, against the same files on the
native filesystem:

* the open+read+close rate of N small files;
* the sequential read rate of a 256 MiB file that is in the page cache (the "second
  read" of ``bench/bench_fuse.py``: no request reaches the FUSE server).

Each for two FUSE modes:

* ``open``: the kernel sends OPEN and RELEASE for every open() (lazyd with a stock llfuse);
* ``no_open``: OPEN answered with ENOSYS once, so the kernel sends neither again (lazyd
  with its patched llfuse, ``contrib/llfuse``: stock llfuse and pyfuse3 cannot use this
  mode, as their ``read`` gets only the file handle, which is 0 in it).

It shows what any libfuse 2 filesystem can reach on this machine. When libfuse3-dev is
installed, ``bench/fuse3_ceiling.c`` adds the page-cache read of the same file through a
libfuse 3 server (``C libfuse3``).

In the same run, the same files (one 256 MiB file and N small files of the same sizes)
are served by a lazyd FUSE worker from a filled chunk store (``bench/bench_fuse.py``'s
worker set-up, no fetcher), and measured in the same alternating rounds: the report gives
lazyd ÷ each C server per round, as a median with its min-max, against the target of
lazyd's page-cache re-read at >= 0.95x the C libfuse server.  ``lazyd`` is the worker's
default binding (pyfuse3); ``lazyd-llfuse`` a second worker with ``--fuse-backend llfuse``
on the same store, measured in the same rounds.

Run as root:  python3 bench/bench_fuse_ceiling.py [--files 3000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_fuse import fill_store, mount_layer, start_worker, stop_worker  # its worker set-up, same directory

if TYPE_CHECKING:
    from lazyd.estargz import BuildResult

BLOCK = 1 << 20
MIN_SECONDS = 0.5


def read_tree(files: list[str]) -> None:
    buf = bytearray(BLOCK)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def warm_mbps(path: str) -> float:
    """MB/s of whole-file reads of ``path`` from the page cache (repeated for MIN_SECONDS).

    The file's cached pages are dropped and read in again first: how the kernel lays out
    a file's page cache (folio sizes) moves its re-read rate by up to 30% from one
    population to the next on this kernel (the same C server, mounted three times: 5.7,
    6.9 and 7.5 GB/s), so every round measures a fresh population of every side.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    read_tree([path])
    t0 = time.perf_counter()
    passes = 0
    while passes == 0 or time.perf_counter() - t0 < MIN_SECONDS:
        read_tree([path])
        passes += 1
    return passes * os.path.getsize(path) / (time.perf_counter() - t0) / 1e6


def sha256_of(path: str) -> str:
    """sha256 of a file's bytes, read in BLOCKs."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(BLOCK):
            h.update(chunk)
    return h.hexdigest()


def warm_rate(files: list[str]) -> float:
    """Files per second over repeated passes (at least MIN_SECONDS) after a warming pass."""
    read_tree(files)
    t0 = time.perf_counter()
    passes = 0
    while passes == 0 or time.perf_counter() - t0 < MIN_SECONDS:
        read_tree(files)
        passes += 1
    return passes * len(files) / (time.perf_counter() - t0)


def file_size(i: int) -> int:
    """Size of small file ``i``: the sizes ``fuse_ceiling.c`` serves."""
    return 200 + ((i + 2) * 2654435761 % (1 << 32)) % 7800


def ceiling_tar(path: Path, files: int) -> None:
    """The C servers' tree as a tar: ``big`` (256 MiB of ``x``) and ``f0``..``f{files-1}``."""
    import io
    import tarfile

    class Xs(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.left = n

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            n = min(len(b), self.left)
            b[:n] = b"x" * n
            self.left -= n
            return n

    with tarfile.open(path, "w") as tf:
        ti = tarfile.TarInfo("big")
        ti.size, ti.mode = 256 * BLOCK, 0o644
        tf.addfile(ti, io.BufferedReader(Xs(ti.size), BLOCK))
        for i in range(files):
            ti = tarfile.TarInfo(f"f{i}")
            ti.size, ti.mode = file_size(i), 0o644
            tf.addfile(ti, io.BytesIO(b"x" * ti.size))


def lazyd_side(work: Path, files: int) -> tuple[BuildResult, Path]:
    """The C servers' tree in an eStargz layer with every chunk in the chunk store ``work/cache``:
    the build result and the TOC's path."""
    from lazyd.cache.store import ChunkStore
    from lazyd.estargz import BuildOptions, build

    tar, blob = work / "layer.tar", work / "layer.estargz"
    ceiling_tar(tar, files)
    result = build(tar, blob, BuildOptions())
    tar.unlink()
    store = ChunkStore(work / "cache", 8 << 30)
    (work / "toc.json").write_bytes(fill_store(store, blob, result.blob_digest))
    store.close()
    return result, blob


def lazyd_worker(work: Path, name: str, result: BuildResult, blob: Path,
                 args: list[str]) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A lazyd FUSE worker (no fetcher) serving that layer: (worker, its state dir, the mountpoint)."""
    state, mnt = work / f"worker-{name}", work / f"mnt-{name}"
    proc = start_worker(work, state, args)
    mount_layer(state, "ceiling", mnt, result, work / "toc.json", blob)
    return proc, state, mnt


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lazyd-fuse-ceiling-", dir="/var/tmp"))
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    stop: list[tuple[subprocess.Popen[bytes], Path]] = []  # lazyd worker, its state dir
    try:
        exe = work / "fuse_ceiling"
        cflags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse"], capture_output=True, text=True,
                                check=True).stdout.split()
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(Path(__file__).with_name("fuse_ceiling.c")), *cflags],
                       check=True)
        native = work / "native"
        native.mkdir()
        for i in range(args.files):  # the same sizes as the C filesystem serves
            (native / f"f{i}").write_bytes(b"x" * (200 + ((i + 2) * 2654435761 % (1 << 32)) % 7800))
        with open(native / "big", "wb") as f:
            for _ in range(256):
                f.write(b"x" * BLOCK)
        sides = {"native": [str(native / f"f{i}") for i in range(args.files)]}
        bigs = {"native": str(native / "big")}
        for no_open in (0, 1):
            mp = work / f"mnt{no_open}"
            mp.mkdir()
            proc = subprocess.Popen([str(exe), str(mp), str(args.files), str(no_open)])
            procs.append((proc, mp))
            deadline = time.monotonic() + 10
            while not os.path.ismount(mp):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"fuse_ceiling did not mount {mp}")
                time.sleep(0.05)
            side = "C open" if not no_open else "C no_open"
            sides[side] = [str(mp / f"f{i}") for i in range(args.files)]
            bigs[side] = str(mp / "big")
        if subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode == 0:
            exe3 = work / "fuse3_ceiling"
            flags3 = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                                    check=True).stdout.split()
            subprocess.run(["gcc", "-O2", "-o", str(exe3), str(Path(__file__).with_name("fuse3_ceiling.c")),
                            *flags3], check=True)
            mp = work / "mnt3"
            mp.mkdir()
            procs.append((subprocess.Popen([str(exe3), str(mp)]), mp))
            deadline = time.monotonic() + 10
            while not os.path.ismount(mp):
                if time.monotonic() > deadline:
                    raise SystemExit(f"fuse3_ceiling did not mount {mp}")
                time.sleep(0.05)
            bigs["C libfuse3"] = str(mp / "big")
        result, blob = lazyd_side(work, args.files)
        for name, wargs in (("lazyd", []), ("lazyd-llfuse", ["--fuse-backend", "llfuse"])):
            worker, state, lazyd_mnt = lazyd_worker(work, name, result, blob, wargs)
            stop.append((worker, state))
            sides[name] = [str(lazyd_mnt / f"f{i}") for i in range(args.files)]
            bigs[name] = str(lazyd_mnt / "big")
            if sha256_of(bigs[name]) != sha256_of(bigs["native"]):
                raise SystemExit(f"{name} serves different bytes for big than the native file")
        rates: dict[str, list[float]] = {k: [] for k in sides}
        mbps: dict[str, list[float]] = {k: [] for k in bigs}
        for _ in range(args.repeat):
            for name, files in sides.items():
                rates[name].append(warm_rate(files))
            for name, big in bigs.items():
                mbps[name].append(warm_mbps(big))
        base = statistics.median(rates["native"])
        base_mbps = statistics.median(mbps["native"])
        print(f"warm reads: {args.files} files of 200-8000 bytes (open+read+close) and one 256 MiB file "
              f"from the page cache, median of {args.repeat} alternating runs")
        print(f"{'side':<13} {'files/s':>10} {'x native':>9} {'big MB/s':>9} {'x native':>9}")
        for name in bigs:
            m = statistics.median(mbps[name])
            r = f"{statistics.median(rates[name]):>10.0f} {statistics.median(rates[name]) / base:>8.0%}" \
                if name in rates else f"{'-':>10} {'-':>8}"
            print(f"{name:<13} {r} {m:>9.0f} {m / base_mbps:>8.0%}")
        print(f"\nlazyd ÷ C, per round (median, min-max of {args.repeat} rounds); target: page-cache re-read "
              ">= 0.95x the C libfuse server")
        print(f"{'lazyd side':<13} {'C side':<12} {'big re-read':>20} {'small files warm':>20}")
        missed = False
        for lz in ("lazyd", "lazyd-llfuse"):
            for name in bigs:
                if not name.startswith("C"):
                    continue
                big = [a / b for a, b in zip(mbps[lz], mbps[name])]
                missed |= lz == "lazyd" and statistics.median(big) < 0.95
                small = spread([a / b for a, b in zip(rates[lz], rates[name])]) if name in rates else "-"
                print(f"{lz:<13} {name:<12} {spread(big):>20} {small:>20}")
        print(f"page-cache re-read target (lazyd, the default binding, >= 0.95x every C server): "
              f"{'MISSED' if missed else 'met'}")
        print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
        return 0
    finally:
        if stop:
            for worker, state in stop:
                stop_worker(worker, state)
            for name in ("lazyd", "lazyd-llfuse"):
                subprocess.run(["umount", "-l", str(work / f"mnt-{name}")], capture_output=True)
                subprocess.run(["umount", "-l", str(work / f"worker-{name}" / "fuse")], capture_output=True)
        for proc, mp in procs:
            subprocess.run(["umount", str(mp)], capture_output=True)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
