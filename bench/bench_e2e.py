#!/usr/bin/env python3
"""HelloBench-style end to end: lazyd and the reference stargz-snapshotter on the same eStargz images.

Every image variant is pulled and run by BOTH systems, on the same blobs:

* ``lazyctl``:       ``lazyctl image convert`` of the plain debian+python3 image;
* ``lazyctl-prio``:  the same with ``--prioritized`` (the files the workload opens, from ``strace``
  of it in a chroot of the unpacked image);
* ``ctr-remote``:    ``ctr-remote image convert --estargz --oci``;
* ``optimize``:      ``ctr-remote image optimize --oci`` (it runs the workload and records what it
  reads), made from a copy of the image whose upper layers carry their parent directories
  (``tests.e2e.images.with_parent_dirs``): on umoci's layers, without them, the reference drops
  every recorded file under a parent it does not find in the same layer.

The systems: ``lazyd`` (``lazyd serve`` + ``lazyd snapshotter`` + ``lazyctl rpull``) and
``reference`` (``containerd-stargz-grpc`` + ``ctr-remote images rpull``), each in a fresh
containerd root on a tmpfs for every run, pulling through a throttled, request-counting link
(``tests/support/netem.py``: htb rate on the registry's port + a delay-line proxy for the RTT).

Checks before anything is timed: each prioritized variant's TOCs hold every listed file before
the ``.prefetch.landmark`` (for ``optimize``: every path of its ``--record-out`` record; the
count is printed), else the bench stops. After every run, a run in which any layer was not
mounted lazily is refused (named, left out of the tables, exit status 1): for lazyd from
``rpull --json``'s per-layer modes and ``lazyctl status --json``; for the reference from its FUSE
mounts and ``remote-snapshot-prepared`` log lines; for both, no layer blob in containerd's
content store (``tests/interop/consumers.py``).

Per run: pull wall time; time from starting ``ctr run --rm`` to its first output line; wall time
of ``ctr run --rm``; bytes and HTTP requests through the proxy from the start of the pull to the
first output line. Rounds interleave the variants and alternate which system goes first.
Prints markdown tables (medians, lazyd / reference ratios per variant and link) and writes
``bench/results/e2e-<workload>-<UTC time>.{md,json,png}``.

From a clean clone, as root (``scripts/setup`` installs everything, matplotlib comes with the
venv's test extras):

    scripts/setup && /opt/lazyd/venv/bin/python bench/bench_e2e.py --rounds 3

Options: ``--link 200mbit:10`` (repeatable; default both 200mbit:10 and 50mbit:40),
``--workload heavy`` (18 stdlib imports; default hello), ``--variants lazyctl,optimize``.
The qdisc on ``lo`` is removed on exit, also on errors and SIGTERM.
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
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyd.mounttable import unmount_below  # noqa: E402
from tests.e2e.images import with_parent_dirs  # noqa: E402
from tests.interop.consumers import content_digests, fuse_mounts_below, lazyd_fallbacks, stargz_report  # noqa: E402
from tests.interop.oci import raw_toc, read_image  # noqa: E402
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
# What the workload sees under `ctr run`: the image's Env (PATH) plus the HOME that runc sets.
CONTAINER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
PROXY_SNAPSHOTTER = "lazyd"  # the name start_containerd gives its proxy plugin (whichever daemon serves it)
SYSTEMS = ("lazyd", "reference")
VARIANTS = ("lazyctl", "lazyctl-prio", "ctr-remote", "optimize")
LANDMARK = ".prefetch.landmark"
RESULTS = Path(__file__).resolve().parent / "results"


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
def stargz_stack(root: Path) -> Iterator[tuple[Containerd, Proc]]:
    """The reference ``containerd-stargz-grpc`` (empty config) + containerd, registered as proxy ``lazyd``.

    Logs at debug level: its ``remote-snapshot-prepared`` lines (the fallback check) are debug lines.
    """
    with ExitStack() as stack:
        root.mkdir(parents=True, exist_ok=True)
        config = root / "stargz.toml"
        config.write_text("")
        sock = root / "stargz.sock"
        proc = Proc([STARGZ_GRPC, "-address", str(sock), "-root", str(root / "stargz"), "-config", str(config),
                     "-log-level", "debug"], root / "stargz.log")

        def stop() -> None:
            proc.stop()
            unmount_below(root)
        stack.callback(stop)
        wait_until(lambda: sock.exists() or not proc.alive(), 30, "containerd-stargz-grpc socket")
        if not proc.alive():
            raise BenchError(f"containerd-stargz-grpc exited:\n{proc.log_text()[-3000:]}")
        cd = start_containerd(root / "containerd", snapshotter_address=str(sock))
        stack.callback(cd.stop)
        yield cd, proc


@contextmanager
def plain_stack(root: Path) -> Iterator[Containerd]:
    """containerd alone (overlayfs), for converting with ``ctr-remote``."""
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
    # The container's environment, not this shell's: a LANG from the host makes `ls` open locale
    # files that it does not open in the container (CONTAINER_ENV).
    argv = ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat,open,execve", "chroot", str(rootfs), *CMD]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=CONTAINER_ENV)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
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


def _clean(name: str) -> str:
    """A TOC or record path as a clean relative name (``./usr/bin/`` -> ``usr/bin``)."""
    return os.path.normpath("/" + name).lstrip("/")


def prioritized_entries(ref: str) -> tuple[list[int], set[str]]:
    """(regular files before ``.prefetch.landmark`` per layer, names of all entries before it) of ``ref``."""
    image = read_image(ref)
    counts, names = [], set()
    for layer in image.layers:
        entries = json.loads(raw_toc(ref, layer))["entries"]
        marks = [i for i, e in enumerate(entries) if _clean(e["name"]) == LANDMARK]
        before = entries[:marks[0]] if marks else []
        counts.append(sum(1 for e in before if e["type"] == "reg"))
        names |= {_clean(e["name"]) for e in before}
    return counts, names


def verify_prioritized(variant: str, ref: str, listed: list[str]) -> str:
    """Check that every path of ``listed`` is before a landmark in ``ref``'s layers; returns a summary line."""
    counts, names = prioritized_entries(ref)
    wanted = {_clean(p) for p in listed}
    missing = sorted(wanted - names)
    if missing:
        raise BenchError(f"{variant} ({ref}): {len(missing)} of the {len(wanted)} listed paths are not among the "
                         f"prioritized entries (before {LANDMARK}) of any layer, e.g. {missing[:8]}; per-layer "
                         f"prioritized regular files: {counts}")
    return (f"{variant}: {sum(counts)} prioritized regular files before {LANDMARK} (per layer {counts}); "
            f"all {len(wanted)} listed paths among them")


