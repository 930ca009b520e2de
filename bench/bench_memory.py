#!/usr/bin/env python3
"""Memory of ``lazyd serve`` with many TOC entries mounted: the fetcher and its FUSE workers.

Builds ``--layers`` eStargz layers with lazyd's writer (``--files`` small files each in 40
directories, a few prioritized files so a prefetch runs, and one multi-chunk file), pushes
them as one image to a local ``docker-registry``, starts a real ``lazyd serve`` and mounts
every layer.  The resident set (``/proc/<pid>/status``: VmRSS, its anonymous and file-backed
parts, VmHWM = peak) of the fetcher and of each worker is sampled

* ``idle``: the daemon up, nothing mounted;
* ``mounted``: every layer mounted (before the background fetch starts: ``background_delay``
  holds it back that long after the last mount);
* ``fetched``: every layer's background fetch done (all chunks in the cache);
* ``settled``: ``--settle`` seconds later;
* ``status``: after one ``status`` call (it reads each mounted layer's cache usage).

Run as root:  python3 bench/bench_memory.py --layers 50 --files 2000
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyd.estargz import BuildOptions  # noqa: E402
from lazyd.registry import Reference  # noqa: E402
from tests.support.estargz_images import EStargzLayer, build_layers, push_layers  # noqa: E402
from tests.support.lazyd import cached_chunks, start_lazyd, worker_processes  # noqa: E402
from tests.support.procs import wait_until  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402

DIRS = 40
BIG_FILE = 3 * 1024 * 1024
CHUNK_SIZE = 256 * 1024


class BenchError(RuntimeError):
    """The benchmark could not run as asked."""


@dataclass
class Sample:
    """Memory of one process at one point, in KiB (as /proc reports it)."""

    phase: str
    role: str  # "fetcher" or "worker"
    pid: int
    rss: int
    rss_anon: int
    rss_file: int
    peak: int
    top: dict[str, int] | None = None  # the biggest mappings (``--smaps``)


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of ``pid`` in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def mappings(pid: int) -> dict[str, int]:
    """Resident KiB of ``pid`` by mapping: files by base name, ``[heap]``, ``[anon]`` (other
    anonymous mappings: thread arenas, large allocations)."""
    out: dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            name = Path(fields[5]).name if len(fields) > 5 and fields[5].startswith("/") else (
                fields[5] if len(fields) > 5 else "[anon]")
        elif fields and fields[0] == "Rss:":
            out[name] = out.get(name, 0) + int(fields[1])
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


def sample(phase: str, fetcher: int, workers: list[int], smaps: bool = False) -> list[Sample]:
    samples = []
    for role, pid in [("fetcher", fetcher), *(("worker", w) for w in workers)]:
        m = proc_memory(pid)
        samples.append(Sample(phase, role, pid, m["VmRSS"], m["RssAnon"], m["RssFile"], m["VmHWM"],
                              mappings(pid) if smaps and role == "fetcher" else None))
    return samples


def layer_tar(path: Path, files: int, seed: int) -> tuple[Path, list[str]]:
    """A tar of ``files`` small files (200 B to 3 kB) in ``DIRS`` directories, a few symlinks
    and one ``BIG_FILE``-byte file; returns it and the names to prioritize."""
    rnd = random.Random(seed)
    mtime = 1_600_000_000
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in range(DIRS):
            info = tarfile.TarInfo(f"usr/lib/pkg{d:03d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)
        for i in range(files):
            size = rnd.randint(200, 3000)
            data = rnd.randbytes(size // 3) + (f"layer {seed} file {i} " * size)[: size - size // 3].encode()
            info = tarfile.TarInfo(f"usr/lib/pkg{i % DIRS:03d}/module_{i:05d}.py")
            info.size, info.mode, info.mtime = len(data), 0o644, mtime
            tar.addfile(info, io.BytesIO(data))
            if i % 100 == 0:
                link = tarfile.TarInfo(f"usr/lib/pkg{i % DIRS:03d}/alias_{i:05d}.py")
                link.type, link.linkname, link.mtime = tarfile.SYMTYPE, f"module_{i:05d}.py", mtime
                tar.addfile(link)
        big = rnd.randbytes(BIG_FILE // 2) + bytes(BIG_FILE - BIG_FILE // 2)
        info = tarfile.TarInfo("usr/share/big.bin")
        info.size, info.mode, info.mtime = len(big), 0o644, mtime
        tar.addfile(info, io.BytesIO(big))
    prioritized = [f"usr/lib/pkg{i % DIRS:03d}/module_{i:05d}.py" for i in range(0, files, files // 20 or 1)]
    return path, prioritized


def toc_chunks(root: Path) -> int:
    """Chunks of every layer the daemon persisted under ``root/layers``."""
    n = 0
    for p in root.glob("layers/*/toc.json"):
        for e in json.loads(p.read_bytes())["entries"]:
            n += e["type"] == "chunk" or e["type"] == "reg" and e.get("size", 0) > 0
    return n


def toc_entries(root: Path) -> int:
    """TOC entries of every layer the daemon persisted under ``root/layers``."""
    return sum(len(json.loads(p.read_bytes())["entries"]) for p in root.glob("layers/*/toc.json"))


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    started = time.monotonic()
    layers: list[EStargzLayer] = []
    for i in range(args.layers):
        tar, prioritized = layer_tar(work / f"l{i}.tar", args.files, seed=i)
        layers += build_layers([tar], work / f"esgz{i}",
                               BuildOptions(chunk_size=CHUNK_SIZE, prioritized=prioritized, workers=1))
        tar.unlink()
    built = time.monotonic()
    reg = start_registry(work, name="registry")
    daemon = None
    try:
        image = push_layers(reg.host, "memory-bench:t", layers)
        base = work / "lazyd"
        base.mkdir()
        config = base / "config.toml"
        config.write_text(f"workers = {args.workers}\ncache_size = {8 << 30}\nbackground_delay = {args.delay}\n"
                          "log_level = \"info\"\n"
                          f"[registry]\nhosts_dir = \"{base / 'certs.d'}\"\n")
        root = base / "root"
        daemon = start_lazyd(root, base / "lazyd.sock", base / "lazyd.log", config=config, workers=args.workers)
        fetcher = daemon.proc.popen.pid
        time.sleep(1.0)
        samples = sample("idle", fetcher, worker_processes(root), args.smaps)
        ref = str(Reference.parse(image.ref))
        mount_started = time.monotonic()
        with daemon.client(timeout=300) as c:
            for i, layer in enumerate(image.layers):
                mp = base / "mnt" / str(i)
                mp.mkdir(parents=True)
                c.mount(ref, layer.digest, str(mp), layer.toc_digest)
            mounted = time.monotonic()
            samples += sample("mounted", fetcher, worker_processes(root), args.smaps)
            if mounted - mount_started > args.delay * 0.8 * len(image.layers):
                print("note: mounts were slow; some background fetch may have started before 'mounted'",
                      file=sys.stderr)

            def all_fetched() -> bool:
                if args.poll == "status":
                    st = c.status()
                    return all(m.layer.background_state in ("done", "failed") for m in st.mounts)
                return cached_chunks(root) >= chunks

            chunks = toc_chunks(root)
            wait_until(all_fetched, args.timeout, "every layer's background fetch", interval=1.0)
            fetched = time.monotonic()
            time.sleep(0.5)  # the last batch's bookkeeping
            samples += sample("fetched", fetcher, worker_processes(root), args.smaps)
            time.sleep(args.settle)
            samples += sample("settled", fetcher, worker_processes(root), args.smaps)
            st = c.status()
            failed = [m.layer_digest for m in st.mounts if m.layer.background_state != "done"]
            if failed:
                raise BenchError(f"background fetch failed for {len(failed)} layer(s): {failed[:3]}")
            samples += sample("status", fetcher, worker_processes(root), args.smaps)
            cache = st.cache
        entries = toc_entries(root)
        return {
            "layers": args.layers, "files_per_layer": args.files, "toc_entries": entries, "workers": args.workers,
            "blob_bytes": sum(layer.size for layer in layers), "cache_bytes": cache.size, "cache_chunks": cache.count,
            "build_s": round(built - started, 1), "mount_s": round(mounted - mount_started, 1), "poll": args.poll,
            "background_s": round(fetched - mounted, 1), "samples": [asdict(s) for s in samples],
        }
    finally:
        if daemon is not None:
            daemon.close(unmount=work)
        reg.stop()


def report(result: dict[str, object]) -> str:
    entries = int(result["toc_entries"])  # type: ignore[arg-type]
    lines = [f"{result['layers']} layers, {entries} TOC entries, {int(result['blob_bytes']) / 1e6:.0f} MB of blobs "
             f"({result['cache_chunks']} chunks cached); mounts {result['mount_s']} s, background fetch "
             f"{result['background_s']} s (end seen by polling {result.get('poll', 'status')})", "",
             "| phase | process | RSS MiB | anon MiB | file MiB | peak MiB |", "|---|---|---|---|---|---|"]
    samples = result["samples"]
    assert isinstance(samples, list)
    for s in samples:
        lines.append(f"| {s['phase']} | {s['role']} {s['pid']} | {s['rss'] / 1024:.1f} | {s['rss_anon'] / 1024:.1f} "
                     f"| {s['rss_file'] / 1024:.1f} | {s['peak'] / 1024:.1f} |")
        if s.get("top"):
            top = ", ".join(f"{name} {kib / 1024:.1f}" for name, kib in s["top"].items())
            lines.append(f"|  | (MiB by mapping: {top}) | | | | |")
    fetcher = {s["phase"]: s for s in samples if s["role"] == "fetcher"}
    if "idle" in fetcher and "mounted" in fetcher and "fetched" in fetcher:
        idle = fetcher["idle"]["rss"]
        lines.append("")
        lines.append(f"fetcher: {(fetcher['mounted']['rss'] - idle) * 1024 / entries:.0f} B per TOC entry mounted, "
                     f"{(fetcher['fetched']['rss'] - idle) * 1024 / entries:.0f} B per entry after background fetch "
                     f"(growth by background fetch: {(fetcher['fetched']['rss'] - fetcher['mounted']['rss']) / 1024:.1f}"
                     " MiB)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=50)
    p.add_argument("--files", type=int, default=2000, help="small files per layer")
    p.add_argument("--workers", type=int, default=2, help="FUSE worker processes")
    p.add_argument("--delay", type=float, default=5.0, help="background_delay of the daemon (seconds)")
    p.add_argument("--timeout", type=float, default=900.0, help="longest wait for the background fetch")
    p.add_argument("--settle", type=float, default=5.0, help="seconds between 'fetched' and 'settled'")
    p.add_argument("--poll", choices=("store", "status"), default="store",
                   help="how to see the background fetch end: count the store's rows (default), or call "
                        "'status' every second (which costs the fetcher memory of its own)")
    p.add_argument("--smaps", action="store_true", help="also show the fetcher's biggest mappings")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--work", type=Path, help="work directory (default: a new one under /tmp, removed after)")
    args = p.parse_args()
    if args.layers < 1 or args.files < 20:
        p.error("--layers must be >= 1 and --files >= 20")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            result = run(args, Path(tmp))
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
