#!/usr/bin/env python3
"""Full walk of a 100,000-file layer: lazyd, the reference and a full download, on the same blobs.

The image: busybox (one layer) plus a layer of ``--files`` small files (random bytes, so
gzip cannot shrink them; log-uniform sizes up to 1.4 KiB, ~700 B on average, in 100
directories). It is converted twice, by ``lazyctl image convert`` and by ``ctr-remote image
convert --estargz --oci``, and both eStargz images are run by both lazy systems. The
baseline is a full download of the plain gzip image by containerd's overlayfs snapshotter
(``ctr images pull`` + ``ctr run``).

The workload reads every byte of the big layer: ``tar -cf - /data | wc -c`` (busybox tar).
A run counts from the start of the pull to the exit of ``ctr run --rm`` (pull and run are
also shown apart), in a fresh containerd root on a tmpfs each time, through a throttled,
request-counting link (``tests/support/netem.py``). A lazy run in which any layer fell back
is refused (named, left out, exit status 1), as in ``bench_e2e.py``.

Targets (issue 11): lazyd <= 1.0x the reference, and <= 1.5x the full download.

Systems: ``lazyd`` (its defaults: the pyfuse3 binding, READDIRPLUS and page-cache push, and
xattr-free workers, docs/design.md), ``lazyd-llfuse`` (``fuse_backend = "llfuse"``),
``reference``, ``download``.
``--systems`` picks a subset.

    /opt/lazyd/venv/bin/python bench/bench_walk.py --rounds 2 --link 200mbit:10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import (  # noqa: E402
    PROXY_SNAPSHOTTER, RESULTS, BenchError, Refused, cold_pull, load, md_table, parse_links, plain_stack, sh,
    signals_as_exit, tmpfs, via)
from tests.e2e.images import add_layer  # noqa: E402
from tests.interop.oci import read_image  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402
from tests.support.images import build_busybox, push  # noqa: E402
from tests.support.netem import throttled_proxy  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402
from tests.support.tcpproxy import TCPProxy  # noqa: E402

WALK = ("sh", "-c", "tar -cf - /data | wc -c")
SYSTEMS = ("lazyd", "lazyd-llfuse", "reference", "download")
LAZY = ("lazyd", "lazyd-llfuse", "reference")
# lazyd's settings per lazyd system (top-level TOML values).
LAZYD_SETTINGS = {"lazyd": {}, "lazyd-llfuse": {"fuse_backend": '"llfuse"'}}
VARIANTS = ("lazyctl", "ctr-remote")


def files_tar(n: int, seed: int) -> tuple[bytes, int]:
    """A tar of ``n`` small random files under ``data/``; returns it and the total file bytes."""
    rnd = random.Random(seed)
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in range(100):
            info = tarfile.TarInfo(f"data/d{d:02d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(info)
        for i in range(n):
            size = int(2 ** rnd.uniform(0, 10.45)) - 1  # 0 .. 1.4 KiB, log-uniform
            info = tarfile.TarInfo(f"data/d{i % 100:02d}/f{i:06d}")
            info.size, info.mode, info.mtime = size, 0o644, 1700000000
            tar.addfile(info, io.BytesIO(rnd.randbytes(size)))
            total += size
    return buf.getvalue(), total


@dataclass
class Result:
    link: str
    system: str
    variant: str
    round: int
    pull: float
    run: float
    bytes: int
    requests: int
    tar_bytes: int
    load: str

    @property
    def total(self) -> float:
        return self.pull + self.run


def _walk(cd: Containerd, ref: str, name: str, snapshotter: str) -> tuple[float, int]:
    start = time.monotonic()
    out = cd.ctr("run", "--rm", "--snapshotter", snapshotter, ref, name, *WALK, timeout=1800).stdout
    return time.monotonic() - start, int(out.split()[-1])


def measure(system: str, variant: str, ref: str, proxy: TCPProxy, work: Path, n: int, link: str, rnd: int) -> Result:
    root = work / f"run{n}-{system}-{variant}"
    root.mkdir()
    ld = load()
    try:
        with cold_pull("lazyd" if system in LAZYD_SETTINGS else system, root, proxy, ref,
                       settings=LAZYD_SETTINGS.get(system), timeout=1800) as pulled:
            run, size = _walk(pulled.cd, ref, f"walk{n}", "overlayfs" if system == "download" else PROXY_SNAPSHOTTER)
            fallbacks = pulled.fallbacks()
        nbytes, nreq = proxy.bytes_down, len(proxy.requests())
        if fallbacks:  # the stack's own words on it, before its root goes
            for log in sorted(root.rglob("*.log")):
                lines = log.read_text(errors="replace").splitlines()
                for line in [x for x in lines if " WARNING " in x or " ERROR " in x][-5:]:
                    print(f"#   {log.relative_to(root)}: {line}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if fallbacks:
        raise Refused(f"{system} on {variant} ({link}, round {rnd + 1}): " + " | ".join(fallbacks))
    return Result(link, system, variant, rnd + 1, pulled.seconds, run, nbytes, nreq, size, ld)


def report(results: list[Result], links: list[str]) -> str:
    out = []
    for link in links:
        med: dict[tuple[str, str], dict[str, float]] = {}
        for key in {(r.system, r.variant) for r in results if r.link == link}:
            rs = [r for r in results if r.link == link and (r.system, r.variant) == key]
            med[key] = {k: statistics.median(getattr(r, k) for r in rs)
                        for k in ("pull", "run", "total", "bytes", "requests")} | {"n": len(rs)}
        download = next((v for (s, _), v in med.items() if s == "download"), None)
        rows = []
        for variant in VARIANTS:
            ref = med.get(("reference", variant))
            for system in LAZY:
                m = med.get((system, variant))
                if m is None:
                    continue
                rows.append([variant, system, f"{m['pull']:.2f}", f"{m['run']:.2f}", f"{m['total']:.2f}",
                             f"{m['bytes'] / 1e6:.1f}", f"{m['requests']:.0f}",
                             f"{m['total'] / ref['total']:.2f}" if system != "reference" and ref else "",
                             f"{m['total'] / download['total']:.2f}" if download else "", f"{m['n']:.0f}"])
        if download:
            rows.append(["plain gzip", "download", f"{download['pull']:.2f}", f"{download['run']:.2f}",
                         f"{download['total']:.2f}", f"{download['bytes'] / 1e6:.1f}", f"{download['requests']:.0f}",
                         "", "1.00", f"{download['n']:.0f}"])
        out.append(f"## {link}\n\n" + md_table(
            ["image", "system", "pull s", "walk s", "total s", "MB", "requests", "lazyd ÷ ref", "÷ download", "n"],
            rows))
    return "\n\n".join(out)


def main() -> int:
    from tests.support.procs import prefer_this_interpreters_tools

    prefer_this_interpreters_tools()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", action="append", default=None, help="RATE:RTT_MS, repeatable (default 200mbit:10)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (tc, mounts, containerd)", file=sys.stderr)
        return 2
    systems = args.systems.split(",")
    if bad := [s for s in systems if s not in SYSTEMS]:
        ap.error(f"--systems: unknown {', '.join(bad)}")
    links = parse_links(args.link or ["200mbit:10"])
    link_names = [f"{rate} {rtt * 1000:.0f}ms" for rate, rtt in links]
    started, stamp = time.monotonic(), time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results: list[Result] = []
    refused: list[str] = []
    try:
        with signals_as_exit(), tmpfs("12g") as work, ExitStack() as stack:
            reg = start_registry(work, name="registry")
            stack.callback(reg.stop)
            layout = work / "walk-layout"
            build_busybox(layout, "latest")
            raw, file_bytes = files_tar(args.files, 7)
            add_layer(layout, "latest", raw, f"{args.files} small files")
            plain = push(f"oci:{layout}:latest", reg.host, "walk:plain")
            refs = {"lazyctl": f"{reg.host}/walk:lazyctl", "ctr-remote": f"{reg.host}/walk:ctr-remote"}
            sh("lazyctl", "image", "convert", "--plain-http", "--json", plain, refs["lazyctl"], timeout=1800)
            with plain_stack(work / "convert") as cd:
                cd.ctr("content", "fetch", "--plain-http", plain, timeout=600)
                cd.ctr_remote("image", "convert", "--estargz", "--oci", plain, refs["ctr-remote"], timeout=1800)
                cd.ctr("images", "push", "--plain-http", refs["ctr-remote"], timeout=600)
            sizes = {v: sum(layer["size"] for layer in read_image(r).layers) for v, r in refs.items()}
            sizes["plain"] = sum(layer["size"] for layer in read_image(plain).layers)
            print(f"# {args.files} files, {file_bytes / 1e6:.1f} MB of file data; image bytes: "
                  + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()), flush=True)
            n = 0
            for (rate, rtt), link in zip(links, link_names):
                with throttled_proxy(reg.port, rate, rtt) as proxy:
                    for rnd in range(args.rounds):
                        runs = [(s, v) for v in VARIANTS for s in LAZY if s in systems]
                        runs += [("download", "plain")] if "download" in systems else []
                        runs = runs[rnd % len(runs):] + runs[:rnd % len(runs)]
                        for system, variant in runs:
                            n += 1
                            ref = via(proxy, plain if system == "download" else refs[variant])
                            try:
                                r = measure(system, variant, ref, proxy, work, n, link, rnd)
                            except Refused as err:
                                refused.append(str(err))
                                print(f"# REFUSED {err}", flush=True)
                                continue
                            if r.tar_bytes < file_bytes:
                                raise BenchError(f"{system} on {variant}: tar wrote {r.tar_bytes} bytes, less than "
                                                 f"the {file_bytes} bytes of file data")
                            results.append(r)
                            print(f"# {link} round {rnd + 1} {variant} {system}: pull {r.pull:.2f}s walk {r.run:.2f}s "
                                  f"{r.bytes / 1e6:.1f} MB {r.requests} requests; load {r.load}", flush=True)
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    wall = time.monotonic() - started
    text = (f"# bench_walk: full walk of a {args.files}-file layer, {args.rounds} rounds, {stamp}\n\n"
            f"{report(results, link_names)}\n\nbench wall time {wall / 60:.1f} min; load average at the end {load()} "
            f"({os.cpu_count()} cores)\n" + "".join(f"\nREFUSED: {r}" for r in refused) + "\n")
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"walk-{stamp}"
    base.with_suffix(".md").write_text(text)
    base.with_suffix(".json").write_text(json.dumps([asdict(r) | {"total": r.total} for r in results], indent=1))
    print(f"# wrote {base}.md and .json")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