def record_paths(record: Path) -> list[str]:
    """The paths of a ``ctr-remote image optimize --record-out`` record (JSON lines with a ``path``)."""
    out = []
    for n, line in enumerate(record.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line)["path"])
            except (ValueError, KeyError) as err:
                raise BenchError(f"{record}:{n}: not a record line with a path ({err}): {line[:200]}") from None
    if not out:
        raise BenchError(f"{record}: `ctr-remote image optimize` recorded no file")
    return out


@dataclass
class Images:
    refs: dict[str, str]        # variant -> ref on the registry (not through the proxy)
    notes: list[str] = field(default_factory=list)


def prepare_images(reg: Registry, work: Path, files: list[str], variants: list[str]) -> Images:
    """Push the plain image and make the eStargz ``variants`` under ``debian-python:*`` on ``reg``, checked."""
    imgs = Images({})
    layout = debian_python_layout()
    plain = push(f"oci:{layout}:latest", reg.host, "debian-python:plain")
    prio_file = work / "prioritized.txt"
    prio_file.write_text("".join(f"{f}\n" for f in files))
    if "lazyctl" in variants:
        imgs.refs["lazyctl"] = f"{reg.host}/debian-python:lazyctl"
        sh("lazyctl", "image", "convert", "--plain-http", "--json", plain, imgs.refs["lazyctl"], timeout=1800)
    if "lazyctl-prio" in variants:
        imgs.refs["lazyctl-prio"] = f"{reg.host}/debian-python:lazyctl-prio"
        sh("lazyctl", "image", "convert", "--plain-http", "--json", "--prioritized", prio_file, plain,
           imgs.refs["lazyctl-prio"], timeout=1800)
        imgs.notes.append(verify_prioritized("lazyctl-prio", imgs.refs["lazyctl-prio"], files))
    if not {"ctr-remote", "optimize"} & set(variants):
        return imgs
    # ctr-remote 0.12.0 has no --plain-http for optimize: content into a local containerd, push after.
    with plain_stack(work / "convert") as cd:
        if "ctr-remote" in variants:
            ref = imgs.refs["ctr-remote"] = f"{reg.host}/debian-python:ctr-remote"
            cd.ctr("content", "fetch", "--plain-http", plain, timeout=600)
            cd.ctr_remote("image", "convert", "--estargz", "--oci", plain, ref, timeout=1800)
            cd.ctr("images", "push", "--plain-http", ref, timeout=600)
        if "optimize" in variants:
            parents = with_parent_dirs(layout, "latest", work / "parents-layout")
            src = push(parents, reg.host, "debian-python:parents")
            shutil.rmtree(work / "parents-layout")
            ref = imgs.refs["optimize"] = f"{reg.host}/debian-python:optimize"
            record = work / "optimize-record.json"
            cd.ctr("content", "fetch", "--plain-http", src, timeout=600)
            cd.ctr_remote("image", "optimize", "--oci", "--period", "10", "--record-out", str(record),
                          "--entrypoint", json.dumps(list(CMD[:1])), "--args", json.dumps(list(CMD[1:])),
                          src, ref, timeout=1800)
            cd.ctr("images", "push", "--plain-http", ref, timeout=600)
            imgs.notes.append(verify_prioritized("optimize", ref, record_paths(record)))
    return imgs


