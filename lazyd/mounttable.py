"""Mount-table helpers shared by the FUSE worker, the fetcher and the snapshotter:
find, bind and (lazily) unmount mounts, and spot dead FUSE mounts.

Mounts and unmounts are the mount(2)/umount2(2) system calls (through libc), not
mount(8) and umount(8): a fork and exec per call cost a worker about 15 ms.
"""

from __future__ import annotations

import ctypes
import errno
import os
from functools import cache

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
# statvfs f_flag bits kept by a read-only remount of a bind (util-linux does the same).
_KEPT_FLAGS = {os.ST_NOSUID: 0x2, os.ST_NODEV: 0x4, os.ST_NOEXEC: 0x8, os.ST_NOATIME: 0x400,
               os.ST_NODIRATIME: 0x800, os.ST_RELATIME: 0x200000}


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
        try:
            _umount(point, lazy=True)
        except MountError:
            pass


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


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise MountError(f"{what} failed: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


def _mount(src: str | None, dst: str, flags: int, what: str) -> None:
    _check(_libc().mount(src.encode() if src is not None else None, dst.encode(), None, flags, None), what)


def _umount(path: str, lazy: bool) -> None:
    _check(_libc().umount2(path.encode(), MNT_DETACH if lazy else 0),
           f"umount{' -l' if lazy else ''} {path}")


def unmount_all_at(path: str, lazy: bool = True) -> None:
    """Unmount every mount stacked at ``path`` (lazily by default: busy mounts detach)."""
    path = os.path.realpath(path)
    for _ in range(16):
        if path not in mount_points():
            return
        _umount(path, lazy)
    raise MountError(f"{path} is still mounted after 16 unmounts")


def bind_readonly(src: str, dst: str) -> None:
    """Bind ``src`` at ``dst`` and make the bind read-only (keeping nosuid, nodev etc.)."""
    _mount(src, dst, MS_BIND, f"mount --bind {src} {dst}")
    try:
        try:
            current = os.statvfs(dst).f_flag
        except OSError as exc:
            raise MountError(f"statvfs {dst} after binding it failed: {exc}") from None
        kept = sum(ms for st, ms in _KEPT_FLAGS.items() if current & st)
        _mount(None, dst, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, f"mount -o remount,bind,ro {dst}")
    except MountError:
        _umount(dst, lazy=True)
        raise
