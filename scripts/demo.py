"""The lazyd demo: lazily pull an image through containerd and run it, with timings.

Starts, on loopback only and in a private tmpfs: a Debian ``docker-registry``,
``containerd`` with lazyd as a proxy snapshotter, ``lazyd serve`` and
``lazyd snapshotter``.  Builds a debian+python3 image locally (debootstrap, cached),
converts it to eStargz with ``lazyctl image convert``, then compares

* a normal ``ctr images pull`` + ``ctr run`` on containerd's overlayfs snapshotter, with
* ``lazyctl rpull`` + ``ctr run --snapshotter lazyd``.

With ``--rate`` / ``--rtt`` the registry link is throttled (htb class on ``lo`` plus a
delay proxy); the qdisc is removed again at the end.

Run as root: ``sudo scripts/demo`` (which installs everything first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.containerd import Containerd, start_containerd  # noqa: E402
from tests.support.images import debian_python_layout, push  # noqa: E402
from tests.support.netem import throttled_link  # noqa: E402
from tests.support.procs import Proc, wait_until  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402


def sh(*argv: str, quiet: bool = True) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo: {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    if not quiet:
        sys.stdout.write(proc.stdout)
    return proc.stdout


def timed(*argv: str) -> tuple[float, str]:
    start = time.monotonic()
    out = sh(*argv)
    return time.monotonic() - start, out


def timed_ctr(containerd: "Containerd", *args: str) -> tuple[float, str]:
    start = time.monotonic()
    out = containerd.ctr(*args).stdout
    return time.monotonic() - start, out


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="", help="throttle the registry link, e.g. 200mbit (default: none)")
    parser.add_argument("--rtt", type=float, default=0.0, help="added round-trip time in ms with --rate")
    parser.add_argument("--keep", action="store_true", help="leave the work dir in place")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it mounts FUSE and overlayfs and runs containerd)")

    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="lazyd-demo-"))
        # A tmpfs keeps unpack timings honest on this ext4 (see platform notes).
        sh("mount", "-t", "tmpfs", "-o", "size=2g,mode=0700", "tmpfs", str(work))
        if not args.keep:  # callbacks run last-in first-out: unmount, then remove
            stack.callback(lambda: os.rmdir(work) if work.exists() else None)
        stack.callback(lambda: subprocess.run(["umount", "-l", str(work)]) and None)

        step("building the debian+python3 image (cached after the first run)")
        layout = debian_python_layout()

        step("starting a registry, lazyd serve, lazyd snapshotter and containerd")
        registry = start_registry(work, name="registry")
        stack.callback(registry.stop)
        upstream = registry.host
        plain = push(f"oci:{layout}:latest", upstream, "demo/python:plain")
        sock = work / "lazyd.sock"
        lazyd = Proc(["lazyd", "serve", "--root", str(work / "lazyd"), "--socket", str(sock)], work / "lazyd.log")
        stack.callback(lambda: subprocess.run(["lazyctl", "shutdown", "--socket", str(sock)], capture_output=True))
        wait_until(lambda: sock.exists() or not lazyd.alive(), 20, "lazyd serve socket")
        snap_sock = work / "snapshotter.sock"
        snapshotter = Proc(
            ["lazyd", "snapshotter", "--root", str(work / "snapshotter"), "--address", str(snap_sock),
             "--lazyd-socket", str(sock)],
            work / "snapshotter.log",
        )
        stack.callback(snapshotter.stop)
        wait_until(lambda: snap_sock.exists() or not snapshotter.alive(), 20, "lazyd snapshotter socket")
        containerd = start_containerd(work / "containerd", snapshotter_address=str(snap_sock))
        stack.callback(containerd.stop)

        step("converting the image to eStargz with lazyctl image convert")
        esgz = f"{upstream}/demo/python:esgz"
        convert_s, out = timed("lazyctl", "image", "convert", "--plain-http", "--json", plain, esgz)
        summary = json.loads(out)

        host = upstream
        if args.rate:
            step(f"throttling the registry link to {args.rate}, +{args.rtt:g} ms RTT")
            host = stack.enter_context(throttled_link(registry.port, args.rate, args.rtt / 1000))

        plain_ref = f"{host}/demo/python:plain"
        esgz_ref = f"{host}/demo/python:esgz"
        hello = ["python3", "-c", "print('hello from a lazily pulled container')"]

        step("normal pull: ctr images pull + ctr run (overlayfs)")
        pull_s, _ = timed_ctr(containerd, "images", "pull", "--plain-http", plain_ref)
        run_s, run_out = timed_ctr(containerd, "run", "--rm", plain_ref, "demo-plain", *hello)

        step("lazy pull: lazyctl rpull + ctr run --snapshotter lazyd")
        # Through the running lazyd (its socket): the pull a user of a lazyd node makes.
        rpull_s, rpull_out = timed("lazyctl", "rpull", "--plain-http", "--json", "--socket", str(sock),
                                   "--address", containerd.address, "--snapshotter", "lazyd", esgz_ref)
        pulled_by = json.loads(rpull_out)["pulled_by"]
        lrun_s, lrun_out = timed_ctr(containerd, "run", "--rm", "--snapshotter", "lazyd", esgz_ref,
                                     "demo-lazy", *hello)
        print(lrun_out.strip())
        status = json.loads(sh("lazyctl", "status", "--socket", str(sock), "--json"))

        layers = {m["layer_digest"]: m["layer"] for m in status.get("mounts", [])}
        fetched = sum(layer["fetched_bytes"] for layer in layers.values())
        layer_total = sum(layer["layer_size"] for layer in layers.values())
        rows = [
            ("ctr pull + run (overlayfs)", f"{pull_s:.2f}", f"{run_s:.2f}", f"{pull_s + run_s:.2f}", "whole image"),
            ("lazyctl rpull + run (lazyd)", f"{rpull_s:.2f}", f"{lrun_s:.2f}", f"{rpull_s + lrun_s:.2f}",
             f"{fetched / 1e6:.1f} of {layer_total / 1e6:.1f} MB"),
        ]
        print()
        print(f"image: debian bookworm + python3, {len(summary['manifests'][0]['layers'])} layers; "
              f"converted to eStargz in {convert_s:.1f} s")
        widths = [30, 8, 8, 8, 20]
        header = ("client", "pull s", "run s", "total s", "fetched")
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        print("  ".join("-" * w for w in widths))
        for row in rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        by = "the running lazyd" if pulled_by == "lazyd" else "lazyctl itself (lazyd's socket did not answer)"
        print(f"\nthe lazy pull was done by {by}")
        print(f"speed-up to first output: {(pull_s + run_s) / (rpull_s + lrun_s):.1f}x")
        assert "hello from a lazily pulled container" in run_out + lrun_out
    return 0


if __name__ == "__main__":
    sys.exit(main())
