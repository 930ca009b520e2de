#!/usr/bin/env python3
"""Cold on-demand reads through a lazyd mount vs a full download + extract, over a throttled link.

One layer of the debian+python3 image (the python3 layer by default) is read two ways, each
from cold (fresh ``lazyd serve`` root, fresh extract dir), through the same throttled,
byte-counting link (``tests/support/netem.py``):

* ``lazyd``:  ``lazyctl mount REF LAYER MOUNTPOINT`` (eStargz image made by ``lazyctl image
  convert``), then read the files through the FUSE mount (``lazyd-nobg``: the same with
  ``background_fetch = false``, so on-demand reads have the link to themselves);
* ``native``: GET the plain gzip layer blob, ``tar -xzf`` it onto a tmpfs, then read the files.

Workloads: a set of small files (the ``.py`` files of one directory) and one big file (the
biggest regular file of the layer).  Ratios are lazyd / native of the time to have read the
files (mount or download+extract included); read-only times are shown too.

Run as root:  python3 bench/bench_cold_read.py --link 200mbit:10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import BenchError, lazyd_daemon, load, sh, signals_as_exit, table, tmpfs  # noqa: E402
from lazyd.mounttable import unmount_below  # noqa: E402
from tests.support.images import debian_python_layout, push  # noqa: E402
from tests.support.netem import throttled_proxy  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402
from tests.support.tcpproxy import TCPProxy  # noqa: E402

WAYS: dict[str, dict[str, str]] = {"lazyd": {}, "lazyd-nobg": {"background_fetch": "false"}}
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class Result:
    way: str
    workload: str
    setup: float  # mount, or download + extract
    read: float
    bytes_down: int
    range_gets: int
    load: str

    @property
    def total(self) -> float:
        return self.setup + self.read


def layers(host: str, repo: str, tag: str) -> list[str]:
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES})
    manifest = json.loads(urllib.request.urlopen(req).read())
    return [layer["digest"] for layer in manifest["layers"]]


def pick_files(blob: Path, small_dir: str) -> tuple[list[str], str, int]:
    """The ``.py`` files directly in ``small_dir`` and the biggest regular file of a gzip layer blob."""
    small, big, big_size = [], "", 0
    with tarfile.open(blob, "r:gz") as tar:
        for m in tar:
            if not m.isreg():
                continue
            name = m.name.lstrip("./")
            if name.rsplit("/", 1)[0] == small_dir and name.endswith(".py"):
                small.append(name)
            if m.size > big_size:
                big, big_size = name, m.size
    return sorted(small), big, big_size


def read_all(root: Path, names: list[str]) -> tuple[float, int]:
    t0 = time.monotonic()
    total = 0
    for name in names:
        with open(root / name, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return time.monotonic() - t0, total


def run_lazyd(proxy: TCPProxy, ref: str, digest: str, names: list[str], workload: str, work: Path,
              way: str) -> Result:
    root = work / f"l{time.monotonic_ns()}"
    ld = load()
    try:
        with lazyd_daemon(root, WAYS[way]) as sock:
            mnt = root / "mnt"
            mnt.mkdir()
            proxy.reset()
            t0 = time.monotonic()
            sh("lazyctl", "mount", "--socket", sock, ref, digest, mnt)
            setup = time.monotonic() - t0
            try:
                read, _ = read_all(mnt, names)
                down, ranges = proxy.bytes_down, len(proxy.range_requests())
            finally:
                subprocess.run(["lazyctl", "umount", "--socket", str(sock), str(mnt)], capture_output=True,
                               timeout=60)
    finally:
        unmount_below(root)
        subprocess.run(["rm", "-rf", str(root)], capture_output=True)
    return Result(way, workload, setup, read, down, ranges, ld)


def run_native(proxy: TCPProxy, repo: str, digest: str, names: list[str], workload: str, work: Path) -> Result:
    root = work / f"n{time.monotonic_ns()}"
    out = root / "rootfs"
    out.mkdir(parents=True)
    ld = load()
    try:
        proxy.reset()
        t0 = time.monotonic()
        blob = root / "blob.tar.gz"
        with urllib.request.urlopen(f"http://{proxy.host}/v2/{repo}/blobs/{digest}") as resp, open(blob, "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
        sh("tar", "-xzf", blob, "-C", out)
        setup = time.monotonic() - t0
        read, _ = read_all(out, names)
        down, ranges = proxy.bytes_down, len(proxy.range_requests())
    finally:
        subprocess.run(["rm", "-rf", str(root)], capture_output=True)
    return Result("native", workload, setup, read, down, ranges, ld)


def main() -> int:
    from tests.support.procs import prefer_this_interpreters_tools

    prefer_this_interpreters_tools()  # lazyctl/lazyd by name: this interpreter's (the venv's)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", action="append", default=None, help="RATE:RTT_MS, repeatable (default 200mbit:10)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layer", type=int, default=1, help="layer index (0: debootstrap base, 1: python3)")
    ap.add_argument("--ways", default="lazyd,lazyd-nobg,native",
                    help="comma-separated: lazyd, lazyd-nobg (background_fetch = false), native")
    ap.add_argument("--small-dir", default="usr/lib/python3.11/email", help="directory whose .py files are read")
    args = ap.parse_args()
    links = [(l.split(":")[0], float(l.split(":")[1]) / 1000) for l in (args.link or ["200mbit:10"])]
    with signals_as_exit(), tmpfs() as work:
        reg = start_registry(work, name="registry")
        try:
            plain = push(f"oci:{debian_python_layout()}:latest", reg.host, "debian-python:plain")
            esgz = f"{reg.host}/debian-python:lazyd"
            sh("lazyctl", "image", "convert", "--plain-http", "--json", plain, esgz)
            plain_layer = layers(reg.host, "debian-python", "plain")[args.layer]
            esgz_layer = layers(reg.host, "debian-python", "lazyd")[args.layer]
            blob = work / "probe.tar.gz"
            urllib.request.urlretrieve(f"http://{reg.host}/v2/debian-python/blobs/{plain_layer}", blob)
            small, big, big_size = pick_files(blob, args.small_dir)
            blob.unlink()
            if not small:
                raise BenchError(f"no .py files in {args.small_dir} of layer {args.layer}")
            workloads = {f"{len(small)} small files ({args.small_dir}/*.py)": small,
                         f"big file {big} ({big_size / 1e6:.1f} MB)": [big]}
            for rate, rtt in links:
                results: list[Result] = []
                with throttled_proxy(reg.port, rate, rtt) as proxy:
                    ref = f"{proxy.host}/debian-python:lazyd"
                    for rnd in range(args.rounds):
                        for label, names in workloads.items():
                            ways = args.ways.split(",") if rnd % 2 == 0 else args.ways.split(",")[::-1]
                            for way in ways:
                                try:
                                    r = (run_lazyd(proxy, ref, esgz_layer, names, label, work, way) if way in WAYS
                                         else run_native(proxy, "debian-python", plain_layer, names, label, work))
                                except (BenchError, OSError, subprocess.SubprocessError, TimeoutError) as err:
                                    print(f"# {way} {label} FAILED: {str(err)[:1500]}", flush=True)
                                    continue
                                print(f"# {rate} {way} {label}: setup {r.setup:.2f}s read {r.read:.3f}s "
                                      f"{r.bytes_down / 1e6:.2f} MB {r.range_gets} ranges load {r.load}", flush=True)
                                results.append(r)
                rows = []
                for label in workloads:
                    by = {w: [r for r in results if r.workload == label and r.way == w] for w in args.ways.split(",")}
                    med = {w: statistics.median(r.total for r in rs) if rs else None for w, rs in by.items()}
                    for w, rs in by.items():
                        if not rs:
                            continue
                        ratio = f"{med[w] / med['native']:.3f}" if med.get("native") and med[w] else "-"
                        rows.append([label, w, str(len(rs)), f"{statistics.median(r.setup for r in rs):.2f}",
                                     f"{statistics.median(r.read for r in rs):.3f}", f"{med[w]:.2f}", ratio,
                                     f"{statistics.median(r.bytes_down for r in rs) / 1e6:.2f}",
                                     f"{statistics.median(r.range_gets for r in rs):.0f}",
                                     " | ".join(r.load for r in rs)])
                print(f"\n## layer {args.layer}, {rate}, {rtt * 1000:.0f} ms RTT (medians; setup = mount, or "
                      "download + extract)")
                print(table(rows, ["workload", "way", "n", "setup s", "read s", "total s", "x native", "fetched MB",
                                   "range GETs", "load avg per run"]))
        finally:
            reg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
