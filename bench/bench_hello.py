#!/usr/bin/env python3
"""HelloBench-style, cold, on a throttled link: optimized images and prefetch profiles (issue 12).

Modes, each run from a fresh containerd root (and fresh lazyd / reference state) per run:

* ``legacy``            containerd's own overlayfs snapshotter: ``ctr pull`` (the whole image) + ``ctr run``;
* ``lazyd``             lazyd on the unprioritized ``lazyctl image convert`` image;
* ``lazyd-opt``         lazyd on the ``lazyctl image optimize``d image (optimized for that workload);
* ``lazyd-profile``     lazyd on the unprioritized image plus a pushed prefetch profile of the workload
                        (``lazyctl profile record`` + ``profile push``; lazyd with ``profiles = "registry"``);
* ``ref-opt``           the reference (``containerd-stargz-grpc`` + ``ctr-remote images rpull``) on its own
                        ``ctr-remote image optimize``d image (made from a copy whose upper layer carries its parent
                        directories, so the reference keeps its whole record);
* ``ref-on-lazyd-opt``  the reference on lazyd's optimized image.

Workloads: ``hello`` (``python3 -c print('hello')``), ``ls`` (``ls -R /etc``, then a line), ``heavy``
(30 stdlib imports, then a line).  Per run: pull wall time, time to the first output line and to the
exit of ``ctr run --rm``, and the bytes and requests through the link until the first output line.
"What the workload reads" is the size of the regular files it opens (``strace`` in a chroot of the
unpacked image); the byte ratio is fetched ÷ read.  A lazy run in which a layer fell back is refused.

From a clean clone, as root:

    scripts/setup && /opt/lazyd/venv/bin/python bench/bench_hello.py --rounds 3

Prints markdown tables and the issue's targets (met or missed), and writes
``bench/results/hello-<UTC time>.{md,json,png}``.  The qdisc on ``lo`` is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_e2e as e2e  # noqa: E402
from bench_e2e import (BenchError, Refused, cold_pull, lazyd_stack, load, measure, md_table, parse_links,  # noqa: E402
                       plain_stack, record_paths, sh, signals_as_exit, startup_files, tmpfs, verify_prioritized, via)

from tests.e2e.images import with_parent_dirs  # noqa: E402
from tests.support.images import debian_python_layout, push  # noqa: E402
from tests.support.netem import throttled_proxy  # noqa: E402
from tests.support.registry import Registry, start_registry  # noqa: E402
from tests.support.tcpproxy import TCPProxy  # noqa: E402

IMPORTS30 = ("asyncio, email.mime.multipart, http.server, json, logging.handlers, xml.dom.minidom, sqlite3, "
             "decimal, unittest, argparse, csv, zipfile, tarfile, ssl, urllib.request, concurrent.futures, "
             "multiprocessing, pydoc, difflib, fractions, statistics, textwrap, shutil, tempfile, uuid, "
             "hashlib, base64, pathlib, pickle, gzip")
WORKLOADS: dict[str, tuple[str, ...]] = {
    "hello": ("python3", "-c", "print('hello')"),
    "ls": ("sh", "-c", "ls -R /etc >/dev/null && echo hello"),
    "heavy": ("python3", "-c", f"import {IMPORTS30}; print('hello')"),
}
MODES = ("legacy", "lazyd", "lazyd-opt", "lazyd-profile", "ref-opt", "ref-on-lazyd-opt")
# mode -> (system, image key); image keys ending in "@" are per workload.
PLAN = {"legacy": ("legacy", "plain"), "lazyd": ("lazyd", "lazyctl"), "lazyd-opt": ("lazyd", "lazyd-opt@"),
        "lazyd-profile": ("lazyd", "lazyctl"), "ref-opt": ("reference", "ref-opt@"),
        "ref-on-lazyd-opt": ("reference", "lazyd-opt@")}
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Run:
    workload: str
    link: str
    mode: str
    round: int
    pull: float
    first_output: float
    run: float
    bytes_first: int
    requests_first: int
    load: str

    @property
    def total(self) -> float:
        """Pull plus ``ctr run --rm`` to its exit: the issue's "total time to exit"."""
        return self.pull + self.run


