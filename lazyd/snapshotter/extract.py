"""Extract a lazily mounted layer into a plain local directory (layer promotion).

The source is a layer's lazyd FUSE mount once every chunk is cached and verified:
reading through it yields the TOC-verified bytes from the chunk store, and the
mount already shows the layer in overlayfs form (whiteouts as 0:0 character
devices, opaque directories with ``trusted.overlay.opaque=y``, hardlinks as one
inode with ``st_nlink > 1``).  ``extract_layer`` copies that view exactly.

Crash safety: everything is written below ``DEST.tmp`` (removed first if a crashed
attempt left one), made durable with ``syncfs`` on the destination filesystem, and
only then renamed to ``DEST`` (and the parent directory fsynced).  A crash at any
point leaves either no ``DEST`` or a complete one; ``cleanup_partial`` removes a
leftover ``DEST.tmp``.

Safety: names come only from directory listings and are refused if they contain
``/`` or are ``.``/``..``; every operation is relative to an open directory
descriptor with ``O_NOFOLLOW`` (or ``follow_symlinks=False``), so symlinks in the
source or the destination are never followed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ExtractAborted", "ExtractError", "ExtractStats", "cleanup_partial", "extract_layer", "tmp_path_for"]

# Bytes per sendfile/read call: large enough to amortise the syscall, small enough
# that ``should_stop`` is consulted often during a big file.
_COPY_BLOCK = 8 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Capabilities are cleared by chown, so they are set after it (last of the xattrs).
_CAPABILITY = "security.capability"


class ExtractError(Exception):
    """Extraction failed; the message names the path and the reason (e.g. the errno text)."""


class ExtractAborted(ExtractError):
    """``should_stop()`` asked the extraction to stop; nothing was left behind."""


@dataclass
class ExtractStats:
    """What one extraction wrote.

    ``devices`` counts character and block devices, fifos and whiteouts (0:0 char
    devices); ``dirs`` includes the layer root; ``hardlinks`` counts the extra names
    of a multiply linked inode (the first name is counted by its type).
    ``peak_disk_bytes`` is the sum of the allocated blocks (``st_blocks * 512``) of
    every inode written, each counted once: the extraction only adds to the tree, so
    this is its peak (the chunk cache still holds the layer meanwhile, not counted).
    """

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    bytes: int = 0
    seconds: float = 0.0
    peak_disk_bytes: int = 0


def tmp_path_for(dest: Path) -> Path:
    """The work directory an extraction into ``dest`` writes to before its final rename."""
    return dest.parent / (dest.name + ".tmp")


def cleanup_partial(dest: Path) -> bool:
    """Remove the work directory a crashed extraction into ``dest`` left; True if there was one."""
    tmp = tmp_path_for(dest)
    if not os.path.lexists(tmp):
        return False
    _remove(tmp)
    return True


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _fail(path: str, exc: OSError) -> ExtractError:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "?"
    reason = exc.strerror or str(exc)
    return ExtractError(f"extracting {path}: {reason} ({code})")


def _check_name(name: str, where: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ExtractError(f"refusing entry name {name!r} in {where or '/'}")


def _libc_func(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    try:
        func = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    func.argtypes = argtypes
    func.restype = ctypes.c_int
    return func


def _syncfs(fd: int) -> None:
    """Flush the filesystem holding ``fd`` (data and metadata); os.sync() if syncfs is missing."""
    func = _libc_func("syncfs", [ctypes.c_int])
    if func is None:
        os.sync()
        return
    if func(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_noreplace(old: Path, new: Path) -> None:
    """rename(2) that fails with EEXIST if ``new`` exists (plain rename would replace an empty dir)."""
    func = _libc_func("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
    if func is None:
        if os.path.lexists(new):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(new))
        os.rename(old, new)
        return
    if func(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(new))


@dataclass
class _Dir:
    """One directory being copied: its open descriptors, pending entries and source metadata."""

    rel: str
    src_fd: int
    dst_fd: int
    st: os.stat_result
    entries: list[tuple[str, os.stat_result]]
    pos: int = 0


@dataclass
class _Run:
    """The state of one extraction (no globals: several may run in parallel threads)."""

    should_stop: Callable[[], bool] | None
    stats: ExtractStats = field(default_factory=ExtractStats)
    links: dict[tuple[int, int], str] = field(default_factory=dict)  # source (dev, ino) -> first dest path
    root_fd: int = -1

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise ExtractAborted("extraction stopped on request")

    # -- per-entry helpers --------------------------------------------------

    def list_dir(self, src_fd: int, rel: str) -> list[tuple[str, os.stat_result]]:
        out = []
        with os.scandir(src_fd) as it:
            for e in it:
                _check_name(e.name, rel)
                out.append((e.name, e.stat(follow_symlinks=False)))
        out.sort()
        return out

    def copy_xattrs(self, src: int | str, dst: int | str) -> None:
        """Copy every xattr (security.capability last); paths are used without following symlinks."""
        # follow_symlinks=False applies to paths only (an fd is never a symlink).
        src_follow, dst_follow = isinstance(src, int), isinstance(dst, int)
        names = os.listxattr(src, follow_symlinks=src_follow)
        names.sort(key=lambda n: n == _CAPABILITY)
        for name in names:
            value = os.getxattr(src, name, follow_symlinks=src_follow)
            os.setxattr(dst, name, value, follow_symlinks=dst_follow)

    def finish_fd(self, fd: int, src_xattrs: int | str, st: os.stat_result) -> None:
        """Owner, mode, xattrs and times of an open destination inode (in that order)."""
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        self.copy_xattrs(src_xattrs, fd)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.stats.peak_disk_bytes += os.fstat(fd).st_blocks * 512

    def copy_data(self, src: int, dst: int, size: int, rel: str) -> None:
        copied = 0
        use_sendfile = True
        buf = None
        while True:
            self.check_stop()
            n = 0
            if use_sendfile:
                try:
                    n = os.sendfile(dst, src, None, _COPY_BLOCK)
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or copied:
                        raise
                    use_sendfile = False
            if not use_sendfile:
                if buf is None:
                    buf = bytearray(min(_COPY_BLOCK, max(size, 1 << 16)))
                got = os.readv(src, [buf])
                view = memoryview(buf)[:got]
                while view:
                    view = view[os.write(dst, view):]
                n = got
            if n == 0:
                break
            copied += n
        if copied != size:
            raise ExtractError(f"extracting {rel}: read {copied} bytes, the source says {size}")
        self.stats.bytes += copied

    def copy_entry(self, d: _Dir, name: str, st: os.stat_result) -> _Dir | None:
        """Copy one non-directory entry, or open a directory and return its frame."""
        rel = f"{d.rel}/{name}" if d.rel else name
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=d.dst_fd)
            src_fd = os.open(name, _DIR_FLAGS, dir_fd=d.src_fd)
            try:
                dst_fd = os.open(name, _DIR_FLAGS, dir_fd=d.dst_fd)
            except BaseException:
                os.close(src_fd)
                raise
            frame = _Dir(rel, src_fd, dst_fd, st, [])
            try:
                frame.entries = self.list_dir(src_fd, rel)
            except BaseException:
                os.close(src_fd)
                os.close(dst_fd)
                raise
            return frame
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            first = self.links.get(key)
            if first is not None:
                os.link(first, name, src_dir_fd=self.root_fd, dst_dir_fd=d.dst_fd, follow_symlinks=False)
                self.stats.hardlinks += 1
                return None
            self.links[key] = rel
        src_path = f"/proc/self/fd/{d.src_fd}/{name}"
        dst_path = f"/proc/self/fd/{d.dst_fd}/{name}"
        if stat.S_ISREG(mode):
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.src_fd)
            try:
                if not stat.S_ISREG(os.fstat(src).st_mode):
                    raise ExtractError(f"extracting {rel}: no longer a regular file")
                dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=d.dst_fd)
                try:
                    self.copy_data(src, dst, st.st_size, rel)
                    self.finish_fd(dst, src, st)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            self.stats.files += 1
            return None
        if stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=d.src_fd)
            os.symlink(target, name, dir_fd=d.dst_fd)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=d.dst_fd, follow_symlinks=False)
            self.stats.symlinks += 1
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=d.dst_fd)
            # Just created by us and not a symlink: chmod may follow (it cannot without AT_SYMLINK_NOFOLLOW).
            os.chown(name, st.st_uid, st.st_gid, dir_fd=d.dst_fd, follow_symlinks=False)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=d.dst_fd)
            self.stats.devices += 1
        else:
            raise ExtractError(f"extracting {rel}: unsupported file type {oct(stat.S_IFMT(mode))}")
        self.copy_xattrs(src_path, dst_path)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=d.dst_fd, follow_symlinks=False)
        self.stats.peak_disk_bytes += os.lstat(name, dir_fd=d.dst_fd).st_blocks * 512
        return None

    def finish_dir(self, d: _Dir) -> None:
        """A directory's metadata, once its whole subtree is written (so its times stay)."""
        self.finish_fd(d.dst_fd, d.src_fd, d.st)
        self.stats.dirs += 1

    # -- the walk -----------------------------------------------------------

    def walk(self, src_root: int, dst_root: int) -> None:
        try:
            root = _Dir("", src_root, dst_root, os.fstat(src_root), self.list_dir(src_root, ""))
        except OSError as exc:
            raise _fail("/", exc) from exc
        stack = [root]
        try:
            while stack:
                d = stack[-1]
                if d.pos < len(d.entries):
                    name, st = d.entries[d.pos]
                    d.pos += 1
                    self.check_stop()
                    try:
                        child = self.copy_entry(d, name, st)
                    except OSError as exc:
                        raise _fail(f"{d.rel}/{name}" if d.rel else name, exc) from exc
                    if child is not None:
                        stack.append(child)
                    continue
                try:
                    self.finish_dir(d)
                except OSError as exc:
                    raise _fail(d.rel or "/", exc) from exc
                stack.pop()
                if d is not root:
                    os.close(d.src_fd)
                    os.close(d.dst_fd)
        finally:
            for d in stack:
                if d is not root:
                    os.close(d.src_fd)
                    os.close(d.dst_fd)


