#!/usr/bin/env python3
"""The floor of a full walk through FUSE, without Python or fetching: what the protocol costs a file.

``bench/fuse_walk_floor.c`` serves a tree of ``--dirs`` x ``--files`` small files (under 1.4 KB,
as in ``bench_walk.py``'s layer) from memory.  Sides, each walked from a fresh mount (cold
kernel caches) with ``busybox tar -cf - . | wc -c`` (the workload of ``bench_walk.py``) and GNU
``tar``:

* ``native``: the same tree on a tmpfs (what a full download leaves);
* ``libfuse2``: READDIR, then a LOOKUP and a READ per file (what lazyd's llfuse worker can do);
* ``libfuse3 readdir``: the same through libfuse 3;
* ``libfuse3 plus``: READDIRPLUS (the listing carries the attributes: no LOOKUP);
* ``libfuse3 push``: READDIRPLUS, and the first READ of a file of a directory writes the other
  files listed since into the page cache (FUSE_NOTIFY_STORE), so they need no READ;
* ``pyfuse3 plus`` and ``pyfuse3 push``: the last two served by Python on pyfuse3
  (``bench/pyfuse3_walk_floor.py``), the interpreter of ``--pyfuse3-python``: what Python adds.
  They need a pyfuse3 whose ``read`` gets the inode with "no_open" (lazyd's patched build); the
  sides are left out, with a note, when that Python has no pyfuse3.

The libfuse 3 sides need ``libfuse3-dev`` (``scripts/setup`` installs it).  Every side's tar
output is checked to be byte-identical to the native one (the tree's time stamps are all 0).
Sides alternate within each round; the report gives medians and ratios to ``native`` and
``libfuse2`` measured in the same run.

Run as root:  python3 bench/bench_walk_floor.py [--dirs 100] [--files 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("fuse_walk_floor.c")
PY_SERVER = Path(__file__).with_name("pyfuse3_walk_floor.py")
RESULTS = Path(__file__).with_name("results")
WALKERS = {"busybox tar": "busybox tar -cf - .", "GNU tar": "tar -cf - ."}
CHECK = "tar --sort=name --format=ustar -cf - ."


def build(work: Path, fuse3: bool) -> Path:
    exe = work / ("fuse_walk_floor3" if fuse3 else "fuse_walk_floor2")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3" if fuse3 else "fuse"], capture_output=True,
                           text=True, check=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-Wall", *(["-DFUSE3"] if fuse3 else []), "-o", str(exe), str(SOURCE), *flags,
                    "-lpthread"], check=True)
    return exe


def native_tree(root: Path, dirs: int, files: int) -> None:
    """The tree the C filesystem serves, on disk: same names, modes, sizes, zero bytes, time stamps 0."""
    file0 = dirs + 2
    for d in range(dirs):
        sub = root / f"d{d:02d}"
        sub.mkdir(mode=0o755)
        for i in range(files):
            ino = file0 + d * files + i
            path = sub / f"f{i:06d}"
            path.write_bytes(bytes(ino * 2654435761 % 1400))  # as the C code: 64-bit product
            path.chmod(0o644)
            os.utime(path, (0, 0))
        os.utime(sub, (0, 0))
    root.chmod(0o755)
    os.utime(root, (0, 0))


def mounted(server: list[str], mnt: Path, dirs: int, files: int, mode: str) -> subprocess.Popen[bytes]:
    """Start ``server MOUNTPOINT DIRS FILES MODE`` and wait for its mount."""
    proc = subprocess.Popen([*server, str(mnt), str(dirs), str(files), mode])
    deadline = time.monotonic() + 10
    while not os.path.ismount(mnt):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"{' '.join(server)} did not mount {mnt} ({mode})")
        time.sleep(0.02)
    return proc


def unmount(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    for tool in ("fusermount3", "fusermount"):
        if shutil.which(tool) and subprocess.run([tool, "-u", str(mnt)], capture_output=True).returncode == 0:
            break
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def walk(cwd: Path, command: str) -> tuple[float, int]:
    t0 = time.monotonic()
    out = subprocess.run(f"{command} | wc -c", shell=True, cwd=cwd, capture_output=True, text=True, check=True).stdout
    return time.monotonic() - t0, int(out)


def digest(cwd: Path, command: str) -> str:
    out = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, check=True).stdout
    return hashlib.sha256(out).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", type=int, default=100)
    ap.add_argument("--files", type=int, default=1000, help="files per directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--pyfuse3-python", default=sys.executable,
                    help="the Python that runs the pyfuse3 sides (default: this one)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (FUSE mounts)", file=sys.stderr)
        return 2
    total = args.dirs * args.files
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="lazyd-walk-floor-", dir="/dev/shm"))
    try:
        sides: dict[str, tuple[list[str], str] | None] = {"native": None,
                                                          "libfuse2": ([str(build(work, False))], "readdir")}
        has_fuse3 = subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode == 0
        if has_fuse3:
            exe3 = [str(build(work, True))]
            sides |= {"libfuse3 readdir": (exe3, "readdir"), "libfuse3 plus": (exe3, "plus"),
                      "libfuse3 push": (exe3, "push")}
        else:
            print("# libfuse3-dev is not installed: only the libfuse 2 side runs", flush=True)
        if subprocess.run([args.pyfuse3_python, "-c", "import pyfuse3"], capture_output=True).returncode == 0:
            py = [args.pyfuse3_python, str(PY_SERVER)]
            sides |= {"pyfuse3 plus": (py, "plus"), "pyfuse3 push": (py, "push")}
        else:
            print(f"# {args.pyfuse3_python} has no pyfuse3: the pyfuse3 sides are left out", flush=True)
        native = work / "native"
        native.mkdir()
        native_tree(native, args.dirs, args.files)
        mnt = work / "mnt"
        mnt.mkdir()
        times: dict[tuple[str, str], list[float]] = {(s, w): [] for s in sides for w in WALKERS}
        names = list(sides)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for walker, command in WALKERS.items():
                for side in order:
                    spec = sides[side]
                    if spec is None:
                        seconds, _ = walk(native, command)
                    else:
                        proc = mounted(spec[0], mnt, args.dirs, args.files, spec[1])
                        try:
                            seconds, _ = walk(mnt, command)
                        finally:
                            unmount(proc, mnt)
                    times[(side, walker)].append(seconds)
                    print(f"# round {rnd + 1} {walker} {side}: {seconds:.2f} s", flush=True)
        # The same bytes on every side (an untimed walk each, in name order: listings differ in order).
        expected = digest(native, CHECK)
        for side, spec in sides.items():
            if spec is None:
                continue
            proc = mounted(spec[0], mnt, args.dirs, args.files, spec[1])
            try:
                if digest(mnt, CHECK) != expected:
                    raise SystemExit(f"{side}: tar of the FUSE tree differs from the native tree's")
            finally:
                unmount(proc, mnt)
        lines = [f"# bench_walk_floor: {args.dirs} x {args.files} files, {args.rounds} rounds, {stamp}", "",
                 "Cold walks (fresh mount), medians; every side's tar output identical to native's.", "",
                 "| walker | side | walk s | µs a file | ÷ native | ÷ libfuse2 |", "|---|---|---|---|---|---|"]
        for walker in WALKERS:
            base = statistics.median(times[("native", walker)])
            fuse2 = statistics.median(times[("libfuse2", walker)])
            for side in names:
                med = statistics.median(times[(side, walker)])
                lines.append(f"| {walker} | {side} | {med:.2f} | {1e6 * med / total:.1f} | {med / base:.2f} | "
                             f"{med / fuse2:.2f} |")
        lines += ["", f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
                  f"({os.cpu_count()} CPUs)"]
        report = "\n".join(lines) + "\n"
        print("\n" + report)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"walk-floor-{stamp}.md").write_text(report)
        print(f"# wrote {args.out / f'walk-floor-{stamp}.md'}")
        return 0
    finally:
        if os.path.ismount(work / "mnt"):
            subprocess.run(["umount", "-l", str(work / "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
