#!/usr/bin/env python3
"""HelloBench-style time to first output of ``python3 -c "print('hello')"`` in debian+python3.

Clients, each in a fresh containerd (and snapshotter) root on a tmpfs, pulling through a
throttled, byte-counting link (``tests/support/netem.py``: htb rate on the registry's port
plus a delay-line proxy for the RTT):

* ``baseline``: ``ctr images pull`` + ``ctr run`` on overlayfs (plain gzip image);
* ``stargz``:  the reference ``containerd-stargz-grpc`` + ``ctr-remote images rpull`` + ``ctr run``;
* ``lazyd``:   ``lazyd serve`` + ``lazyd snapshotter`` + ``lazyctl rpull`` + ``ctr run``.

The lazy clients run on eStargz images without and with prioritized files (the files python3
opens at start-up, found with strace in a chroot of the unpacked image).  Pull time is the
pull command's wall time, run time is from starting ``ctr run`` to the line ``hello``;
bytes and range GETs are counted at the proxy up to that line.  Rounds alternate the clients.

Run as root:  python3 bench/bench_e2e.py --link 200mbit:10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyd.mounttable import unmount_below  # noqa: E402
from tests.support.containerd import Containerd, start_containerd  # noqa: E402
from tests.support.images import debian_python_layout, push  # noqa: E402
from tests.support.lazyd import start_lazyd, start_snapshotter  # noqa: E402
from tests.support.netem import throttled_proxy  # noqa: E402
from tests.support.procs import Proc, wait_until  # noqa: E402
from tests.support.registry import Registry, start_registry  # noqa: E402
from tests.support.tcpproxy import TCPProxy  # noqa: E402

STARGZ_GRPC = "/opt/lazyd-interop/bin/containerd-stargz-grpc"
CMD = ("python3", "-c", "print('hello')")
WORKLOADS = {
    "hello": CMD,
    # Imports that open hundreds of small .pyc files: the small-file read path (issue 11).
    "heavy": ("python3", "-c", "import asyncio, email.mime.multipart, http.server, json, logging.handlers, "
              "xml.dom.minidom, sqlite3, decimal, unittest, argparse, csv, zipfile, tarfile, ssl, urllib.request, "
              "concurrent.futures, multiprocessing, pydoc; print(\"hello\")"),
}
PROXY_SNAPSHOTTER = "lazyd"  # the name start_containerd gives its proxy plugin (whichever daemon serves it)


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message has the command and its output."""


def sh(*argv: str | Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Run a command, return stdout, raise ``BenchError`` with its output on failure."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-3000:]}")
    return proc.stdout


def load() -> str:
    """The 1/5/15-minute load averages (the machine is shared)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextmanager
def tmpfs(size: str = "6g") -> Iterator[Path]:
    """A fresh tmpfs mounted on a temp dir (ext4 here makes unpack timings swing 2-4x)."""
    path = Path(tempfile.mkdtemp(prefix="lazyd-bench-"))
    sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        unmount_below(path)  # the tmpfs itself and anything left mounted in it
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def signals_as_exit() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so every ``finally`` (qdisc, mounts, daemons) runs."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- daemons ---------------------------------------------------------------------------------


@contextmanager
def lazyd_daemon(root: Path, settings: dict[str, str] | None = None) -> Iterator[Path]:
    """``lazyd serve`` with its state under ``root`` and top-level config ``settings`` (TOML values)."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "lazyd.toml"
    config.write_text("".join(f"{k} = {v}\n" for k, v in (settings or {}).items()))
    try:
        daemon = start_lazyd(root / "state", root / "lazyd.sock", root / "lazyd.log", config=config)
    except RuntimeError as err:
        raise BenchError(str(err)) from None
    try:
        yield daemon.socket
    finally:
        daemon.close(unmount=root)


@contextmanager
def lazyd_stack(root: Path, settings: dict[str, str] | None = None) -> Iterator[tuple[Containerd, Path]]:
    """``lazyd serve`` + ``lazyd snapshotter`` + containerd; yields (containerd, lazyd socket)."""
    with ExitStack() as stack:
        sock = stack.enter_context(lazyd_daemon(root / "lazyd", settings))
        snap_sock = root / "snapshotter.sock"
        try:
            snap = start_snapshotter(root / "snapshotter", snap_sock, sock, root / "snapshotter.log")
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        stack.callback(snap.stop)
        cd = start_containerd(root / "containerd", snapshotter_address=str(snap_sock))
        stack.callback(cd.stop)
        yield cd, sock


