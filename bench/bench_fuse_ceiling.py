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
libfuse 3 server (``C libfuse3``). Compare with "small files warm" and "seq second read"
of ``bench/bench_fuse.py``.

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

BLOCK = 1 << 20
MIN_SECONDS = 0.5


def read_tree(files: list[str]) -> None:
    buf = bytearray(BLOCK)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def warm_mbps(path: str) -> float:
    """MB/s of whole-file reads of ``path`` from the page cache (repeated for MIN_SECONDS)."""
    read_tree([path])
    t0 = time.perf_counter()
    passes = 0
    while passes == 0 or time.perf_counter() - t0 < MIN_SECONDS:
        read_tree([path])
        passes += 1
    return passes * os.path.getsize(path) / (time.perf_counter() - t0) / 1e6


def warm_rate(files: list[str]) -> float:
    """Files per second over repeated passes (at least MIN_SECONDS) after a warming pass."""
    read_tree(files)
    t0 = time.perf_counter()
    passes = 0
    while passes == 0 or time.perf_counter() - t0 < MIN_SECONDS:
        read_tree(files)
        passes += 1
    return passes * len(files) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lazyd-fuse-ceiling-", dir="/var/tmp"))
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
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
        print(f"{'side':<12} {'files/s':>10} {'x native':>9} {'big MB/s':>9} {'x native':>9}")
        for name in bigs:
            m = statistics.median(mbps[name])
            r = f"{statistics.median(rates[name]):>10.0f} {statistics.median(rates[name]) / base:>8.0%}" \
                if name in rates else f"{'-':>10} {'-':>8}"
            print(f"{name:<12} {r} {m:>9.0f} {m / base_mbps:>8.0%}")
        print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
        return 0
    finally:
        for proc, mp in procs:
            subprocess.run(["umount", str(mp)], capture_output=True)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
