#!/usr/bin/env python3
"""Image conversion time: ``lazyctl image convert`` vs ``ctr-remote image convert --estargz --oci``.

Both convert the debian+python3 image (tests/support/images.py) held by the same local
docker-registry.  ctr-remote works on containerd's content store, so the image is pulled
into a private containerd first (not timed) and the result is pushed with ``ctr images push``
(timed separately).  lazyctl pulls, converts and pushes in one command.  Each run writes to
a fresh repository so no blob is skipped as already present.  State lives on a tmpfs.

Usage: python3 bench/bench_image_convert.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyd.cli.output import format_table, human_bytes  # noqa: E402
from lazyd.registry import Reference, RegistryClient, RegistryConfig  # noqa: E402
from tests.support.containerd import start_containerd  # noqa: E402
from tests.support.images import debian_python_layout, push  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


async def layer_bytes(hosts_dir: Path, refs: list[str]) -> list[int]:
    """Total compressed layer size of each image."""
    async with RegistryClient(RegistryConfig(hosts_dir=str(hosts_dir))) as client:
        return [sum(d.size for d in (await client.resolve(Reference.parse(r))).layers) for r in refs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    layout = debian_python_layout()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="lazyd-bench-convert-", dir=shm) as tmp:
        work = Path(tmp)
        reg = start_registry(work)
        try:
            push(f"oci:{layout}:latest", reg.host, "debian-python:latest")
            src = f"{reg.host}/debian-python:latest"
            hosts = ["--hosts-dir", str(work / "certs.d")]
            lazy, ref_conv, ref_push = [], [], []
            ctrd = start_containerd(work / "containerd")
            try:
                ctr = ["ctr", "--address", ctrd.address]
                subprocess.run([*ctr, "images", "pull", "--plain-http", src], check=True, capture_output=True)
                for i in range(args.runs):
                    lazy.append(timed([sys.executable, "-m", "lazyd.cli.lazyctl", "image", "convert", "--json",
                                       *hosts, src, f"{reg.host}/bench/lazy-{i}:esgz"]))
                    dst = f"{reg.host}/bench/ref-{i}:esgz"
                    ref_conv.append(timed(["ctr-remote", "--address", ctrd.address, "image", "convert",
                                           "--estargz", "--oci", src, dst]))
                    ref_push.append(timed([*ctr, "images", "push", "--plain-http", dst]))
            finally:
                ctrd.stop()
            sizes = asyncio.run(layer_bytes(work / "certs.d", [src, f"{reg.host}/bench/lazy-0:esgz",
                                                               f"{reg.host}/bench/ref-0:esgz"]))
        finally:
            reg.stop()
    med = statistics.median
    ref_total = [a + b for a, b in zip(ref_conv, ref_push)]
    rows = [
        ["lazyctl image convert (pull+convert+push)", f"{med(lazy):.2f}", " ".join(f"{x:.2f}" for x in lazy)],
        ["ctr-remote image convert --estargz --oci", f"{med(ref_conv):.2f}", " ".join(f"{x:.2f}" for x in ref_conv)],
        ["ctr images push (after ctr-remote)", f"{med(ref_push):.2f}", " ".join(f"{x:.2f}" for x in ref_push)],
        ["ctr-remote convert + push", f"{med(ref_total):.2f}", " ".join(f"{x:.2f}" for x in ref_total)],
    ]
    print(format_table(["debian+python3 image", "median s", "runs"], rows))
    print(f"\nlayer bytes: source {human_bytes(sizes[0])}, lazyctl {human_bytes(sizes[1])}, "
          f"ctr-remote {human_bytes(sizes[2])}")
    print(f"ratio lazyctl / ctr-remote convert only:   {med(lazy) / med(ref_conv):.2f}x")
    print(f"ratio lazyctl / ctr-remote convert + push: {med(lazy) / med(ref_total):.2f}x  (target <= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