@contextmanager
def stargz_stack(root: Path) -> Iterator[Containerd]:
    """The reference ``containerd-stargz-grpc`` (empty config) + containerd, registered as proxy ``lazyd``."""
    with ExitStack() as stack:
        root.mkdir(parents=True, exist_ok=True)
        config = root / "stargz.toml"
        config.write_text("")
        sock = root / "stargz.sock"
        proc = Proc([STARGZ_GRPC, "-address", str(sock), "-root", str(root / "stargz"), "-config", str(config),
                     "-log-level", "info"], root / "stargz.log")

        def stop() -> None:
            proc.stop()
            unmount_below(root)
        stack.callback(stop)
        wait_until(lambda: sock.exists() or not proc.alive(), 30, "containerd-stargz-grpc socket")
        if not proc.alive():
            raise BenchError(f"containerd-stargz-grpc exited:\n{proc.log_text()[-3000:]}")
        cd = start_containerd(root / "containerd", snapshotter_address=str(sock))
        stack.callback(cd.stop)
        yield cd


@contextmanager
def plain_stack(root: Path) -> Iterator[Containerd]:
    with ExitStack() as stack:
        cd = start_containerd(root / "containerd")
        stack.callback(cd.stop)
        yield cd


# --- the workload's file list ----------------------------------------------------------------


def _resolve(rootfs: Path, path: str, depth: int = 0) -> str | None:
    """``path`` as seen inside ``rootfs`` with every symlink resolved inside it; None if absent."""
    if depth > 40:
        return None
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    for i, part in enumerate(parts):
        if part == "..":
            if done:
                done.pop()
            continue
        here = rootfs.joinpath(*done, part)
        if here.is_symlink():
            target = os.readlink(here)
            base = "/" if target.startswith("/") else "/" + "/".join(done)
            rest = "/".join(parts[i + 1:])
            return _resolve(rootfs, os.path.join(base, target, rest), depth + 1)
        if not here.exists() and not here.is_symlink():
            return None
        done.append(part)
    return "/".join(done)


def _elf_interpreter(path: Path) -> str | None:
    """PT_INTERP of a 64-bit little-endian ELF file (what the kernel loads before ld.so logs anything)."""
    data = path.read_bytes()[:1 << 16]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        ptype, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if ptype == 3:
            off, = struct.unpack_from("<Q", data, phoff + i * phentsize + 8)
            size, = struct.unpack_from("<Q", data, phoff + i * phentsize + 32)
            return data[off:off + size].rstrip(b"\0").decode()
    return None


def startup_files(layout: Path, work: Path) -> list[str]:
    """Regular files the workload reads at start-up, from ``strace`` of it in a chroot of the image."""
    bundle = work / "bundle"
    sh("umoci", "unpack", "--image", f"{layout}:latest", bundle)
    rootfs = bundle / "rootfs"
    trace = work / "strace.txt"
    sh("strace", "-f", "-qq", "-o", trace, "-e", "trace=openat,open,execve", "chroot", rootfs, *CMD)
    files: list[str] = []
    seen: set[str] = set()

    def add(raw: str, executed: bool) -> None:
        real = _resolve(rootfs, raw)
        if real and real not in seen and (rootfs / real).is_file() and not (rootfs / real).is_symlink():
            seen.add(real)
            files.append(real)
            if executed:
                interp = _elf_interpreter(rootfs / real)
                if interp:
                    add(interp, False)

    execs = 0
    for line in trace.read_text().splitlines():
        m = re.search(r'(execve|openat|open)\((?:AT_FDCWD, )?"([^"]+)".*= (-?\d+)', line)
        if not m or int(m.group(3)) < 0:
            continue
        kind, raw = m.group(1), m.group(2)
        if kind == "execve":
            execs += 1
        if execs < 2:
            continue  # the host's chroot binary and what it opens are not part of the workload
        if kind == "execve" or raw.startswith("/"):
            add(raw, kind == "execve")
    shutil.rmtree(bundle)
    return files


