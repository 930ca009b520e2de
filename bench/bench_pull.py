#!/usr/bin/env python3
"""Where the time of ``lazyctl rpull`` goes (the pull step of bench/bench_e2e.py).

Each round starts a fresh ``lazyd serve`` + ``lazyd snapshotter`` + containerd 1.6 (all state
in a new directory) and pulls the debian+python3 eStargz image from a local registry,
optionally through a delay-line proxy (``--rtt``; no qdiscs). It reports:

* ``start-up``: interpreter + imports of ``lazyctl`` for ``--help`` and for the rpull path
  (best of 5 runs, each a new interpreter, minus a bare ``python3 -c pass``);
* ``wall``: ``lazyctl rpull`` as a subprocess, as bench/bench_e2e.py times it;
* ``trace``: the same pull run in this process (imports already paid), with the time of
  lazyd's ``resolve`` and every containerd call; snapshot Prepare of a lazily mounted layer
  includes the snapshotter's lazyd ``mount`` (footer + TOC fetch + FUSE mount).

With ``--link RATE:RTT_MS`` (repeatable) it instead compares pull wall times on a throttled
link (htb on the registry port + delay-line proxy, ``tests/support/netem.py``), rounds
alternating the clients, each in a fresh stack on a tmpfs, all on the same eStargz image:

* ``stargz``: the reference ``containerd-stargz-grpc`` + ``ctr-remote images rpull``;
* ``lazyd``: ``lazyd serve`` + ``lazyd snapshotter`` + ``lazyctl rpull`` (``--lazyctl``, default
  the one on PATH) of this tree;
* ``lazyd-base``: the same, with every lazyd process and lazyctl running the tree ``--base``
  (e.g. ``git archive <commit> | tar -x -C DIR``) through PYTHONPATH: "before" in the same run.

Run as root:  python3 bench/bench_pull.py --rounds 5 [--rtt 10]
              python3 bench/bench_pull.py --rounds 5 --link 200mbit:10 --link 50mbit:40 [--base DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyd.containerd.client import ContainerdClient  # noqa: E402
from lazyd.containerd.pull import PullResult, RemotePuller  # noqa: E402
from lazyd.containerd.source import LazydSource  # noqa: E402
from lazyd.registry import RegistryConfig  # noqa: E402
from lazyd.registry.reference import Reference  # noqa: E402
from tests.e2e.images import cached_estargz, lazyd_builder  # noqa: E402
from tests.support.containerd import Containerd, start_containerd  # noqa: E402
from tests.support.images import debian_python_layout, push  # noqa: E402
from tests.support.lazyd import start_lazyd, start_snapshotter  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402
from tests.support.tcpproxy import TCPProxy  # noqa: E402

SNAPSHOTTER = "lazyd"  # the proxy plugin name start_containerd registers


@contextmanager
def lazyd_stack(root: Path, log_level: str, registry: str) -> Iterator[tuple[Containerd, Path]]:
    """``lazyd serve`` + ``lazyd snapshotter`` + containerd under ``root``; yields (containerd, lazyd socket).

    lazyd talks plain HTTP to ``registry`` without a TLS probe first (what ``--plain-http`` does)."""
    with ExitStack() as stack:
        root.mkdir(parents=True)
        config = root / "lazyd.toml"
        config.write_text(f'log_level = "{log_level}"\n[registry]\nplain_http = ["{registry}"]\n')
        daemon = start_lazyd(root / "lazyd", root / "lazyd.sock", root / "lazyd.log", config=config)
        stack.callback(daemon.close, unmount=root)
        snap_sock = root / "snapshotter.sock"
        snap = start_snapshotter(root / "snapshotter", snap_sock, daemon.socket, root / "snapshotter.log",
                                 ("--log-level", log_level))
        stack.callback(snap.stop)
        cd = start_containerd(root / "containerd", snapshotter_address=str(snap_sock))
        stack.callback(cd.stop)
        yield cd, daemon.socket


def best_of(argv: list[str], n: int = 5) -> float:
    """Fastest wall time of ``n`` runs of ``argv``."""
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.monotonic() - t0)
    return min(times)


def startup_times() -> dict[str, float]:
    """Interpreter and import cost of lazyctl, net of a bare interpreter."""
    bare = best_of([sys.executable, "-c", "pass"])
    thin = ("import lazyd.cli.lazyctl as m, lazyd.api.wire, select, socket; "
            "m.build_parser().parse_args(['rpull', 'r/x:1'])")
    in_process = ("import lazyd.cli.lazyctl as m, lazyd.cli.rpull_cmd, lazyd.containerd.pull, lazyd.containerd.client, "
                  "lazyd.containerd.source, asyncio; m.build_parser().parse_args(['rpull', 'r/x:1'])")
    return {
        "python3 -c pass": bare,
        "lazyctl --help": best_of([sys.executable, "-m", "lazyd.cli.lazyctl", "--help"]),
        "lazyctl rpull --help": best_of([sys.executable, "-m", "lazyd.cli.lazyctl", "rpull", "--help"]),
        "imports: rpull through lazyd": best_of([sys.executable, "-c", thin]),
        "imports: rpull in-process": best_of([sys.executable, "-c", in_process]),
    }


class Trace:
    """Durations of named steps; concurrent steps each count their own wall time."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float, float]] = []  # (name, start, end)

    def add(self, name: str, start: float, end: float) -> None:
        self.steps.append((name, start, end))


