#!/usr/bin/env python3
"""``bench/fuse_walk_floor.c``'s tree served by Python on pyfuse3 (libfuse 3, trio): what Python costs.

The same tree, names, sizes and time stamps as the C server (see its header): ``DIRS`` x ``FILES``
small files of zeros.  Modes (pyfuse3 always lists with READDIRPLUS):

* ``plus``: READDIRPLUS, then one READ per file;
* ``push``: READDIRPLUS, and the first READ of a file of a directory writes the other files of the
  directory listed since into the kernel's page cache (``pyfuse3.notify_store``).

OPEN is answered with ENOSYS ("no_open"), which needs a pyfuse3 whose ``read`` gets the inode when
the kernel sends no file handle (the one-line change of lazyd's llfuse patch, ``c.fh = fi.fh if
fi.fh else ino`` in ``fuse_read``); with a stock pyfuse3 the first READ fails and this says so.

    usage: python3 bench/pyfuse3_walk_floor.py MOUNTPOINT DIRS FILES plus|push
"""

from __future__ import annotations

import errno
import stat
import sys

import pyfuse3
import trio

ZEROS = bytes(2048)
TIMEOUT = 3600.0


class FloorFS(pyfuse3.Operations):
    """The floor tree, read-only, from memory."""

    def __init__(self, dirs: int, files: int, push: bool) -> None:
        super().__init__()
        self.dirs, self.files, self.push = dirs, files, push
        self.file0 = dirs + 2
        self.batch: dict[int, tuple[int, int]] = {}  # directory -> files listed and not pushed yet

    def is_dir(self, ino: int) -> bool:
        return 2 <= ino < self.file0

    def size_of(self, ino: int) -> int:
        return (ino * 2654435761) % (1 << 64) % 1400

    def entry(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.attr_timeout = e.entry_timeout = TIMEOUT
        if ino == pyfuse3.ROOT_INODE or self.is_dir(ino):
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFDIR | 0o755, 2, 4096
        else:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o644, 1, self.size_of(ino)
        return e

    async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            if parent == pyfuse3.ROOT_INODE and name.startswith(b"d") and 0 <= int(name[1:]) < self.dirs:
                return self.entry(int(name[1:]) + 2)
            if self.is_dir(parent) and name.startswith(b"f") and 0 <= int(name[1:]) < self.files:
                return self.entry(self.file0 + (parent - 2) * self.files + int(name[1:]))
        except ValueError:
            pass
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, ino: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(ino)

    async def opendir(self, ino: int, ctx: pyfuse3.RequestContext) -> int:
        return ino

    async def readdir(self, ino: int, off: int, token: pyfuse3.ReaddirToken) -> None:
        root = ino == pyfuse3.ROOT_INODE
        n = self.dirs if root else self.files
        first = last = -1
        for i in range(off, n):
            child = i + 2 if root else self.file0 + (ino - 2) * self.files + i
            name = f"d{i:02d}" if root else f"f{i:06d}"
            if not pyfuse3.readdir_reply(token, name.encode(), self.entry(child), i + 1):
                break
            if first < 0:
                first = i
            last = i + 1
        if not root and first >= 0:
            lo, hi = self.batch.get(ino - 2, (0, 0))
            self.batch[ino - 2] = (first if hi == lo else lo, max(hi, last))

    async def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def read(self, ino: int, off: int, size: int) -> bytes:
        if ino == 0:
            raise pyfuse3.FUSEError(errno.EBADF)  # a stock pyfuse3: no inode with no_open
        if self.push:
            d = (ino - self.file0) // self.files
            lo, hi = self.batch.pop(d, (0, 0))
            for i in range(lo, hi):
                child = self.file0 + d * self.files + i
                n = self.size_of(child)
                if child != ino and n:
                    pyfuse3.notify_store(child, 0, ZEROS[:n])
        n = self.size_of(ino)
        return ZEROS[:max(0, min(size, n - off))]

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)


def main() -> int:
    if len(sys.argv) != 5 or sys.argv[4] not in ("plus", "push"):
        print(__doc__.split("usage: ")[1].strip(), file=sys.stderr)
        return 2
    mnt, dirs, files, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    fs = FloorFS(dirs, files, mode == "push")
    pyfuse3.init(fs, mnt, {"fsname=floor", "ro", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