# --- images ----------------------------------------------------------------------------------


@dataclass
class Images:
    plain: str
    lazyd: str
    lazyd_prio: str
    stargz: str
    stargz_prio: str | None
    notes: list[str]


def prepare_images(reg: Registry, work: Path, files: list[str], skip_optimize: bool) -> Images:
    """Push the plain image and make the eStargz variants, all under ``debian-python:*`` on ``reg``."""
    notes: list[str] = []
    layout = debian_python_layout()
    plain = push(f"oci:{layout}:latest", reg.host, "debian-python:plain")
    prio_file = work / "prioritized.txt"
    prio_file.write_text("".join(f"{f}\n" for f in files))
    lazyd, lazyd_prio = f"{reg.host}/debian-python:lazyd", f"{reg.host}/debian-python:lazyd-prio"
    sh("lazyctl", "image", "convert", "--plain-http", "--json", plain, lazyd)
    sh("lazyctl", "image", "convert", "--plain-http", "--json", "--prioritized", prio_file, plain, lazyd_prio)
    stargz, stargz_prio = f"{reg.host}/debian-python:stargz", f"{reg.host}/debian-python:stargz-prio"
    with plain_stack(work / "convert") as cd:
        cd.ctr("images", "pull", "--plain-http", plain)
        cd.ctr_remote("image", "convert", "--estargz", "--oci", plain, stargz, timeout=900)
        cd.ctr("images", "push", "--plain-http", stargz)
        record = work / "record.json"
        prio_ref: str | None = None
        if not skip_optimize:
            opt = cd.ctr_remote("image", "optimize", "--oci", "--period", "5", "--record-out", str(record),
                                "--entrypoint", json.dumps([CMD[0]]), "--args", json.dumps(list(CMD[1:])),
                                plain, stargz_prio, check=False, timeout=900)
            if opt.returncode == 0:
                cd.ctr("images", "push", "--plain-http", stargz_prio)
                prio_ref = stargz_prio
                notes.append("stargz-prio: made by `ctr-remote image optimize`")
            else:
                err = (opt.stderr.strip().splitlines() or ["?"])[-1]
                notes.append(f"`ctr-remote image optimize` failed: {err[:300]}")
        if prio_ref is None:
            # Same list as lazyd's, in optimize's record format, through convert --estargz-record-in.
            record.write_text("".join(json.dumps({"path": f}) + "\n" for f in files))
            conv = cd.ctr_remote("image", "convert", "--estargz", "--oci", "--estargz-record-in", str(record),
                                 plain, stargz_prio, check=False, timeout=900)
            if conv.returncode == 0:
                cd.ctr("images", "push", "--plain-http", stargz_prio)
                prio_ref = stargz_prio
                notes.append("stargz-prio: `ctr-remote image convert --estargz --oci --estargz-record-in` "
                             "with the strace list")
            else:
                err = (conv.stderr.strip().splitlines() or ["?"])[-1]
                notes.append(f"`ctr-remote image convert --estargz-record-in` failed too: {err[:300]}")
    return Images(plain, lazyd, lazyd_prio, stargz, prio_ref, notes)


# --- one measured run ------------------------------------------------------------------------


@dataclass
class Result:
    client: str
    image: str
    pull: float
    run: float
    bytes_down: int
    pull_bytes: int
    range_gets: int
    load: str

    @property
    def total(self) -> float:
        return self.pull + self.run


def via(proxy: TCPProxy, ref: str) -> str:
    """``ref`` with its registry host replaced by the proxy's."""
    return proxy.host + "/" + ref.split("/", 1)[1]


def _time_to_hello(cd: Containerd, ref: str, name: str, snapshotter: str | None) -> float:
    argv = ["ctr", "--address", cd.address, "--namespace", "default", "run", "--rm"]
    if snapshotter:
        argv += ["--snapshotter", snapshotter]
    argv += [ref, name, *CMD]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "hello" and seen is None:
            seen = time.monotonic() - start
    _, err = proc.communicate(timeout=120)
    if seen is None or proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode} without 'hello':\n{err[-3000:]}")
    return seen