# --- one measured run ------------------------------------------------------------------------


@dataclass
class Result:
    link: str
    variant: str
    system: str
    round: int
    pull: float           # pull command's wall time
    first_output: float   # from starting `ctr run --rm` to its first stdout line
    run: float            # wall time of `ctr run --rm`
    bytes_first: int      # bytes from the registry, pull start .. first output line
    requests_first: int   # HTTP requests to the registry, pull start .. first output line
    load: str

    @property
    def total(self) -> float:
        """Pull plus time to the first output line: what a user waits for."""
        return self.pull + self.first_output


class Refused(BenchError):
    """A run in which some layer was not served lazily."""


def via(proxy: TCPProxy, ref: str) -> str:
    """``ref`` with its registry host replaced by the proxy's."""
    return proxy.host + "/" + ref.split("/", 1)[1]


def _run_to_output(cd: Containerd, ref: str, name: str, proxy: TCPProxy,
                   snapshotter: str = PROXY_SNAPSHOTTER) -> tuple[float, float, int, int]:
    """``ctr run --rm`` the workload: (seconds to first line, seconds to exit, bytes and requests by then)."""
    argv = ["ctr", "--address", cd.address, "--namespace", "default", "run", "--rm", "--snapshotter",
            snapshotter, ref, name, *CMD]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    seen = time.monotonic() - start
    at_first = proxy.bytes_down, len(proxy.requests())
    rest, err = proc.communicate(timeout=300)
    wall = time.monotonic() - start
    if proc.returncode != 0 or "hello" not in first + rest:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode} without 'hello':\n{(first + rest)[-500:]}"
                         f"{err[-3000:]}")
    return seen, wall, *at_first


