#!/usr/bin/env python3
"""Load: many concurrent readers over many lazily mounted layers, with background fetch running.

Builds ``--layers`` eStargz layers (``--files`` files each, 1 KiB to 256 KiB of random bytes,
so gzip cannot shrink them) with lazyd's writer, pushes them as one image to a local
``docker-registry``, starts a real ``lazyd serve`` (``--workers`` FUSE workers, background fetch
on with a short ``background_delay`` so it competes with the readers) and mounts every layer.
Then ``--readers`` threads read random whole files for ``--seconds`` seconds and check each
file's sha256 against the source tar. A read that fails, returns wrong bytes or takes longer
than ``--stuck`` seconds (a deadlock) is an error.

The report gives p50/p90/p99/max latency of whole-file reads, split into *first* reads
(the file's bytes may come from the registry) and *repeat* reads (the page cache or the
chunk store), with the counts, errors and the fetcher's registry totals. It is written to
``bench/results/load-<UTC time>.{json,md}``.

Run as root:  python3 bench/bench_load.py --layers 20 --readers 64 --seconds 60
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyd.api.client import Client  # noqa: E402
from tests.support.estargz_images import build_layers, push_layers  # noqa: E402
from tests.support.lazyd import start_lazyd  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Reads:
    """Latencies (seconds) of whole-file reads of one kind."""

    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        if not lat:
            return {"count": 0}

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

        return {"count": len(lat), "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
                "max_ms": lat[-1] * 1000, "mean_ms": statistics.fmean(lat) * 1000}


def make_tars(work: Path, layers: int, files: int, rnd: random.Random) -> tuple[list[Path], list[dict[str, str]]]:
    """``layers`` tars of ``files`` random files; returns the tars and each one's {name: sha256}."""
    tars, sums = [], []
    for i in range(layers):
        path = work / f"layer{i}.tar"
        digests: dict[str, str] = {}
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for j in range(files):
                size = int(1024 * 2 ** rnd.uniform(0, 8))  # 1 KiB .. 256 KiB, log-uniform
                data = rnd.randbytes(size)
                name = f"d{j % 20}/f{j}.bin"
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = size, 0o644, 1700000000
                tar.addfile(info, io.BytesIO(data))
                digests[name] = hashlib.sha256(data).hexdigest()
        tars.append(path)
        sums.append(digests)
    return tars, sums


def reader(mounts: list[Path], sums: list[dict[str, str]], until: float, seed: int, seen: set[tuple[int, str]],
           lock: threading.Lock, first: Reads, repeat: Reads, errors: list[str]) -> None:
    rnd = random.Random(seed)
    names = [sorted(s) for s in sums]
    while time.monotonic() < until:
        li = rnd.randrange(len(mounts))
        name = rnd.choice(names[li])
        with lock:
            is_first = (li, name) not in seen
            seen.add((li, name))
        started = time.monotonic()
        try:
            data = (mounts[li] / name).read_bytes()
        except OSError as exc:
            errors.append(f"layer {li} {name}: {exc}")
            continue
        took = time.monotonic() - started
        if hashlib.sha256(data).hexdigest() != sums[li][name]:
            errors.append(f"layer {li} {name}: wrong bytes")
        with lock:
            (first if is_first else repeat).latencies.append(took)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--files", type=int, default=400, help="files per layer")
    ap.add_argument("--readers", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, default=2, help="lazyd FUSE workers")
    ap.add_argument("--stuck", type=float, default=30, help="a read slower than this is reported as stuck")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_load: run as root (FUSE mounts)", file=sys.stderr)
        return 2
    rnd = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="lazyd-bench-load-") as tmp:
        work = Path(tmp)
        tars, sums = make_tars(work, args.layers, args.files, rnd)
        layers = build_layers(tars, work / "blobs")
        reg = start_registry(work, name="registry")
        daemon = None
        try:
            image = push_layers(reg.host, "load:latest", layers)
            config = work / "lazyd.toml"
            config.write_text(f"workers = {args.workers}\nbackground_delay = 0.5\n")
            daemon = start_lazyd(work / "state", work / "lazyd.sock", work / "lazyd.log", config=config,
                                 workers=args.workers)
            mounts = []
            with Client(str(work / "lazyd.sock"), timeout=120) as c:
                for i, layer in enumerate(layers):
                    mp = work / "mnt" / str(i)
                    mp.mkdir(parents=True)
                    c.mount(image.ref, layer.digest, str(mp), layer.toc_digest)
                    mounts.append(mp)
            first, repeat, errors = Reads(), Reads(), []
            seen: set[tuple[int, str]] = set()
            lock = threading.Lock()
            started = time.monotonic()
            until = started + args.seconds
            threads = [threading.Thread(target=reader, daemon=True,
                                        args=(mounts, sums, until, args.seed * 1000 + i, seen, lock, first, repeat,
                                              errors)) for i in range(args.readers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=args.seconds + args.stuck)
            stuck = sum(t.is_alive() for t in threads)
            elapsed = time.monotonic() - started
            with Client(str(work / "lazyd.sock"), timeout=120) as c:
                st = c.status()
            background = sorted({m.layer.background_state for m in st.mounts})
            slow = [x for x in first.latencies + repeat.latencies if x > args.stuck]
            result = {
                "layers": args.layers, "files_per_layer": args.files, "readers": args.readers,
                "workers": args.workers, "seconds": round(elapsed, 1),
                "toc_entries": sum(len(s) for s in sums),
                "blob_bytes": sum(layer.size for layer in layers),
                "first": first.summary(), "repeat": repeat.summary(),
                "reads_per_s": round((len(first.latencies) + len(repeat.latencies)) / elapsed, 1),
                "errors": len(errors), "error_samples": errors[:5], "stuck_threads": stuck, "slow_reads": len(slow),
                "registry_requests": st.totals.registry_requests, "registry_bytes": st.totals.registry_bytes,
                "background_states": background, "cpu_count": os.cpu_count(), "load": os.getloadavg()[0],
            }
        finally:
            if daemon is not None:
                daemon.close(unmount=work)
            reg.stop()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"load-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [f"| {kind} | {s['count']} | " + " | ".join(f"{s.get(k, 0):.1f}" for k in ("p50_ms", "p90_ms", "p99_ms",
                                                                                         "max_ms")) + " |"
            for kind, s in (("first read", result["first"]), ("repeat read", result["repeat"]))]
    md = "\n".join([
        f"# Load: {args.readers} readers over {args.layers} lazily mounted layers for {args.seconds:.0f} s",
        "",
        f"{result['toc_entries']} files, {result['blob_bytes'] / 1e6:.1f} MB of blobs, {args.workers} FUSE workers, "
        f"background fetch running ({', '.join(background)} at the end); {result['cpu_count']} CPUs, load "
        f"{result['load']:.1f}.",
        "",
        "| reads | count | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|", *rows, "",
        f"Errors: {result['errors']}; stuck readers: {stuck}; reads over {args.stuck:.0f} s: {len(slow)}; "
        f"{result['reads_per_s']} reads/s; registry: {result['registry_requests']} requests, "
        f"{result['registry_bytes'] / 1e6:.1f} MB.", ""])
    (RESULTS / f"load-{stamp}.md").write_text(md)
    print(md)
    return 1 if errors or stuck or slow else 0


if __name__ == "__main__":
    sys.exit(main())