def measure(client: str, image_label: str, ref: str, proxy: TCPProxy, work: Path, n: int,
            settings: dict[str, str] | None = None) -> Result:
    """One cold pull + run of ``ref`` (a ref on the proxy) by ``client`` in a fresh root under ``work``."""
    root = work / f"run{n}-{client}-{image_label}"
    root.mkdir()
    name = f"hello{n}"
    ld = load()
    try:
        if client == "baseline":
            with plain_stack(root) as cd:
                proxy.reset()
                t0 = time.monotonic()
                cd.ctr("images", "pull", "--plain-http", ref)
                pull = time.monotonic() - t0
                pull_bytes = proxy.bytes_down
                run = _time_to_hello(cd, ref, name, None)
                down, ranges = proxy.bytes_down, len(proxy.range_requests())
        elif client == "stargz":
            with stargz_stack(root) as cd:
                proxy.reset()
                t0 = time.monotonic()
                cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", PROXY_SNAPSHOTTER, ref)
                pull = time.monotonic() - t0
                pull_bytes = proxy.bytes_down
                run = _time_to_hello(cd, ref, name, PROXY_SNAPSHOTTER)
                down, ranges = proxy.bytes_down, len(proxy.range_requests())
        elif client == "lazyd":
            # What --plain-http tells the other clients: no TLS probe of the registry first.
            daemon_settings = {**(settings or {}), "registry": f'{{plain_http = ["{proxy.host}"]}}'}
            with lazyd_stack(root, daemon_settings) as (cd, sock):
                proxy.reset()
                t0 = time.monotonic()
                sh("lazyctl", "rpull", "--plain-http", "--address", cd.address, "--snapshotter", PROXY_SNAPSHOTTER,
                   "--socket", sock, ref)
                pull = time.monotonic() - t0
                pull_bytes = proxy.bytes_down
                run = _time_to_hello(cd, ref, name, PROXY_SNAPSHOTTER)
                down, ranges = proxy.bytes_down, len(proxy.range_requests())
        else:
            raise BenchError(f"unknown client {client!r}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    label = client + ("[" + ",".join(f"{k}={v}" for k, v in settings.items()) + "]" if settings else "")
    return Result(label, image_label, pull, run, down, pull_bytes, ranges, ld)


# --- main ------------------------------------------------------------------------------------


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*r) for r in rows)])