def _traced_call(trace: Trace, original: Any) -> Any:
    async def call(what: str, method: Any, request: object, timeout: float | None = None) -> object:
        t0 = time.monotonic()
        try:
            return await original(what, method, request, timeout)
        finally:
            trace.add("containerd " + " ".join(what.split()[:2]), t0, time.monotonic())
    return call


def _traced(trace: Trace, name: str, original: Any) -> Any:
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await original(*args, **kwargs)
        finally:
            trace.add(name, t0, time.monotonic())
    return wrapped


async def traced_pull(ref: str, address: str, lazyd_socket: Path) -> tuple[PullResult, Trace, float]:
    """Pull ``ref`` in this process as ``lazyctl rpull`` does, recording every containerd call."""
    trace = Trace()
    t0 = time.monotonic()
    cfg = RegistryConfig(plain_http=[Reference.parse(ref).registry])
    async with LazydSource(str(lazyd_socket), cfg) as source, ContainerdClient(address) as containerd:
        containerd._call = _traced_call(trace, containerd._call)  # type: ignore[method-assign]
        containerd.write_content = _traced(trace, "containerd content write", containerd.write_content)  # type: ignore[method-assign]
        source.resolve = _traced(trace, "lazyd resolve (manifest + config)", source.resolve)  # type: ignore[method-assign]
        result = await RemotePuller(containerd, source, SNAPSHOTTER).pull(Reference.parse(ref))
    return result, trace, time.monotonic() - t0


def summarize_trace(trace: Trace, start: float) -> list[tuple[str, int, float, float]]:
    """(step, count, total seconds, time of the last end after ``start``) per step name."""
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, s, e in trace.steps:
        groups[name].append((s, e))
    return sorted(((name, len(v), sum(e - s for s, e in v), max(e for _, e in v) - start)
                   for name, v in groups.items()), key=lambda r: r[3])


@contextmanager
def tree(base: Path | None) -> Iterator[None]:
    """Run the lazyd processes started inside with the lazyd package of ``base`` (None: this tree)."""
    old = os.environ.get("PYTHONPATH")
    if base is not None:
        os.environ["PYTHONPATH"] = str(base)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def compare_once(client: str, ref: str, proxy_host: str, work: Path, lazyctl: str, base: Path | None) -> float:
    """Wall time of one cold pull of ``ref`` by ``client`` in a fresh stack under ``work``."""
    import bench_e2e as e2e  # the reference stack lives there

    if client == "stargz":
        with e2e.stargz_stack(work) as (cd, _daemon):
            t0 = time.monotonic()
            cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", e2e.PROXY_SNAPSHOTTER, ref)
            return time.monotonic() - t0
    with tree(base if client == "lazyd-base" else None):
        settings = {"registry": f'{{plain_http = ["{proxy_host}"]}}'}
        with e2e.lazyd_stack(work, settings) as (cd, sock):
            t0 = time.monotonic()
            out = subprocess.run([lazyctl, "rpull", "--plain-http", "--json", "--address", cd.address, "--snapshotter",
                                  e2e.PROXY_SNAPSHOTTER, "--socket", str(sock), ref],
                                 capture_output=True, text=True, timeout=300)
            wall = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{client}: lazyctl rpull failed:\n{out.stderr[-3000:]}")
    modes = [layer["mode"] for layer in json.loads(out.stdout)["layers"]]
    if modes != ["lazy"] * len(modes):
        raise RuntimeError(f"{client}: layers were not all mounted lazily: {modes}")
    return wall