def workload_reads(layout: Path, files: list[str], work: Path) -> int:
    """Bytes of the regular files the workload opens, in the unpacked image."""
    bundle = work / "reads-bundle"
    sh("umoci", "unpack", "--image", f"{layout}:latest", bundle)
    try:
        return sum((bundle / "rootfs" / f).stat().st_size for f in files)
    finally:
        shutil.rmtree(bundle)


def argv_json(cmd: tuple[str, ...]) -> tuple[str, str]:
    return json.dumps(list(cmd[:1])), json.dumps(list(cmd[1:]))


def prepare_common(reg: Registry, work: Path) -> tuple[Path, dict[str, str]]:
    """Push the plain image and its unprioritized lazyctl conversion; (OCI layout, refs)."""
    layout = debian_python_layout()
    refs = {"plain": push(f"oci:{layout}:latest", reg.host, "debian-python:plain")}
    refs["lazyctl"] = f"{reg.host}/debian-python:lazyctl"
    sh("lazyctl", "image", "convert", "--plain-http", "--json", refs["plain"], refs["lazyctl"], timeout=1800)
    parents = with_parent_dirs(layout, "latest", work / "parents-layout")
    refs["parents"] = push(parents, reg.host, "debian-python:parents")
    shutil.rmtree(work / "parents-layout")
    return layout, refs


def prepare_workload(reg: Registry, work: Path, refs: dict[str, str], wl: str, cmd: tuple[str, ...],
                     files: list[str]) -> tuple[dict[str, str], list[str]]:
    """Optimize for ``wl`` with both tools and push lazyd's profile of it for the unprioritized image."""
    entry, args = argv_json(cmd)
    out = {"lazyd-opt@": f"{reg.host}/debian-python:lazyd-opt-{wl}", "ref-opt@": f"{reg.host}/debian-python:ref-opt-{wl}"}
    notes = []
    root = work / f"prep-{wl}"
    with lazyd_stack(root, {"registry": f'{{plain_http = ["{reg.host}"]}}'}) as (cd, sock):
        t0 = time.monotonic()
        sh("lazyctl", "--socket", sock, "--address", cd.address, "image", "optimize", "--plain-http", "--json",
           "--entrypoint", entry, "--args", args, "--period", "20", refs["lazyctl"], out["lazyd-opt@"], timeout=1800)
        notes.append(f"{wl}: lazyctl image optimize {time.monotonic() - t0:.1f}s; "
                     + verify_prioritized("lazyd-opt", out["lazyd-opt@"], files))
        t0 = time.monotonic()
        sh("lazyctl", "--socket", sock, "--address", cd.address, "profile", "record", "--plain-http",
           "--entrypoint", entry, "--args", args, "--period", "20", refs["lazyctl"], timeout=1800)
        sh("lazyctl", "--socket", sock, "profile", "push", "--plain-http", refs["lazyctl"], timeout=600)
        notes.append(f"{wl}: lazyctl profile record + push {time.monotonic() - t0:.1f}s")
    shutil.rmtree(root, ignore_errors=True)
    with plain_stack(work / f"convert-{wl}") as cd:
        record = work / f"ref-record-{wl}.json"
        cd.ctr("content", "fetch", "--plain-http", refs["parents"], timeout=600)
        cd.ctr_remote("image", "optimize", "--oci", "--period", "20", "--record-out", str(record),
                      "--entrypoint", entry, "--args", args, refs["parents"], out["ref-opt@"], timeout=1800)
        cd.ctr("images", "push", "--plain-http", out["ref-opt@"], timeout=600)
        notes.append(f"{wl}: " + verify_prioritized("ref-opt", out["ref-opt@"], record_paths(record)))
    shutil.rmtree(work / f"convert-{wl}", ignore_errors=True)
    return out, notes


def measure_legacy(ref: str, proxy: TCPProxy, work: Path, n: int) -> tuple[float, float, float, int, int]:
    """Cold ``ctr pull`` (overlayfs) + ``ctr run --rm``: (pull, first output, run, bytes, requests)."""
    root = work / f"run{n}-legacy"
    try:
        with cold_pull("download", root, proxy, ref) as pulled:
            first, wall, nbytes, nreq = e2e._run_to_output(pulled.cd, ref, f"bench{n}", proxy,
                                                           snapshotter="overlayfs")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return pulled.seconds, first, wall, nbytes, nreq