def extract_layer(src: Path, dest: Path, *, should_stop: Callable[[], bool] | None = None) -> ExtractStats:
    """Copy the tree at ``src`` (a fully cached layer mount) to the new directory ``dest``, atomically.

    Synchronous; run it in a thread.  Raises ExtractError (``dest`` exists, any OSError,
    with the path and errno text) or ExtractAborted (``should_stop()`` returned True);
    in both cases the work directory ``dest.tmp`` is removed and ``dest`` not created.
    """
    t0 = time.monotonic()
    dest = Path(dest)
    tmp = tmp_path_for(dest)
    if os.path.lexists(dest):
        raise ExtractError(f"extraction target {dest} already exists")
    run = _Run(should_stop)
    try:
        try:
            cleanup_partial(dest)
        except OSError as exc:
            raise _fail(f"{tmp} (removing a partial extraction)", exc) from exc
        try:
            src_fd = os.open(src, _DIR_FLAGS)
        except OSError as exc:
            raise _fail(str(src), exc) from exc
        try:
            try:
                os.mkdir(tmp, 0o700)
                run.root_fd = os.open(tmp, _DIR_FLAGS)
            except OSError as exc:
                raise _fail(str(tmp), exc) from exc
            try:
                run.walk(src_fd, run.root_fd)
                run.check_stop()
                try:
                    _syncfs(run.root_fd)
                except OSError as exc:
                    raise _fail(f"{tmp} (syncfs)", exc) from exc
                run.check_stop()
            finally:
                os.close(run.root_fd)
        finally:
            os.close(src_fd)
        try:
            _rename_noreplace(tmp, dest)
        except OSError as exc:
            raise _fail(str(dest), exc) from exc
    except BaseException:
        try:
            cleanup_partial(dest)
        except OSError:
            pass  # the next attempt removes it first
        raise
    # The tree is durable and in place; make the rename durable too.
    try:
        parent_fd = os.open(dest.parent, _DIR_FLAGS)
        try:
            os.fsync(parent_fd)
        finally:
            os.close(parent_fd)
    except OSError as exc:
        raise _fail(f"{dest.parent} (fsync)", exc) from exc
    run.stats.seconds = time.monotonic() - t0
    return run.stats
