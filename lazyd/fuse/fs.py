"""The read-only filesystem of a worker (``LayerFS``): one top-level directory per layer.

``LayerFS`` answers every operation whatever the binding; ``LazyFS`` (here) serves it through
llfuse (libfuse 2), ``lazyd.fuse.fs3.LazyFS3`` through pyfuse3 (libfuse 3, the default).

Inode numbers: the FUSE root is ``ROOT_INODE``; inode ``i`` of the layer
in slot ``s`` (slots start at 1 and are never reused) is ``s << 32 | i``, so
numbers are unique across the layers of one worker and stable for its life.
Every handler runs under the binding's lock (``LayerFS.lock``); the reader releases it
while it waits for the fetcher.  Attributes never change, so the kernel may cache
entries, attributes and page-cache data for as long as it likes.

Opens: with lazyd's patched llfuse or pyfuse3 (``contrib/``, version ``+lazyd.readino``),
``read`` gets the inode when the kernel sends no file handle.  The first OPEN is then
answered with ENOSYS, which switches the kernel to "no_open": it opens files by
itself, sends no OPEN or RELEASE, keeps the page cache, and sends READ with fh 0.
That halves the round trips of an open+read of a cached file.  With a stock binding,
``open`` returns the inode as the handle, so ``read`` sees the same number.

Extended attributes: a worker may tell the kernel it has none (``LayerFS.xattrs``, config
``xattr_free_workers``), so that overlayfs's per-file GETXATTRs never reach it.

Tracing (``trace=True``, the tracing worker): OPEN is never refused, so the kernel
sends one for every ``open()``/``execve()`` of a file, cached or not, and each layer keeps
the first open of each regular file in order (``OpenTrace``), for ``lazyctl image optimize``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from dataclasses import dataclass, field

from contextlib import AbstractContextManager
from typing import Any

import llfuse

from lazyd.estargz.inodes import ROOT, InodeTable
from lazyd.fuse.reader import ChunkReader, MountCounters

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 3600.0
ROOT_INODE = 1  # llfuse.ROOT_INODE and pyfuse3.ROOT_INODE
_SLOT_SHIFT = 32
_LOCAL_MASK = (1 << _SLOT_SHIFT) - 1
# Built attributes kept per inode (they never change); the whole cache is dropped when full.
_ATTR_CACHE_ENTRIES = 1 << 16
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# llfuse builds whose read() gets the inode in place of a zero file handle.
READ_GETS_INODE = llfuse.__version__.endswith("+lazyd.readino")
# Files a trace keeps per layer (the wire's list limit), then it stops and says ``truncated``.
TRACE_LIMIT = 100_000
TRACE_MAX_CHARS = 8 << 20  # total path characters of one trace (the wire's frame limit is 16 MiB)


class OpenTrace:
    """The first open of each regular file of one layer, in order, bounded by TRACE_LIMIT."""

    def __init__(self, limit: int = TRACE_LIMIT) -> None:
        self.limit = limit
        self.order: list[int] = []
        self.seqs: list[int] = []  # the worker-wide open number of each, to merge the layers' traces
        self._seen: set[int] = set()
        self.truncated = False

    def note(self, local: int, seq: int) -> None:
        """Record open number ``seq`` of local inode ``local`` (cheap: called under llfuse's lock)."""
        if local in self._seen:
            return
        if len(self.order) >= self.limit:
            self.truncated = True
            return
        self._seen.add(local)
        self.order.append(local)
        self.seqs.append(seq)

    def snapshot(self) -> tuple[list[int], list[int], bool]:
        """The inodes recorded so far, their open numbers, and whether the trace is truncated
        (callers hold llfuse.lock)."""
        return list(self.order), list(self.seqs), self.truncated


def trace_paths(table: InodeTable, order: list[int], seqs: list[int],
                truncated: bool) -> tuple[list[str], list[int], bool]:
    """Traced inodes as root-relative paths (a hardlinked file by its first name in TOC order), with
    their open numbers.  Runs outside llfuse's lock: the table never changes.  Stops (``truncated``)
    past TRACE_MAX_CHARS."""
    names: dict[int, dict[int, bytes]] = {}  # directory -> {child inode: first name}

    def path_of(ino: int) -> str:
        parts: list[bytes] = []
        while ino != ROOT:
            parent = table.parent(ino)
            children = names.get(parent)
            if children is None:
                children = {}
                for name, child in table.children(parent):
                    children.setdefault(child, name)
                names[parent] = children
            name = children.get(ino)
            if name is None:  # only reachable through a hardlink in another directory
                raise KeyError(ino)
            parts.append(name)
            ino = parent
        return b"/".join(reversed(parts)).decode()

    out: list[str] = []
    out_seqs: list[int] = []
    chars = 0
    for ino, seq in zip(order, seqs):
        try:
            try:
                path = path_of(ino)
            except KeyError:
                found = _search_path(table, ino)
                if found is None:
                    continue
                path = found
        except UnicodeDecodeError:
            continue  # not UTF-8: no record can name it (the reference's records are JSON strings)
        chars += len(path)
        if chars > TRACE_MAX_CHARS:
            truncated = True
            break
        out.append(path)
        out_seqs.append(seq)
    return out, out_seqs, truncated


def _search_path(table: InodeTable, target: int) -> str | None:
    """Any name of ``target`` by a walk of the layer's tree (for a hardlink whose first parent lacks it)."""
    stack: list[tuple[int, bytes]] = [(ROOT, b"")]
    while stack:
        ino, prefix = stack.pop()
        for name, child in table.children(ino):
            path = prefix + name
            if child == target:
                return path.decode()
            if table.is_dir(child):
                stack.append((child, path + b"/"))
    return None


class XattrsOff(Exception):
    """A layer with extended attributes, for a worker that has told the kernel it has none."""


@dataclass
class Layer:
    """One mounted layer: its name in the FUSE root, its digest and its inodes."""

    slot: int
    mount_id: str
    layer_digest: str
    table: InodeTable
    counters: MountCounters = field(default_factory=MountCounters)
    trace: OpenTrace | None = None

    def root_inode(self) -> int:
        return self.slot << _SLOT_SHIFT | ROOT


class LayerFS:
    """The read-only filesystem over the layers of one worker, whatever the FUSE binding.

    ``api`` is the binding's module (``llfuse`` or ``pyfuse3``: the same names for entry
    attributes, errors and the root inode).  Every method runs with ``lock`` held; the reader
    releases it while it waits (``unlocked``).  ``LazyFS`` serves these methods through llfuse
    as they are, ``lazyd.fuse.fs3.LazyFS3`` through pyfuse3.
    """

    def __init__(self, api: Any, lock: Any, reader: ChunkReader, no_open: bool, trace: bool = False,
                 xattrs: bool | None = True) -> None:
        super().__init__()
        self.api = api
        # Extended attributes: True, served; None ("auto"), decided at the first GETXATTR:
        # served if a mounted layer has some, else off; False, off: GETXATTR is answered ENOSYS,
        # and the kernel sends no more on this FUSE connection (overlayfs asks for two or three a
        # file) and answers EOPNOTSUPP itself, so no layer with extended attributes may be added
        # (``add_layer`` refuses it).  LISTXATTR is always answered: an empty list, as a normal
        # pull's files give, where the kernel's own answer would be EOPNOTSUPP.
        self.xattrs = xattrs
        self.lock = lock
        self.reader = reader
        self.trace = trace
        self.no_open = no_open and not trace  # a tracing FS must see every OPEN
        self._layers: dict[int, Layer] = {}
        self._by_name: dict[bytes, Layer] = {}
        self._slots = itertools.count(1)
        self._dir_handles: dict[int, tuple[int, list[tuple[bytes, int]]]] = {}
        self._handle_ids = itertools.count(1)
        self._root_mtime_ns = time.time_ns()
        # Layers never change, so the kernel may cache "no such name" too (st_ino 0).
        self._negative = api.EntryAttributes()
        self._negative.st_ino = 0
        self._negative.entry_timeout = CACHE_TIMEOUT
        self._attrs: dict[int, Any] = {}
        self._open_seq = itertools.count()  # numbers the opens of all traced layers, in order

    # -- layer management (callers hold ``lock``) -------------------------

    def add_layer(self, mount_id: str, layer_digest: str, table: InodeTable) -> Layer:
        name = mount_id.encode()
        if name in self._by_name:
            raise KeyError(f"layer directory {mount_id!r} already exists")
        if table.has_xattrs():
            if self.xattrs is False:
                raise XattrsOff(f"layer {layer_digest} has extended attributes, and this worker told the kernel "
                                "it has none")
            self.xattrs = True
        layer = Layer(next(self._slots), mount_id, layer_digest, table, trace=OpenTrace() if self.trace else None)
        self._layers[layer.slot] = layer
        self._by_name[name] = layer
        return layer

    def remove_layer(self, mount_id: str) -> Layer:
        layer = self._by_name.pop(mount_id.encode())
        del self._layers[layer.slot]
        self._attrs.clear()
        self.reader.lru.drop_layer(layer.layer_digest)
        try:
            self._invalidate_entry(ROOT_INODE, mount_id.encode())
        except OSError as exc:  # not mounted yet/anymore: nothing cached to drop
            log.debug("invalidate_entry(%s): %s", mount_id, exc)
        return layer

    def _invalidate_entry(self, parent: int, name: bytes) -> None:
        self.api.invalidate_entry(parent, name)

    # -- helpers ------------------------------------------------------------

    def _resolve(self, ino: int) -> tuple[Layer, int]:
        layer = self._layers.get(ino >> _SLOT_SHIFT)
        local = ino & _LOCAL_MASK
        if layer is None or not layer.table.valid(local):
            raise self.api.FUSEError(errno.ENOENT)
        return layer, local

    def _entry(self, ino: int) -> Any:
        e = self._attrs.get(ino)
        if e is not None:
            return e
        e = self._build_entry(ino)
        if ino != ROOT_INODE:  # the root's link count changes with its layers
            if len(self._attrs) >= _ATTR_CACHE_ENTRIES:
                self._attrs.clear()
            self._attrs[ino] = e
        return e

    def _build_entry(self, ino: int) -> Any:
        e = self.api.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        e.st_blksize = 4096
        if ino == ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2 + len(self._layers)
            e.st_size = 4096
            e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self._root_mtime_ns
            return e
        layer, local = self._resolve(ino)
        mode, uid, gid, nlink, size, mtime_ns, rdev = layer.table.raw_attr(local)
        e.st_mode = mode
        e.st_uid = uid
        e.st_gid = gid
        e.st_nlink = nlink
        e.st_size = size
        e.st_blocks = (size + 511) // 512
        e.st_rdev = os.makedev(*InodeTable.rdev_numbers(rdev)) if rdev else 0
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = mtime_ns
        return e

    # -- lookups and attributes -----------------------------------------------

    def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        if parent_inode == ROOT_INODE:
            if name == b".." or name == b".":
                return self._entry(ROOT_INODE)
            layer = self._by_name.get(name)
            if layer is None:
                raise self.api.FUSEError(errno.ENOENT)
            return self._entry(layer.root_inode())
        layer, local = self._resolve(parent_inode)
        base = parent_inode & ~_LOCAL_MASK
        if name == b".":
            return self._entry(parent_inode)
        if name == b"..":
            return self._entry(ROOT_INODE if local == ROOT else base | layer.table.parent(local))
        child = layer.table.lookup(local, name)
        if child is None:
            return self._negative
        return self._entry(base | child)

    def getattr(self, inode: int, ctx: Any) -> Any:
        return self._entry(inode)

    def readlink(self, inode: int, ctx: Any) -> bytes:
        layer, local = self._resolve(inode)
        target = layer.table.readlink(local)
        if target is None:
            raise self.api.FUSEError(errno.EINVAL)
        return target

    def _xattrs_on(self) -> bool:
        """Whether extended attributes are served; an undecided ("auto") worker decides now, for good."""
        if self.xattrs is None:
            self.xattrs = False  # no mounted layer has any: add_layer would have said so
        return self.xattrs

    def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if not self._xattrs_on():
            raise self.api.FUSEError(errno.ENOSYS)
        if inode == ROOT_INODE:
            raise self.api.FUSEError(self.api.ENOATTR)
        layer, local = self._resolve(inode)
        value = layer.table.xattrs(local).get(name)
        if value is None:
            raise self.api.FUSEError(self.api.ENOATTR)
        return value

    def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        if inode == ROOT_INODE:
            return []
        layer, local = self._resolve(inode)
        return list(layer.table.xattrs(local))

    def statfs(self, ctx: Any) -> Any:
        s = self.api.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum((lay.table.total_size + 4095) // 4096 for lay in self._layers.values())
        s.f_bfree = s.f_bavail = 0
        s.f_files = 1 + sum(len(lay.table) for lay in self._layers.values())
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories -----------------------------------------------------------

    def opendir(self, inode: int, ctx: Any) -> int:
        if inode == ROOT_INODE:
            entries = [(name, lay.root_inode()) for name, lay in self._by_name.items()]
        else:
            layer, local = self._resolve(inode)
            if not layer.table.is_dir(local):
                raise self.api.FUSEError(errno.ENOTDIR)
            base = inode & ~_LOCAL_MASK
            entries = [(name, base | child) for name, child in layer.table.children(local)]
        fh = next(self._handle_ids)
        self._dir_handles[fh] = (inode, entries)
        return fh

    def readdir(self, fh: int, off: int):  # type: ignore[no-untyped-def]  # generator of (name, attrs, next)
        entries = self._dir_handles[fh][1]
        for i in range(off, len(entries)):
            name, ino = entries[i]
            try:
                attrs = self._entry(ino)
            except self.api.FUSEError:
                continue  # a layer removed while listing the root
            yield name, attrs, i + 1

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # -- files -----------------------------------------------------------------

    def open(self, inode: int, flags: int, ctx: Any) -> int:
        if flags & _WRITE_FLAGS:
            raise self.api.FUSEError(errno.EROFS)
        layer, local = self._resolve(inode)
        if not stat.S_ISREG(layer.table.raw_attr(local)[0]):
            raise self.api.FUSEError(errno.EINVAL)
        layer.counters.opens += 1
        if layer.trace is not None:
            layer.trace.note(local, next(self._open_seq))
        if self.no_open:
            # Success to the caller; the kernel stops sending OPEN/RELEASE (see module doc).
            raise self.api.FUSEError(errno.ENOSYS)
        return inode

    def read(self, fh: int, off: int, size: int, cached_only: bool = False) -> bytes | memoryview | None:
        """The READ; with ``cached_only``, None where it would have to wait (``ChunkReader.read_cached``)."""
        layer, local = self._resolve(fh)
        counters = layer.counters
        try:
            if cached_only:
                data = self.reader.read_cached(layer.layer_digest, layer.table, local, off, size, counters)
                if data is None:
                    return None
            else:
                data = self.reader.read(layer.layer_digest, layer.table, local, off, size, counters)
        except Exception as exc:  # noqa: BLE001 - any failure is EIO for this read only
            counters.fetch_errors += 1
            counters.last_error = str(exc)
            log.warning("read of inode %d in %s at %d+%d failed: %s", local, layer.mount_id, off, size, exc)
            raise self.api.FUSEError(errno.EIO) from None
        counters.reads += 1
        counters.bytes_read += len(data)
        return data

    def flush(self, fh: int) -> None:
        # ENOSYS once makes the kernel stop sending FLUSH on every close().
        raise self.api.FUSEError(errno.ENOSYS)

    def release(self, fh: int) -> None:
        return None

    # -- everything that would write -------------------------------------------

    def _readonly(self, *args: object) -> None:
        raise self.api.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _readonly  # type: ignore[assignment]
    create = write = setxattr = removexattr = _readonly  # type: ignore[assignment]


class LazyFS(LayerFS, llfuse.Operations):
    """``LayerFS`` served by llfuse (libfuse 2): its methods are llfuse's operations, under ``llfuse.lock``."""

    def __init__(self, reader: ChunkReader, no_open: bool = READ_GETS_INODE, trace: bool = False,
                 xattrs: bool | None = True) -> None:
        super().__init__(llfuse, llfuse.lock, reader, no_open, trace, xattrs)

    @staticmethod
    def unlocked() -> AbstractContextManager[object]:
        """What the reader enters while it waits: llfuse's lock released."""
        return llfuse.lock_released  # type: ignore[no-any-return]

    def mount(self, root: str, options: set[str]) -> None:
        llfuse.init(self, root, options)

    def serve(self, threads: int) -> int | None:
        """Serve requests with ``threads`` threads until unmounted (None) or a signal (its number)."""
        return llfuse.main(workers=threads)  # type: ignore[no-any-return]

    def close(self) -> None:
        """End the FUSE session and unmount."""
        llfuse.close(unmount=True)

    @property
    def binding(self) -> str:
        """The binding and its version, for status (``+lazyd.readino``: lazyd's patched build)."""
        return f"llfuse {llfuse.__version__}"