def summarize(results: list[Result], title: str) -> str:
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.client, r.image), []).append(r)
    med: dict[tuple[str, str], float] = {k: statistics.median(x.total for x in v) for k, v in groups.items()}
    base = med.get(("baseline", "plain"))
    ref_unopt = med.get(("stargz", "stargz"))
    ref_opt = med.get(("stargz", "stargz-prio"))
    rows = []
    for (client, image), rs in groups.items():
        tot = med[(client, image)]
        ref = ref_opt if image.endswith("prio") and ref_opt else ref_unopt
        rows.append([client, image, str(len(rs)),
                     f"{statistics.median(r.pull for r in rs):.2f}", f"{statistics.median(r.run for r in rs):.2f}",
                     f"{tot:.2f}", f"{statistics.median(r.bytes_down for r in rs) / 1e6:.2f}",
                     f"{statistics.median(r.pull_bytes for r in rs) / 1e6:.2f}",
                     f"{statistics.median(r.range_gets for r in rs):.0f}",
                     f"{tot / base:.3f}" if base else "-", f"{tot / ref:.2f}" if ref else "-",
                     " | ".join(r.load for r in rs)])
    header = ["client", "image", "n", "pull s", "run s", "total s", "fetched MB", "in pull MB", "range GETs", "x baseline",
              "x stargz", "load avg (1/5/15) per run"]
    return f"{title}\n{table(rows, header)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", action="append", default=None,
                    help="RATE:RTT_MS, repeatable (default 200mbit:10 and 50mbit:40)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every client per link (alternated)")
    ap.add_argument("--clients", default="baseline,stargz,stargz-prio,lazyd,lazyd-prio",
                    help="comma-separated subset of baseline,stargz,stargz-prio,lazyd,lazyd-prio,"
                         "lazyd-nobg,lazyd-prio-nobg (background_fetch = false),lazyd-prio-wait "
                         "(prefetch_wait = true),lazyd-on-stargz,stargz-on-lazyd")
    ap.add_argument("--skip-optimize", action="store_true", help="do not try `ctr-remote image optimize`")
    ap.add_argument("--json", type=Path, help="also write every run as JSON here")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="hello",
                    help="hello: print('hello'); heavy: import 18 stdlib modules, then print hello")
    ap.add_argument("--lazyd-set", action="append", default=[], metavar="KEY=TOML",
                    help="extra top-level lazyd config for every lazyd client, repeatable")
    args = ap.parse_args()
    global CMD
    CMD = WORKLOADS[args.workload]
    extra = dict(kv.split("=", 1) for kv in args.lazyd_set)
    if os.geteuid() != 0:
        print("run as root (tc, mounts, containerd)", file=sys.stderr)
        return 2
    links = [(l.split(":")[0], float(l.split(":")[1]) / 1000) for l in (args.link or ["200mbit:10", "50mbit:40"])]
    wanted = args.clients.split(",")
    all_results: list[Result] = []
    with signals_as_exit(), tmpfs() as work, ExitStack() as stack:
        reg = start_registry(work, name="registry")
        stack.callback(reg.stop)
        t0 = time.monotonic()
        files = startup_files(debian_python_layout(), work)
        imgs = prepare_images(reg, work, files, args.skip_optimize)
        print(f"# images ready in {time.monotonic() - t0:.0f}s; {len(files)} start-up files prioritized")
        for note in imgs.notes:
            print(f"# {note}")
        nobg = {"background_fetch": "false"}
        plan: dict[str, tuple[str, str, str | None, dict[str, str] | None]] = {
            "baseline": ("baseline", "plain", imgs.plain, None),
            "stargz": ("stargz", "stargz", imgs.stargz, None),
            "stargz-prio": ("stargz", "stargz-prio", imgs.stargz_prio, None),
            "lazyd": ("lazyd", "lazyd", imgs.lazyd, None),
            "lazyd-prio": ("lazyd", "lazyd-prio", imgs.lazyd_prio, None),
            "lazyd-nobg": ("lazyd", "lazyd", imgs.lazyd, nobg),
            "lazyd-prio-nobg": ("lazyd", "lazyd-prio", imgs.lazyd_prio, nobg),
            "lazyd-prio-wait": ("lazyd", "lazyd-prio", imgs.lazyd_prio, {"prefetch_wait": "true"}),
            "lazyd-on-stargz": ("lazyd", "stargz", imgs.stargz, None),
            "stargz-on-lazyd": ("stargz", "lazyd", imgs.lazyd, None),
        }
        n = 0
        for rate, rtt in links:
            results: list[Result] = []
            with throttled_proxy(reg.port, rate, rtt) as proxy:
                for rnd in range(args.rounds):
                    order = wanted if rnd % 2 == 0 else list(reversed(wanted))
                    for key in order:
                        client, label, ref, settings = plan[key]
                        if client == "lazyd" and extra:
                            settings = {**(settings or {}), **extra}
                        if ref is None:
                            print(f"# skip {key}: no image", flush=True)
                            continue
                        n += 1
                        try:
                            r = measure(client, label, via(proxy, ref), proxy, work, n, settings)
                        except (BenchError, subprocess.SubprocessError, TimeoutError, RuntimeError) as err:
                            print(f"# {key} FAILED: {str(err)[:1500]}", flush=True)
                            continue
                        print(f"# {rate} {rtt * 1000:.0f}ms {key}: pull {r.pull:.2f}s run {r.run:.2f}s "
                              f"total {r.total:.2f}s {r.bytes_down / 1e6:.2f} MB ({r.pull_bytes / 1e6:.2f} in pull) "
                              f"{r.range_gets} ranges "
                              f"load {r.load}", flush=True)
                        results.append(r)
            all_results += results
            print(summarize(results, f"\n## {rate}, {rtt * 1000:.0f} ms RTT (medians; ratios are of totals; "
                                     "x stargz compares with the reference on the same kind of image)"))
            print()
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"total": r.total} for r in all_results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