def compare(args: argparse.Namespace) -> int:
    """Pull wall times of the reference and lazyd (and lazyd's ``--base`` tree) on throttled links."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_e2e as e2e
    from tests.support.netem import throttled_proxy
    from tests.support.registry import start_registry

    clients = ["stargz", "lazyd"] + (["lazyd-base"] if args.base and not args.cri else [])
    lazyctl = args.lazyctl or shutil.which("lazyctl") or "lazyctl"
    print(f"lazyctl: {lazyctl}; base tree: {args.base}")
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    with e2e.tmpfs() as work, ExitStack() as stack:
        reg = start_registry(work / "registry-root")
        stack.callback(reg.stop)
        src = cached_estargz(debian_python_layout(), "latest", lazyd_builder)
        push(src, reg.host, "debian-python:esgz")
        for link in args.link:
            rate, rtt = link.split(":")
            with throttled_proxy(reg.port, rate, float(rtt) / 1000) as proxy:
                ref = f"{proxy.host}/debian-python:esgz"
                for n in range(args.rounds):
                    order = clients[n % len(clients):] + clients[:n % len(clients)]  # rotate who goes first
                    for client in order:
                        root = work / f"{link.replace(':', '-')}-{n}-{client}"
                        if args.cri:
                            wall, run = cri_once(client, ref, proxy.host, root)
                            times[(link, client + " run")].append(run)
                        else:
                            wall = compare_once(client, ref, proxy.host, root, lazyctl, args.base)
                        shutil.rmtree(root, ignore_errors=True)
                        times[(link, client)].append(wall)
                        extra = f", ctr run to hello {run:.3f}s" if args.cri else ""
                        print(f"# {link} round {n} {client:10s} {wall:.3f}s{extra} (load {e2e.load()})", flush=True)
    what = "CRI PullImage" if args.cri else "pull wall time"
    print(f"\n## {what}, median of {args.rounds} (min-max), s")
    print(f"{'link':14s} " + " ".join(f"{c:>22s}" for c in clients) + "   lazyd/stargz" +
          ("   base/stargz" if args.base else ""))
    for link in args.link:
        med = {c: statistics.median(times[(link, c)]) for c in clients}
        cells = " ".join(f"{med[c]:6.3f} ({min(times[(link, c)]):.3f}-{max(times[(link, c)]):.3f})".rjust(22)
                         for c in clients)
        ratios = f"   {med['lazyd'] / med['stargz']:12.2f}" + (f"   {med['lazyd-base'] / med['stargz']:11.2f}"
                                                             if args.base else "")
        print(f"{link:14s} {cells}{ratios}")
        if args.cri:
            runs = {c: statistics.median(times[(link, c + " run")]) for c in clients}
            print(f"{'':14s} then ctr run to hello: " + ", ".join(f"{c} {runs[c]:.3f}" for c in clients))
    return 0


@contextmanager
def cri_stack(client: str, work: Path, proxy_host: str) -> Iterator[Containerd]:
    """containerd with its CRI plugin unpacking into lazyd's snapshotter or the reference's."""
    import bench_e2e as e2e
    from tests.support.procs import Proc, wait_until

    with ExitStack() as stack:
        work.mkdir(parents=True)
        if client == "stargz":
            (work / "stargz.toml").write_text("")
            sock = work / "stargz.sock"
            proc = Proc([e2e.STARGZ_GRPC, "-address", str(sock), "-root", str(work / "stargz"), "-config",
                         str(work / "stargz.toml"), "-log-level", "info"], work / "stargz.log")
            stack.callback(lambda: (proc.stop(), e2e.unmount_below(work)))
            wait_until(lambda: sock.exists() or not proc.alive(), 30, "containerd-stargz-grpc socket")
        else:
            settings = {"registry": f'{{plain_http = ["{proxy_host}"]}}'}
            lazyd_sock = stack.enter_context(e2e.lazyd_daemon(work / "lazyd", settings))
            sock = work / "snapshotter.sock"
            snap = start_snapshotter(work / "snapshotter", sock, lazyd_sock, work / "snapshotter.log")
            stack.callback(snap.stop)
        cd = start_containerd(work / "containerd", snapshotter_address=str(sock), cri=True,
                              cri_snapshotter=e2e.PROXY_SNAPSHOTTER)
        stack.callback(cd.stop)
        yield cd


def cri_once(client: str, ref: str, proxy_host: str, work: Path) -> tuple[float, float]:
    """(PullImage, ``ctr run`` to ``hello``) seconds through CRI in a fresh stack: no lazyctl process."""
    import bench_e2e as e2e
    from tests.e2e.cri.client import CRIImageClient

    with cri_stack(client, work, proxy_host) as cd:
        with CRIImageClient(cd.address) as cri:
            t0 = time.monotonic()
            cri.pull(ref)
            pull = time.monotonic() - t0
        argv = ["ctr", "--address", cd.address, "--namespace", "k8s.io", "run", "--rm", "--snapshotter",
                e2e.PROXY_SNAPSHOTTER, ref, "hello", *e2e.CMD]
        t0 = time.monotonic()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        run = time.monotonic() - t0
        if out.stdout.strip() != "hello":
            raise RuntimeError(f"{client}: ctr run printed {out.stdout!r}: {out.stderr[-2000:]}")
    return pull, run


def main() -> int:
    from tests.support.procs import prefer_this_interpreters_tools

    prefer_this_interpreters_tools()  # lazyctl/lazyd by name: this interpreter's (the venv's)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--link", action="append", help="RATE:RTT_MS: compare with the reference on this link "
                    "(repeatable; needs tc)")
    ap.add_argument("--base", type=Path, help="with --link: also run this lazyd tree (the 'before')")
    ap.add_argument("--lazyctl", help="with --link: the lazyctl to run (default: the one on PATH)")
    ap.add_argument("--cri", action="store_true", help="with --link: pull through containerd's CRI PullImage "
                    "(tests/e2e/cri client, no lazyctl process), then time `ctr run` to hello")
    ap.add_argument("--rtt", type=float, default=0.0, help="round-trip time to the registry in ms (delay-line proxy)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info"], help="of lazyd serve and the snapshotter")
    ap.add_argument("--keep-logs", type=Path, help="copy each round's daemon logs here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (mounts, containerd)", file=sys.stderr)
        return 2
    if args.link:
        return compare(args)
    print("## start-up (best of 5, s)")
    for name, secs in startup_times().items():
        print(f"{name:32s} {secs:.3f}")
    walls: list[float] = []
    traced: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lazyd-bench-pull-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        reg = stack.enter_context(running_registry(work / "registry-root"))
        src = cached_estargz(debian_python_layout(), "latest", lazyd_builder)
        push(src, reg.host, "debian-python:esgz")
        proxy = stack.enter_context(TCPProxy(reg.port, latency=args.rtt / 2000))
        ref = f"{proxy.host}/debian-python:esgz"
        for n in range(args.rounds):
            with lazyd_stack(work / f"wall{n}", args.log_level, proxy.host) as (cd, sock):
                t0 = time.monotonic()
                out = subprocess.run(["lazyctl", "rpull", "--plain-http", "--json", "--address", cd.address,
                                      "--snapshotter", SNAPSHOTTER, "--socket", str(sock), ref],
                                     capture_output=True, text=True, timeout=300)
                wall = time.monotonic() - t0
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    return 1
                res = json.loads(out.stdout)
                walls.append(wall)
                layers = " ".join(f"{layer['mode']}:{layer['seconds']:.2f}s" for layer in res["layers"])
                print(f"# round {n}: wall {wall:.3f}s (pull inside {res['seconds']:.3f}s; layers {layers})")
                if args.keep_logs:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    for log in ("lazyd.log", "snapshotter.log"):
                        (args.keep_logs / f"wall{n}-{log}").write_bytes((work / f"wall{n}" / log).read_bytes())
            with lazyd_stack(work / f"trace{n}", args.log_level, proxy.host) as (cd, sock):
                start = time.monotonic()
                result, trace, secs = asyncio.run(traced_pull(ref, cd.address, sock))
                traced.append(secs)
                print(f"# round {n}: in-process pull {secs:.3f}s "
                      f"({', '.join(f'{layer.mode}' for layer in result.layers)})")
                print(f"  {'step':44s} {'n':>3s} {'sum s':>7s} {'ends at s':>9s}")
                for name, count, total, end in summarize_trace(trace, start):
                    print(f"  {name:44s} {count:3d} {total:7.3f} {end:9.3f}")
    print(f"\n## lazyctl rpull wall: median {statistics.median(walls):.3f}s (min {min(walls):.3f}s, "
          f"n={len(walls)}, rtt {args.rtt:g} ms); in-process pull median {statistics.median(traced):.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