def one_run(mode: str, wl: str, link: str, rnd: int, n: int, refs: dict[str, str], proxy: TCPProxy,
            work: Path) -> Run:
    system, key = PLAN[mode]
    ref = via(proxy, refs[key])
    ld = load()
    if system == "legacy":
        pull, first, wall, nbytes, nreq = measure_legacy(ref, proxy, work, n)
        return Run(wl, link, mode, rnd + 1, pull, first, wall, nbytes, nreq, ld)
    settings = {"profiles": '"registry"'} if mode == "lazyd-profile" else {}
    r = measure(system, mode, ref, proxy, work, n, link, rnd, settings)
    return Run(wl, link, mode, rnd + 1, r.pull, r.first_output, r.run, r.bytes_first, r.requests_first, ld)


def medians(runs: list[Run]) -> dict[tuple[str, str, str], dict[str, float]]:
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.workload, r.link, r.mode), []).append(r)
    return {k: {"n": len(v), "pull": statistics.median(r.pull for r in v),
                "first": statistics.median(r.first_output for r in v),
                "run": statistics.median(r.run for r in v), "total": statistics.median(r.total for r in v),
                "bytes": statistics.median(r.bytes_first for r in v),
                "req": statistics.median(r.requests_first for r in v)} for k, v in groups.items()}


def report(runs: list[Run], workloads: list[str], links: list[str], modes: list[str], reads: dict[str, int]) -> str:
    med = medians(runs)
    rows = []
    for wl in workloads:
        for link in links:
            for mode in modes:
                m = med.get((wl, link, mode))
                if m:
                    rows.append([wl, link, mode, str(m["n"]), f"{m['pull']:.2f}", f"{m['first']:.2f}",
                                 f"{m['run']:.2f}", f"{m['total']:.2f}", f"{m['bytes'] / 1e6:.2f}",
                                 f"{m['bytes'] / reads[wl]:.2f}", f"{m['req']:.0f}"])
    text = ("Medians (total = pull + `ctr run --rm` to its exit; MB and requests through the link until the first "
            "output line; fetched/read = those bytes ÷ the bytes of the files the workload opens)\n\n"
            + md_table(["workload", "link", "mode", "n", "pull s", "first output s", "ctr run s", "total s", "MB",
                        "fetched/read", "requests"], rows))
    return text + "\n\n" + targets(med, links, reads)


def targets(med: dict[tuple[str, str, str], dict[str, float]], links: list[str], reads: dict[str, int]) -> str:
    """The issue's targets, on the first link given (200mbit 10ms by default), python3 print."""
    link = links[0]
    def get(mode: str, wl: str = "hello") -> dict[str, float] | None:
        return med.get((wl, link, mode))
    rows = []

    def add(what: str, value: float | None, limit: float, unit: str) -> None:
        if value is None:
            rows.append([what, "not measured", f"≤ {limit}{unit}", "-"])
        else:
            rows.append([what, f"{value:.2f}{unit}", f"≤ {limit}{unit}", "met" if value <= limit else "MISSED"])
    opt, ref, prof = get("lazyd-opt"), get("ref-opt"), get("lazyd-profile")
    add("lazyd-opt total", opt and opt["total"], 0.45, " s")
    add("lazyd-opt ÷ ref-opt total", opt and ref and opt["total"] / ref["total"], 0.75, "×")
    add("lazyd-profile ÷ lazyd-opt total", prof and opt and prof["total"] / opt["total"], 1.1, "×")
    lazy = [m for m in ("lazyd", "lazyd-opt", "lazyd-profile", "ref-opt", "ref-on-lazyd-opt") if get(m)]
    worst = max(lazy, key=lambda m: get(m)["bytes"], default=None)  # type: ignore[index]
    add(f"fetched ÷ read, worst lazy mode ({worst})", worst and get(worst)["bytes"] / reads["hello"], 1.2, "×")
    return f"Targets ({link}, python3 print)\n\n" + md_table(["measure", "value", "target", ""], rows)


