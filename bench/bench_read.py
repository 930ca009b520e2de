#!/usr/bin/env python3
"""Random-access read throughput of ``lazyd.estargz.Reader`` on a local blob.

Builds an eStargz blob (our writer) from a tar of a real tree, then measures, with a
fresh reader for each pass (no decoded-chunk cache; the blob file is in the page cache):
  * cold sequential: every regular file read whole (decompress + verify each chunk once);
  * small files: files <= 16 KiB read whole, files/s;
  * random 4 KiB reads at random offsets of files >= 1 MiB (each read decodes its chunk).

    python3 bench/bench_read.py [--src DIR ...] [--chunk-size N] [--reads 300]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyd.cli.output import format_table, human_bytes  # noqa: E402
from lazyd.estargz import BuildOptions, Reader, build, file_source  # noqa: E402

DEFAULT_SRC = ["/usr/lib/python3.11"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append")
    ap.add_argument("--chunk-size", type=int, default=4 << 20)
    ap.add_argument("--reads", type=int, default=300, help="random 4 KiB reads")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        tar, blob = Path(tmp) / "layer.tar", Path(tmp) / "layer.esgz"
        subprocess.run(["tar", "cf", str(tar), *(args.src or DEFAULT_SRC)], check=True, stderr=subprocess.DEVNULL)
        result = build(tar, blob, BuildOptions(chunk_size=args.chunk_size, level=6))
        source, close, size = file_source(blob)
        try:
            rows = []
            t0 = time.perf_counter()
            reader = Reader.open(source, size, result.toc_digest)
            t_open = time.perf_counter() - t0
            files = [e for e in reader.toc.entries if e.type == "reg" and e.size > 0]
            rows.append(["open (footer + TOC)", f"{len(reader.toc.entries)} entries", f"{t_open * 1000:.1f} ms", ""])

            total, t0 = 0, time.perf_counter()
            for e in files:
                total += sum(len(p) for p in reader.iter_file(e.name))
            dt = time.perf_counter() - t0
            rows.append(["cold sequential, all files", human_bytes(total), f"{dt:.2f} s",
                         f"{total / dt / 1e6:.0f} MB/s"])

            small = [e for e in files if e.size <= 16 << 10]
            reader = Reader.open(source, size, result.toc_digest)
            t0 = time.perf_counter()
            for e in small:
                reader.read(e.name)
            dt = time.perf_counter() - t0
            rows.append(["small files (<= 16 KiB), whole", f"{len(small)} files", f"{dt:.2f} s",
                         f"{len(small) / dt:.0f} files/s"])

            big = [e for e in files if e.size >= 1 << 20]
            if big:
                rng = random.Random(1)
                reader = Reader.open(source, size, result.toc_digest)
                t0 = time.perf_counter()
                for _ in range(args.reads):
                    e = rng.choice(big)
                    reader._cache.clear()  # noqa: SLF001 - every read decodes its chunk (cold)
                    reader.read(e.name, rng.randrange(e.size), 4096)
                dt = time.perf_counter() - t0
                rows.append([f"random 4 KiB reads, files >= 1 MiB (chunk {human_bytes(args.chunk_size)})",
                             f"{args.reads} reads", f"{dt:.2f} s", f"{args.reads / dt:.0f} reads/s"])
        finally:
            close()
        print(f"blob: {human_bytes(result.blob_size)} from {human_bytes(tar.stat().st_size)} of tar")
        print(format_table(["measurement", "amount", "time", "rate"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
