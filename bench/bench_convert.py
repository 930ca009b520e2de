#!/usr/bin/env python3
"""Convert the same big layer tar with ``lazyctl layer convert`` and the reference ``estargz-build``.

Prints wall time, throughput, blob size and the ratios (ours / reference).  Target:
our time <= 1.0x the reference's ``-procs 2`` time and our blob within 3% of its size.

    python3 bench/bench_convert.py [--src DIR ...] [--level 9] [--chunk-size 4194304] [--procs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazyd.cli.output import format_table, human_bytes  # noqa: E402

REFERENCE = "/opt/lazyd-interop/bin/estargz-build"
VERIFY = "/opt/lazyd-interop/bin/estargz-verify"
DEFAULT_SRC = ["/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/perl"]


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, proc.stdout


def main() -> int:
    from tests.support.procs import prefer_this_interpreters_tools

    prefer_this_interpreters_tools()  # lazyctl/lazyd by name: this interpreter's (the venv's)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", help="directory to put in the tar (repeatable)")
    ap.add_argument("--tar", help="use this tar instead of building one")
    ap.add_argument("--level", type=int, default=9)
    ap.add_argument("--chunk-size", type=int, default=4 << 20)
    ap.add_argument("--procs", type=int, default=2, help="estargz-build -procs")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (best time is reported)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(tmp)
        if args.tar:
            tar = Path(args.tar)
        else:
            tar = work / "layer.tar"
            srcs = args.src or DEFAULT_SRC
            subprocess.run(["tar", "cf", str(tar), *srcs], check=True, stderr=subprocess.DEVNULL)
        size = tar.stat().st_size
        tar.read_bytes()  # warm the page cache for both tools

        ref_out, our_out = work / "ref.esgz", work / "ours.esgz"
        ref_cmd = [REFERENCE, "-procs", str(args.procs), "-level", str(args.level), "-chunk-size",
                   str(args.chunk_size), "-json", "-o", str(ref_out), str(tar)]
        our_cmd = ["lazyctl", "layer", "convert", str(tar), str(our_out), "--level", str(args.level),
                   "--chunk-size", str(args.chunk_size), "--json"]
        ref_runs, our_runs = [], []
        for _ in range(args.repeat):  # alternate, so load from elsewhere hits both alike
            ref_runs.append(timed(ref_cmd))
            our_runs.append(timed(our_cmd))
        ref_t, ref_cpu = min(r[0] for r in ref_runs), min(r[1] for r in ref_runs)
        our_t, our_cpu = min(r[0] for r in our_runs), min(r[1] for r in our_runs)
        ours = json.loads(our_runs[0][2])
        verify = subprocess.run([VERIFY, "-toc-digest", ours["tocDigest"], str(our_out)], capture_output=True,
                                text=True)
        ref_size, our_size = ref_out.stat().st_size, our_out.stat().st_size

        print(f"input: {tar if args.tar else ' + '.join(args.src or DEFAULT_SRC)} ({human_bytes(size)}), "
              f"level {args.level}, chunk size {args.chunk_size}, {os.cpu_count()} CPUs")
        rows = [
            [f"estargz-build -procs {args.procs}", f"{ref_t:.2f}", f"{ref_cpu:.2f}", f"{size / ref_t / 1e6:.1f}",
             ref_size, "1.000", "1.000"],
            ["lazyctl layer convert", f"{our_t:.2f}", f"{our_cpu:.2f}", f"{size / our_t / 1e6:.1f}", our_size,
             f"{our_t / ref_t:.3f}", f"{our_size / ref_size:.3f}"],
        ]
        print(format_table(["tool", "wall s", "cpu s", "MB/s", "blob bytes", "time ratio", "size ratio"], rows))
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1) + 0.5:
            print(f"note: load average {load:.1f} -- other work shared the CPUs; compare the cpu s column")
        print(f"estargz-verify of our blob: {'OK' if verify.returncode == 0 else 'FAIL ' + verify.stderr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
