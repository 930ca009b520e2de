#!/usr/bin/env python3
"""Benchmark: layer promotion (extraction) and warm reads: lazy FUSE vs promoted vs native.

For each layer of the debian+python3 test image (debootstrap minbase bookworm, then
``apt-get install python3``; built once and cached by tests/support/images.py), the
eStargz blob's chunks are verified into a chunk store (as after background fetch), the
layer is mounted by a lazyd FUSE worker (no fetcher: every read is served from the
cache), and:

* ``extract_layer`` promotes the mount to a plain directory on ``--workdir`` (timed;
  ``peak_disk_bytes`` reported) and once more into a dedicated tmpfs, where the peak of
  the statvfs "used" delta, sampled every 5 ms, is an independent peak-disk measure;
* the native side is ``tar -x`` of the same uncompressed layer on the same filesystem;
* warm reads (page cache primed by a first pass, then timed passes for at least
  ``MIN_WARM_SECONDS``), alternating (a) FUSE, (b) promoted, (c) native, median of
  ``--repeat``: sequential read of every file >= 1 MiB (MB/s), and a small-file walk
  (scandir + lstat + open/read/close of every regular file, files/s).

Run as root:  python3 bench/bench_promote.py [--repeat 5] [--workdir DIR] [--out bench/results/promote.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_fuse import control, fill_store, mount_layer, read_tree, start_worker, stop_worker  # noqa: E402
from lazyd.cache.store import ChunkStore  # noqa: E402
from lazyd.estargz import BuildOptions, build  # noqa: E402
from lazyd.snapshotter.extract import ExtractStats, extract_layer  # noqa: E402
from tests.support.images import debian_python_layout, layer_tars  # noqa: E402

BLOCK = 1 << 20
BIG = 1 << 20
MIN_WARM_SECONDS = 0.5
TARGET = 0.98


def regular_files(roots: list[Path]) -> list[Path]:
    out = []
    for root in roots:
        stack = [root]
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        out.append(Path(e.path))
    return sorted(out)


def walk_read(roots: list[Path]) -> int:
    """scandir + lstat + open/read/close of every regular file; returns the number of files."""
    files = 0
    buf = bytearray(BLOCK)
    for root in roots:
        stack = [root]
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    e.stat(follow_symlinks=False)  # a walk stats every entry
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        with open(e.path, "rb", buffering=0) as f:
                            while f.readinto(buf):
                                pass
                        files += 1
    return files


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    """Rate of ``fn`` (units per second): one priming pass, then passes for >= MIN_WARM_SECONDS."""
    fn()
    fn()  # "read twice": the timed passes below are the second and later
    t0 = time.perf_counter()
    units = passes = 0
    while passes == 0 or time.perf_counter() - t0 < MIN_WARM_SECONDS:
        units += fn()
        passes += 1
    return units / (time.perf_counter() - t0), passes


def measure(sides: dict[str, list[Path]], repeat: int) -> dict[str, dict[str, float]]:
    big = {side: [p for p in regular_files(roots) if p.stat().st_size >= BIG] for side, roots in sides.items()}
    counts = {len(v) for v in big.values()}
    if len(counts) != 1:
        raise SystemExit(f"the sides differ in their big files: { {k: len(v) for k, v in big.items()} }")
    cases: dict[str, Callable[[str], int]] = {
        "warm sequential, files >= 1 MiB (MB/s)": lambda side: read_tree(big[side]),
        "warm small-file walk, every file (files/s)": lambda side: walk_read(sides[side]),
    }
    scale = {"warm sequential, files >= 1 MiB (MB/s)": 1e-6, "warm small-file walk, every file (files/s)": 1.0}
    out: dict[str, dict[str, float]] = {}
    for name, fn in cases.items():
        rates: dict[str, list[float]] = {side: [] for side in sides}
        order = list(sides)
        for rnd in range(repeat):
            for side in order[rnd % len(order):] + order[:rnd % len(order)]:  # rotate who goes first
                rate, _passes = timed(lambda: fn(side))
                rates[side].append(rate * scale[name])
        out[name] = {side: statistics.median(r) for side, r in rates.items()}
        out[name + " best"] = {side: max(r) for side, r in rates.items()}
    return out


class DiskPeak:
    """The peak of (used now - used at start) of one filesystem, sampled in a thread."""

    def __init__(self, path: Path, interval: float = 0.005) -> None:
        self.path, self.interval = path, interval
        self.peak = 0
        self._stop = threading.Event()
        self._base = self._used()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self._base)
            time.sleep(self.interval)

    def __enter__(self) -> "DiskPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used() - self._base)


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/lazyd-bench-promote"))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "promote.md")
    args = ap.parse_args()
    work: Path = args.workdir
    subprocess.run(["umount", "-R", "-l", str(work)], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proc = None
    state = work / "worker"
    mounts: list[Path] = []
    t_start = time.monotonic()
    try:
        tars = layer_tars(debian_python_layout(), "latest", work / "tars")
        store = ChunkStore(work / "cache", 8 << 30)
        layers = []
        for i, tar in enumerate(tars):
            blob = work / f"layer{i}.estargz"
            result = build(tar, blob, BuildOptions())
            (work / f"toc{i}.json").write_bytes(fill_store(store, blob, result.blob_digest))
            layers.append((blob, result))
        store.close()
        proc = start_worker(work, state)
        fuse, promoted, native = [], [], []
        rows = []
        tmpfs = work / "tmpfs"
        tmpfs.mkdir()
        for i, (blob, result) in enumerate(layers):
            mnt = work / f"mnt{i}"
            mount_layer(state, f"layer{i}", mnt, result, work / f"toc{i}.json", blob)
            mounts.append(mnt)
            fuse.append(mnt)
            nat = work / f"native{i}"
            nat.mkdir()
            t0 = time.perf_counter()
            subprocess.run(["tar", "-x", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-f", str(tars[i]),
                            "-C", str(nat)], check=True)
            subprocess.run(["sync", "-f", str(nat)], check=True)
            t_tar = time.perf_counter() - t0
            native.append(nat)
            os.sync()
            stats: ExtractStats = extract_layer(mnt, work / f"promoted{i}")
            promoted.append(work / f"promoted{i}")
            # Again into a dedicated tmpfs: its statvfs delta is an independent peak-disk measure.
            # From a second mount of the layer, whose FUSE page cache is as cold as the first's was.
            mnt2 = work / f"mnt{i}-again"
            mount_layer(state, f"layer{i}-again", mnt2, result, work / f"toc{i}.json", blob)
            mounts.append(mnt2)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(tmpfs)], check=True)
            try:
                with DiskPeak(tmpfs) as peak:
                    tstats = extract_layer(mnt2, tmpfs / "promoted")
            finally:
                subprocess.run(["umount", str(tmpfs)], check=True)
            rows.append((i, tars[i].stat().st_size, blob.stat().st_size, stats, t_tar, peak.peak, tstats.seconds))
        status = control(state / "control.sock", "worker.status", {})["mounts"]
        if any(m["fetch_errors"] for m in status):
            raise SystemExit(f"fetch errors through FUSE: {status}")
        results = measure({"fuse": fuse, "promoted": promoted, "native": native}, args.repeat)
        native_files = regular_files(native)
        nfiles = len(native_files)
        big_files = [p for p in native_files if p.stat().st_size >= BIG]
        nbig, bigbytes = len(big_files), sum(p.stat().st_size for p in big_files)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        lines = [f"# bench_promote: promotion of the debian+python3 layers and warm reads, {stamp}", "",
                 f"Workdir `{work}` ({_fstype(work)}); layers mounted by a lazyd FUSE worker with every chunk "
                 "cached (no fetcher); native = `tar -x` of the same layer on the same filesystem.", "",
                 "## Extraction (promotion)", "",
                 "| layer | tar | eStargz | files | dirs | symlinks | hardlinks | devices | bytes | extract s "
                 "| MB/s | peak disk (stats) | peak disk (tmpfs statvfs) | extract s on tmpfs | tar -x s |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, tar_size, blob_size, s, t_tar, peak_statvfs, t_tmpfs in rows:
            lines.append(f"| {i} | {mib(tar_size)} | {mib(blob_size)} | {s.files} | {s.dirs} | {s.symlinks} | "
                         f"{s.hardlinks} | {s.devices} | {mib(s.bytes)} | {s.seconds:.2f} | "
                         f"{s.bytes / s.seconds / 1e6:.0f} | {mib(s.peak_disk_bytes)} | {mib(peak_statvfs)} | "
                         f"{t_tmpfs:.2f} | {t_tar:.2f} |")
        total = sum(r[3].seconds for r in rows)
        peak_total = sum(r[3].peak_disk_bytes for r in rows)
        lines += ["", f"Whole image: extraction {total:.2f} s, peak extra disk {mib(peak_total)} "
                  "(the tree written; the chunk cache still holds the layer until promotion completes).", "",
                  f"## Warm reads (page cache primed, {args.repeat} rotating runs per side, "
                  f">= {MIN_WARM_SECONDS} s each; median and best run)", "",
                  f"Layers 0+1 read as two separate trees per side: {nbig} files >= 1 MiB "
                  f"({mib(bigbytes)}) sequentially; the walk reads all {nfiles} regular files.", "",
                  "| measure | (a) lazy FUSE | (b) promoted | (c) native | (b)/(c) | (a)/(c) | target (b)/(c) |",
                  "|---|---|---|---|---|---|---|"]
        verdicts = []
        for name, r in results.items():
            b_c, a_c = r["promoted"] / r["native"], r["fuse"] / r["native"]
            ok = b_c >= TARGET
            best = name.endswith(" best")
            if not best:
                verdicts.append(ok)
            label = name.removesuffix(" best") + (", best run" if best else ", median")
            lines.append(f"| {label} | {r['fuse']:.0f} | {r['promoted']:.0f} | {r['native']:.0f} | {b_c:.3f} | "
                         f"{a_c:.3f} | >= {TARGET} {'met' if ok else 'MISSED'} |")
        lines += ["", f"bench wall time {(time.monotonic() - t_start) / 60:.1f} min; load average at the end "
                  f"{load} ({os.cpu_count()} cores)", ""]
        text = "\n".join(lines)
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        return 0 if all(verdicts) else 1
    finally:
        if proc is not None:
            stop_worker(proc, state)
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        subprocess.run(["umount", "-l", str(state / "fuse")], capture_output=True)
        subprocess.run(["umount", "-l", str(work / "tmpfs")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def _fstype(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