@dataclass
class Pulled:
    """A cold pull by ``cold_pull``: its containerd, the pull's seconds, and ``fallbacks()``: the layers
    that were not served lazily (call it after the workload ran: a layer may fall back on first use)."""

    cd: Containerd
    seconds: float
    fallbacks: Callable[[], list[str]]


@contextmanager
def cold_pull(system: str, root: Path, proxy: TCPProxy, ref: str, settings: dict[str, str] | None = None,
              timeout: float = 600) -> Iterator[Pulled]:
    """Start ``system``'s stack in the fresh ``root``, reset ``proxy`` and pull ``ref`` (a ref on the proxy):
    ``lazyd`` (``lazyctl rpull``), ``reference`` (``ctr-remote images rpull``) or ``download`` (``ctr images
    pull`` into containerd's overlayfs snapshotter; it never falls back).  ``timeout`` bounds the ``ctr`` and
    ``ctr-remote`` pulls."""
    digests = [layer["digest"] for layer in read_image(ref).layers]
    if system == "lazyd":
        # What --plain-http tells the reference: no TLS probe of the registry first.
        with lazyd_stack(root, {**(settings or {}), "registry": f'{{plain_http = ["{proxy.host}"]}}'}) as (cd, sock):
            proxy.reset()
            t0 = time.monotonic()
            pulled = json.loads(sh("lazyctl", "rpull", "--plain-http", "--json", "--address", cd.address,
                                   "--snapshotter", PROXY_SNAPSHOTTER, "--socket", sock, ref))
            seconds = time.monotonic() - t0

            def lazyd_fell_back() -> list[str]:
                status = json.loads(sh("lazyctl", "status", "--json", "--socket", sock))
                return lazyd_fallbacks(digests, pulled, status, content_digests(cd, "default"))
            yield Pulled(cd, seconds, lazyd_fell_back)
    elif system == "reference":
        with stargz_stack(root) as (cd, proc):
            proxy.reset()
            t0 = time.monotonic()
            cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", PROXY_SNAPSHOTTER, ref, timeout=timeout)
            seconds = time.monotonic() - t0

            def reference_fell_back() -> list[str]:
                # Fresh root: every FUSE mount under it is this pull's.
                return stargz_report(digests, fuse_mounts_below(root), proc.log_text(), "default",
                                     content_digests(cd, "default")).fallbacks
            yield Pulled(cd, seconds, reference_fell_back)
    elif system == "download":
        with plain_stack(root) as cd:
            proxy.reset()
            t0 = time.monotonic()
            cd.ctr("images", "pull", "--plain-http", ref, timeout=timeout)
            yield Pulled(cd, time.monotonic() - t0, list)
    else:
        raise BenchError(f"unknown system {system!r}")


def measure(system: str, variant: str, ref: str, proxy: TCPProxy, work: Path, n: int, link: str, rnd: int,
            settings: dict[str, str]) -> Result:
    """One cold pull + run of ``ref`` (a ref on the proxy) by ``system`` in a fresh root; refused on a fallback."""
    if system not in SYSTEMS:
        raise BenchError(f"unknown system {system!r}")
    root = work / f"run{n}-{system}-{variant}"
    root.mkdir()
    ld = load()
    try:
        with cold_pull(system, root, proxy, ref, settings) as pulled:
            first, wall, nbytes, nreq = _run_to_output(pulled.cd, ref, f"bench{n}", proxy)
            fallbacks = pulled.fallbacks()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if fallbacks:
        n_layers = len(read_image(ref).layers)
        raise Refused(f"{system} on {variant} ({link}, round {rnd + 1}): not every one of the {n_layers} layers "
                      "was served lazily: " + " | ".join(fallbacks))
    return Result(link, variant, system, rnd + 1, pulled.seconds, first, wall, nbytes, nreq, ld)


