"""Mount-table helpers shared by the FUSE worker, the fetcher and the snapshotter:
find, bind and (lazily) unmount mounts, and spot dead FUSE mounts."""

from __future__ import annotations

import errno
import os
import subprocess


class MountError(Exception):
    """A mount or unmount command failed; the message holds its output."""


def _unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` etc.) of /proc/self/mountinfo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mount_points()


def mountpoints_below(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = os.path.realpath(path)
    inside = {p for p in mount_points() if p == prefix or p.startswith(prefix + "/")}
    return sorted(inside, key=len, reverse=True)


def unmount_below(path: str | os.PathLike[str]) -> None:
    """Lazily unmount every mount at or below ``path``, ignoring failures."""
    for point in mountpoints_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def is_dead(path: str) -> bool:
    """True when ``path`` is a FUSE mount whose server is gone (ENOTCONN).

    ``statvfs`` is used as well as ``stat``: the kernel answers ``stat`` from its
    attribute cache even after the server died, but always forwards ``statfs``.
    """
    for probe in (os.stat, os.statvfs):
        try:
            probe(path)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return True
    return False


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MountError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")


def unmount_all_at(path: str, lazy: bool = True) -> None:
    """Unmount every mount stacked at ``path`` (lazily by default: busy mounts detach)."""
    path = os.path.realpath(path)
    for _ in range(16):
        if path not in mount_points():
            return
        _run("umount", *(["-l"] if lazy else []), path)
    raise MountError(f"{path} is still mounted after 16 unmounts")


def bind_readonly(src: str, dst: str) -> None:
    """Bind ``src`` at ``dst`` and make the bind read-only."""
    _run("mount", "--bind", src, dst)
    try:
        _run("mount", "-o", "remount,bind,ro", dst)
    except MountError:
        _run("umount", "-l", dst)
        raise