def chart(runs: list[Run], workloads: list[str], link: str, modes: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = medians(runs)
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.2 * len(workloads), 4.4), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        pulls = [med.get((wl, link, m), {}).get("pull", 0.0) for m in modes]
        runs_ = [med.get((wl, link, m), {}).get("run", 0.0) for m in modes]
        ax.bar(range(len(modes)), pulls, color="tab:gray", label="pull")
        ax.bar(range(len(modes)), runs_, bottom=pulls, color="tab:blue", label="ctr run --rm")
        for i, m in enumerate(modes):
            mb = med.get((wl, link, m), {}).get("bytes", 0.0) / 1e6
            ax.text(i, pulls[i] + runs_[i], f"{mb:.1f} MB", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(modes)), modes, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"{wl} ({link})")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    from tests.support.procs import prefer_this_interpreters_tools

    prefer_this_interpreters_tools()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", action="append", default=None, help="RATE:RTT_MS, repeatable (default 200mbit:10)")
    ap.add_argument("--rounds", type=int, default=3, help="cold runs of every mode per workload and link")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    workloads, modes = args.workloads.split(","), args.modes.split(",")
    if bad := [w for w in workloads if w not in WORKLOADS] + [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown workloads/modes {bad}")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    links = parse_links(args.link or ["200mbit:10"])
    link_names = [f"{rate} {rtt * 1000:.0f}ms" for rate, rtt in links]
    if os.geteuid() != 0:
        print("run as root (tc, mounts, containerd)", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    started = time.monotonic()
    runs: list[Run] = []
    refused: list[str] = []
    notes: list[str] = []
    reads: dict[str, int] = {}
    print(f"# load average at start: {load()} ({os.cpu_count()} cores)", flush=True)
    try:
        with signals_as_exit(), tmpfs("8g") as work, ExitStack() as stack:
            reg = start_registry(work, name="registry")
            stack.callback(reg.stop)
            layout, common = prepare_common(reg, work)
            n = 0
            for wl in workloads:
                cmd = WORKLOADS[wl]
                e2e.CMD = cmd  # bench_e2e's runner and strace use its module-level workload
                files = startup_files(layout, work)
                reads[wl] = workload_reads(layout, files, work)
                refs, wl_notes = prepare_workload(reg, work, common, wl, cmd, files)
                refs |= common
                notes += wl_notes + [f"{wl}: the workload opens {len(files)} regular files, "
                                     f"{reads[wl] / 1e6:.2f} MB"]
                for note in notes[-len(wl_notes) - 1:]:
                    print(f"# {note}", flush=True)
                for (rate, rtt), link in zip(links, link_names):
                    with throttled_proxy(reg.port, rate, rtt) as proxy:
                        for rnd in range(args.rounds):
                            order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
                            for mode in order:
                                n += 1
                                try:
                                    r = one_run(mode, wl, link, rnd, n, refs, proxy, work)
                                except Refused as err:
                                    refused.append(str(err))
                                    print(f"# REFUSED {err}", flush=True)
                                    continue
                                runs.append(r)
                                print(f"# {wl} {link} round {rnd + 1} {mode}: pull {r.pull:.2f}s first "
                                      f"{r.first_output:.2f}s run {r.run:.2f}s total {r.total:.2f}s "
                                      f"{r.bytes_first / 1e6:.2f} MB {r.requests_first} requests", flush=True)
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    text = (f"# bench_hello: {args.rounds} rounds, {stamp}\n\n{report(runs, workloads, link_names, modes, reads)}"
            f"\n\nbench wall time {(time.monotonic() - started) / 60:.1f} min; load average at the end {load()} "
            f"({os.cpu_count()} cores)\n" + "".join(f"\n# {note}" for note in notes)
            + "".join(f"\nREFUSED: {r}" for r in refused) + "\n")
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"hello-{stamp}"
    base.with_suffix(".md").write_text(text)
    base.with_suffix(".json").write_text(json.dumps([asdict(r) | {"total": r.total} for r in runs], indent=1))
    chart(runs, workloads, link_names[0], modes, base.with_suffix(".png"),
          f"bench_hello: median pull + ctr run, {args.rounds} rounds ({stamp})")
    print(f"# wrote {base}.md, .json and .png")
    return 1 if refused else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_hello: {exc}", file=sys.stderr)
        sys.exit(1)