# --- report ----------------------------------------------------------------------------------


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def medians(results: list[Result]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Per (link, variant, system): medians of every measure, and n."""
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.link, r.variant, r.system), []).append(r)
    return {k: {"n": len(v), "pull": statistics.median(r.pull for r in v),
                "first": statistics.median(r.first_output for r in v), "run": statistics.median(r.run for r in v),
                "total": statistics.median(r.total for r in v),
                "mb": statistics.median(r.bytes_first for r in v) / 1e6,
                "req": statistics.median(r.requests_first for r in v)} for k, v in groups.items()}


def report(results: list[Result], links: list[str], variants: list[str]) -> str:
    med = medians(results)
    rows, ratios = [], []
    for link in links:
        for variant in variants:
            for system in SYSTEMS:
                m = med.get((link, variant, system))
                if m:
                    rows.append([link, variant, system, str(m["n"]), f"{m['pull']:.2f}", f"{m['first']:.2f}",
                                 f"{m['run']:.2f}", f"{m['total']:.2f}", f"{m['mb']:.1f}", f"{m['req']:.0f}"])
            a, b = med.get((link, variant, "lazyd")), med.get((link, variant, "reference"))
            if a and b:
                ratios.append([link, variant, *(f"{a[k] / b[k]:.2f}" if b[k] else "-"
                                                for k in ("total", "pull", "first", "run", "mb", "req"))])
    return ("Medians per link, variant and system (first output: from starting `ctr run --rm`; pull + first: "
            "what a user waits for; MB and requests: through the registry link from the pull's start to the "
            "first output line)\n\n"
            + md_table(["link", "variant", "system", "n", "pull s", "first output s", "ctr run s", "pull + first s",
                        "MB to first output", "requests to first output"], rows)
            + "\n\nlazyd / reference (below 1: lazyd is faster or fetched less)\n\n"
            + md_table(["link", "variant", "pull + first", "pull", "first output", "ctr run", "MB", "requests"],
                       ratios))


def chart(results: list[Result], links: list[str], variants: list[str], path: Path, title: str) -> None:
    """Bars of median pull + time to first output per variant, lazyd beside the reference, one panel per link."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = medians(results)
    fig, axes = plt.subplots(1, len(links), figsize=(5.5 * len(links), 4.2), squeeze=False)
    width = 0.38
    for ax, link in zip(axes[0], links):
        for j, (system, colour) in enumerate(zip(SYSTEMS, ("tab:blue", "tab:orange"))):
            xs = [i + (j - 0.5) * width for i in range(len(variants))]
            pulls = [med.get((link, v, system), {}).get("pull", 0.0) for v in variants]
            firsts = [med.get((link, v, system), {}).get("first", 0.0) for v in variants]
            ax.bar(xs, pulls, width, color=colour, alpha=0.45, label=f"{system}: pull")
            ax.bar(xs, firsts, width, bottom=pulls, color=colour, label=f"{system}: run to first output")
        ax.set_xticks(range(len(variants)), variants, rotation=15)
        ax.set_ylabel("seconds (median)")
        ax.set_title(link)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


def parse_links(specs: list[str]) -> list[tuple[str, float]]:
    """``RATE:RTT_MS`` strings -> (rate, rtt seconds); bad ones are refused by name."""
    out = []
    for spec in specs:
        m = re.fullmatch(r"(\d+(?:\.\d+)?[kmg]?bit):(\d+(?:\.\d+)?)", spec)
        if not m:
            raise SystemExit(f"--link {spec!r}: expected RATE:RTT_MS such as 200mbit:10")
        out.append((m.group(1), float(m.group(2)) / 1000))
    return out


def main() -> int:
    from tests.support.procs import prefer_this_interpreters_tools

    prefer_this_interpreters_tools()  # lazyctl/lazyd by name: this interpreter's (the venv's)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", action="append", default=None,
                    help="RATE:RTT_MS, repeatable (default 200mbit:10 and 50mbit:40)")
    ap.add_argument("--rounds", type=int, default=3, help="cold runs of every variant by every system per link")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="hello",
                    help="hello: print('hello'); heavy: import 18 stdlib modules, then print hello")
    ap.add_argument("--lazyd-set", action="append", default=[], metavar="KEY=TOML",
                    help="extra top-level lazyd config for every lazyd run, repeatable")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the .md, .json and .png go (default bench/results)")
    args = ap.parse_args()
    global CMD
    CMD = WORKLOADS[args.workload]
    variants = args.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"--variants: unknown {bad}; known: {', '.join(VARIANTS)}")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if bad := [kv for kv in args.lazyd_set if "=" not in kv]:
        raise SystemExit(f"--lazyd-set: expected KEY=TOML, got {bad}")
    settings = dict(kv.split("=", 1) for kv in args.lazyd_set)
    links = parse_links(args.link or ["200mbit:10", "50mbit:40"])
    link_names = [f"{rate} {rtt * 1000:.0f}ms" for rate, rtt in links]
    if os.geteuid() != 0:
        print("run as root (tc, mounts, containerd)", file=sys.stderr)
        return 2
    started, stamp = time.monotonic(), time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results: list[Result] = []
    refused: list[str] = []
    print(f"# load average at start: {load()} ({os.cpu_count()} cores)", flush=True)
    try:
        with signals_as_exit(), tmpfs() as work, ExitStack() as stack:
            reg = start_registry(work, name="registry")
            stack.callback(reg.stop)
            t0 = time.monotonic()
            files = startup_files(debian_python_layout(), work)
            imgs = prepare_images(reg, work, files, variants)
            print(f"# images ready in {time.monotonic() - t0:.0f}s; strace found {len(files)} start-up files "
                  f"({args.workload})", flush=True)
            for note in imgs.notes:
                print(f"# {note}", flush=True)
            n = 0
            for (rate, rtt), link in zip(links, link_names):
                with throttled_proxy(reg.port, rate, rtt) as proxy:
                    for rnd in range(args.rounds):
                        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                        for i, variant in enumerate(order):
                            systems = SYSTEMS if (rnd + i) % 2 == 0 else tuple(reversed(SYSTEMS))
                            for system in systems:
                                n += 1
                                try:
                                    r = measure(system, variant, via(proxy, imgs.refs[variant]), proxy, work, n,
                                                link, rnd, settings)
                                except Refused as err:
                                    refused.append(str(err))
                                    print(f"# REFUSED {err}", flush=True)
                                    continue
                                results.append(r)
                                print(f"# {link} round {rnd + 1} {variant} {system}: pull {r.pull:.2f}s first output "
                                      f"{r.first_output:.2f}s ctr run {r.run:.2f}s {r.bytes_first / 1e6:.1f} MB "
                                      f"{r.requests_first} requests; load {r.load}", flush=True)
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)  # also after a crash
    wall = time.monotonic() - started
    text = (f"# bench_e2e: {args.workload} workload, {args.rounds} rounds, {stamp}\n\n{report(results, link_names, variants)}"
            f"\n\nbench wall time {wall / 60:.1f} min; load average at the end {load()} ({os.cpu_count()} cores)\n"
            + "".join(f"\n# {note}" for note in imgs.notes)
            + "".join(f"\nREFUSED: {r}" for r in refused) + "\n")
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"e2e-{args.workload}-{stamp}"
    base.with_suffix(".md").write_text(text)
    base.with_suffix(".json").write_text(json.dumps([asdict(r) | {"total": r.total} for r in results], indent=1))
    chart(results, link_names, variants, base.with_suffix(".png"),
          f"bench_e2e {args.workload}: median pull + median time to first output, {args.rounds} rounds ({stamp})")
    print(f"# wrote {base}.md, .json and .png")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
