"""A compact, read-only inode table for one eStargz layer, built from its TOC.

Like borgbackup's FUSE layer, per-inode metadata is packed into flat arrays
rather than one Python object per file: attributes live in one ``bytearray`` of
fixed-size records, chunk extents in ``array`` columns, and only directories
(name -> inode maps), symlink targets and xattrs use Python containers.

Local inode numbers start at 1 (the layer root) and follow TOC order, so they
are stable for a given TOC.  Overlayfs conventions are applied here:
``.wh.NAME`` becomes a 0:0 character device ``NAME``; ``.wh..wh..opq`` becomes
``trusted.overlay.opaque=y`` on its directory and is hidden.
"""

from __future__ import annotations

import bisect
import stat
import struct
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

if TYPE_CHECKING:
    from lazyd.estargz import TOC, TOCEntry

ROOT = 1
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"
# eStargz prefetch landmarks are format markers, hidden like stargz-snapshotter does.
LANDMARKS = frozenset({".prefetch.landmark", ".no.prefetch.landmark"})

# mode, uid, gid, nlink, size, mtime_ns, rdev
_ATTR = struct.Struct("<IIIIQqQ")

_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


# Version of the ``dumps`` format; ``loads`` refuses any other.
_DUMP_VERSION = 1
_ARRAYS = ("_parent", "_chunk_start", "_chunk_count", "_c_file_off", "_c_size", "_c_blob_off", "_c_inner_off")


class InodeTableError(Exception):
    """The TOC cannot be turned into a file tree (e.g. a file used as a directory)."""


class Attr(NamedTuple):
    """The attributes of one inode, as getattr reports them (a tuple: cheap to build)."""

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    mtime_ns: int
    rdev: int


@dataclass(frozen=True)
class ChunkRef:
    """Where one piece of a file lives in the blob."""

    file_offset: int
    size: int
    blob_offset: int
    inner_offset: int


def _split(name: str) -> list[str]:
    return [part for part in name.strip("/").split("/") if part not in ("", ".")]


_NS_MIN, _NS_MAX = -(2**63), 2**63 - 1


def _mtime_ns(entry: TOCEntry) -> int:
    """The entry's modification time in integer nanoseconds (TOC times are epoch seconds),
    clamped to what 64 bits hold (1677-09-21 .. 2262-04-11; RFC 3339 allows years 0-9999)."""
    return min(max(round(entry.modtime * 1_000_000_000), _NS_MIN), _NS_MAX)


class InodeTable:
    """Inodes of one layer: attributes, directory entries, link targets, xattrs, chunks."""

    def __init__(self) -> None:
        self._attrs = bytearray()
        self._parent = array("Q")
        self._chunk_start = array("Q")
        self._chunk_count = array("Q")
        self._c_file_off = array("Q")
        self._c_size = array("Q")
        self._c_blob_off = array("Q")
        self._c_inner_off = array("Q")
        self._dirs: dict[int, dict[bytes, int]] = {}
        self._links: dict[int, bytes] = {}
        self._xattrs: dict[int, dict[bytes, bytes]] = {}
        self.total_size = 0

    # -- serialized form ---------------------------------------------------

    def dumps(self, toc_digest: str) -> bytes:
        """The table as msgpack, tagged with the digest of the TOC it was built from.

        The fetcher builds the table once and hands it to a worker (``loads``), so the
        worker neither parses the TOC again nor rebuilds the table.
        """
        return msgpack.packb([_DUMP_VERSION, toc_digest, bytes(self._attrs),
                              [getattr(self, a).tobytes() for a in _ARRAYS],
                              self._dirs, self._links, self._xattrs, self.total_size])

    @classmethod
    def loads(cls, data: bytes, toc_digest: str) -> "InodeTable":
        """A table from ``dumps``; InodeTableError if it is damaged or from another TOC."""
        try:
            doc: Any = msgpack.unpackb(data, strict_map_key=False)
            version, digest, attrs, arrays, dirs, links, xattrs, total_size = doc
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise InodeTableError(f"inode table dump is damaged: {exc}") from None
        if version != _DUMP_VERSION or digest != toc_digest:
            raise InodeTableError(f"inode table dump is version {version!r} of TOC {digest!r}, "
                                  f"not version {_DUMP_VERSION} of {toc_digest}")
        table = cls()
        try:
            table._attrs = bytearray(attrs)
            for name, raw in zip(_ARRAYS, arrays, strict=True):
                getattr(table, name).frombytes(raw)
        except (ValueError, TypeError) as exc:
            raise InodeTableError(f"inode table dump is damaged: {exc}") from None
        n = len(table._parent)
        if (len(table._attrs) != n * _ATTR.size or len(table._chunk_start) != n or len(table._chunk_count) != n
                or not all(isinstance(d, dict) for d in (dirs, links, xattrs)) or type(total_size) is not int
                or len({len(table._c_file_off), len(table._c_size), len(table._c_blob_off),
                        len(table._c_inner_off)}) != 1):
            raise InodeTableError("inode table dump is damaged: its columns do not line up")
        # Every inode a directory, link or xattr entry names must exist (a few ms for 10k files).
        if not (all(type(i) is int and 1 <= i <= n and type(d) is dict
                    and all(type(k) is bytes and type(c) is int and 1 <= c <= n for k, c in d.items())
                    for i, d in dirs.items())
                and all(type(i) is int and 1 <= i <= n and type(t) is bytes for i, t in links.items())
                and all(type(i) is int and 1 <= i <= n and type(x) is dict
                        and all(type(k) is bytes and type(v) is bytes for k, v in x.items())
                        for i, x in xattrs.items())
                and ROOT in dirs):
            raise InodeTableError("inode table dump is damaged: an entry names a missing inode")
        table._dirs, table._links, table._xattrs, table.total_size = dirs, links, xattrs, total_size
        return table

    # -- construction ------------------------------------------------------

    @classmethod
    def from_toc(cls, toc: TOC) -> "InodeTable":
        """Build the table: entries in TOC order, hardlinks and whiteouts after them."""
        table = cls()
        table._add(stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, parent=ROOT)
        table._dirs[ROOT] = {}
        by_name: dict[str, int] = {"": ROOT}
        hardlinks = []
        whiteouts = []
        dirs = table._dirs
        # Hot loop (one pass over every entry; the largest part of a layer open): the common
        # case, a new entry (attributes as ``_entry_attr`` makes them), is inlined.
        attrs, parents, pack = table._attrs, table._parent, _ATTR.pack
        links, xattrs_of, type_bits = table._links, table._xattrs, _TYPE_BITS
        starts, counts = table._chunk_start, table._chunk_count
        c_file_off, c_size, c_blob_off, c_inner_off = (table._c_file_off, table._c_size, table._c_blob_off,
                                                       table._c_inner_off)
        mtimes: dict[float, int] = {}
        total_size = 0
        for entry in toc.entries:
            kind = entry.type
            if kind == "chunk":
                continue
            # TOC names are normalised ("a/b", root ""), so the parent is a plain prefix.
            path = entry.name
            if not path and kind != "dir":
                # A non-directory root that a later root directory replaces (TOC.parse lets the
                # later entry win and refuses a layer whose last root is not a directory).
                continue
            if kind == "hardlink":
                hardlinks.append((_split(path), entry))
                continue
            if not path:
                table._set_attr(ROOT, table._entry_attr(entry))
                table._xattrs.pop(ROOT, None)  # a later root entry ("./" after "/") replaces an earlier one
                table._set_xattrs(ROOT, entry)
                continue
            parent_path, _, base = path.rpartition("/")
            if not parent_path and base in LANDMARKS:
                continue
            if base.startswith(WHITEOUT_PREFIX):
                whiteouts.append((_split(path), entry))
                continue
            parent = by_name.get(parent_path)
            if parent is None or parent not in dirs:
                parent = table._ensure_dir(_split(parent_path), by_name)
            existing = by_name.get(path)
            if existing is not None and kind == "dir" and existing in table._dirs:
                table._set_attr(existing, table._entry_attr(entry))
                table._xattrs.pop(existing, None)
                table._set_xattrs(existing, entry)
                continue
            # A later entry with the same name replaces the earlier one, as in tar.
            bits = type_bits.get(kind)
            if bits is None:
                raise InodeTableError(f"unsupported entry type {kind!r} for {entry.name!r}")
            mtime = mtimes.get(entry.modtime)
            if mtime is None:
                mtime = mtimes[entry.modtime] = _mtime_ns(entry)
            rdev = 0
            if kind == "reg":
                size = entry.size
                total_size += size
            elif kind == "dir":
                size = 4096
            elif kind == "symlink":
                target = entry.link_name.encode()
                size = len(target)
            else:
                size = 0
                if kind != "fifo":
                    rdev = (entry.dev_major << 32) | entry.dev_minor  # decoded in rdev_numbers()
            attrs += pack(bits | (entry.mode & 0o7777), entry.uid, entry.gid, 1, size, mtime, rdev)
            parents.append(parent)
            ino = len(parents)
            chunks = entry.chunks if kind == "reg" else ()
            if chunks:
                starts.append(len(c_file_off))
                counts.append(len(chunks))
                for chunk in chunks:
                    c_file_off.append(chunk.file_offset)
                    c_size.append(chunk.size)
                    c_blob_off.append(chunk.blob_offset)
                    c_inner_off.append(chunk.inner_offset)
            else:
                starts.append(0)
                counts.append(0)
            if kind == "dir":
                dirs[ino] = {}
            elif kind == "symlink":
                links[ino] = target
            if entry.xattrs:
                xattrs_of[ino] = {k.encode() if isinstance(k, str) else bytes(k): bytes(v)
                                  for k, v in entry.xattrs.items()}
            dirs[parent][base.encode()] = ino
            by_name[path] = ino
        table.total_size += total_size
        for parts, entry in hardlinks:
            target = "/".join(_split(entry.link_name))
            ino = by_name.get(target)
            if ino is None or ino in table._dirs:
                raise InodeTableError(
                    f"hardlink {entry.name!r} points at {entry.link_name!r}, not a file in this layer")
            parent = table._ensure_dir(parts[:-1], by_name)
            table._dirs[parent][parts[-1].encode()] = ino
            by_name["/".join(parts)] = ino
            a = table.attr(ino)
            table._set_attr(ino, Attr(a.mode, a.uid, a.gid, a.nlink + 1, a.size, a.mtime_ns, a.rdev))
        for parts, entry in whiteouts:
            parent = table._ensure_dir(parts[:-1], by_name)
            base = parts[-1]
            if base == OPAQUE_MARKER:
                table._xattrs.setdefault(parent, {})[OPAQUE_XATTR] = b"y"
                continue
            if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                continue  # other aufs metadata (.wh..wh.plnk etc.): hidden
            name = base[len(WHITEOUT_PREFIX):].encode()
            if name in table._dirs[parent]:
                continue  # the layer also adds NAME: the new entry wins
            ino = table._add(stat.S_IFCHR, 0, 0, 1, 0, _mtime_ns(entry), parent=parent)
            table._dirs[parent][name] = ino
        table._fix_dir_links()
        return table

    def _add(self, mode: int, uid: int, gid: int, nlink: int, size: int, mtime_ns: int, *,
             parent: int, rdev: int = 0) -> int:
        self._attrs += _ATTR.pack(mode, uid, gid, nlink, size, mtime_ns, rdev)
        self._parent.append(parent)
        self._chunk_start.append(0)
        self._chunk_count.append(0)
        return len(self._parent)

    def _entry_attr(self, entry: TOCEntry, nlink: int = 1) -> Attr:
        kind = entry.type
        bits = _TYPE_BITS.get(kind)
        if bits is None:
            raise InodeTableError(f"unsupported entry type {kind!r} for {entry.name!r}")
        size = 0
        if kind == "reg":
            size = int(entry.size)
        elif kind == "symlink":
            size = len(entry.link_name.encode())
        elif kind == "dir":
            size = 4096
        rdev = 0
        if kind in ("char", "block"):
            rdev = (int(entry.dev_major) << 32) | int(entry.dev_minor)  # decoded in rdev()
        return Attr(bits | (int(entry.mode) & 0o7777), int(entry.uid), int(entry.gid), nlink, size,
                    _mtime_ns(entry), rdev)

    def _set_xattrs(self, ino: int, entry: TOCEntry) -> None:
        xattrs = getattr(entry, "xattrs", None)
        if xattrs:
            self._xattrs.setdefault(ino, {}).update(
                {k.encode() if isinstance(k, str) else bytes(k): bytes(v) for k, v in xattrs.items()}
            )

    def _ensure_dir(self, parts: list[str], by_name: dict[str, int]) -> int:
        """The inode of directory ``parts``, creating implied (0755, root-owned) parents."""
        ino = ROOT
        for depth in range(len(parts)):
            path = "/".join(parts[: depth + 1])
            child = by_name.get(path)
            if child is None:
                child = self._add(stat.S_IFDIR | 0o755, 0, 0, 2, 4096, 0, parent=ino)
                self._dirs[child] = {}
                self._dirs[ino][parts[depth].encode()] = child
                by_name[path] = child
            elif child not in self._dirs:
                raise InodeTableError(f"{path!r} is used as a directory but is not one")
            ino = child
        return ino

    def _fix_dir_links(self) -> None:
        """Directory link counts: 2 + subdirectories (after whiteouts and replacements)."""
        for ino, entries in self._dirs.items():
            a = self.attr(ino)
            subdirs = sum(1 for child in entries.values() if child in self._dirs)
            self._set_attr(ino, Attr(a.mode, a.uid, a.gid, 2 + subdirs, a.size, a.mtime_ns, a.rdev))

    def _set_attr(self, ino: int, a: Attr) -> None:
        _ATTR.pack_into(self._attrs, (ino - 1) * _ATTR.size, *a)

    # -- queries -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._parent)

    def valid(self, ino: int) -> bool:
        return 1 <= ino <= len(self._parent)

    def attr(self, ino: int) -> Attr:
        mode, uid, gid, nlink, size, mtime_ns, rdev = _ATTR.unpack_from(self._attrs, (ino - 1) * _ATTR.size)
        return Attr(mode, uid, gid, nlink, size, mtime_ns, rdev)

    def raw_attr(self, ino: int) -> tuple[int, int, int, int, int, int, int]:
        """(mode, uid, gid, nlink, size, mtime_ns, packed rdev) without building an ``Attr``."""
        return _ATTR.unpack_from(self._attrs, (ino - 1) * _ATTR.size)

    @staticmethod
    def rdev_numbers(packed: int) -> tuple[int, int]:
        """(major, minor) of a packed rdev field."""
        return packed >> 32, packed & 0xFFFFFFFF

    def parent(self, ino: int) -> int:
        return self._parent[ino - 1]

    def is_dir(self, ino: int) -> bool:
        return ino in self._dirs

    def lookup(self, parent: int, name: bytes) -> int | None:
        entries = self._dirs.get(parent)
        if entries is None:
            return None
        return entries.get(name)

    def children(self, ino: int) -> list[tuple[bytes, int]]:
        return list(self._dirs[ino].items())

    def readlink(self, ino: int) -> bytes | None:
        return self._links.get(ino)

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        return self._xattrs.get(ino, {})

    def has_xattrs(self) -> bool:
        """Whether any inode has an extended attribute (an opaque directory's included)."""
        return any(self._xattrs.values())

    def chunks(self, ino: int, offset: int, size: int) -> list[ChunkRef]:
        """The chunks of regular file ``ino`` that overlap ``[offset, offset+size)``."""
        count = self._chunk_count[ino - 1]
        if not count or size <= 0:
            return []
        lo = self._chunk_start[ino - 1]
        hi = lo + count
        end = offset + size
        i = max(lo, bisect.bisect_right(self._c_file_off, offset, lo, hi) - 1)
        out = []
        while i < hi and self._c_file_off[i] < end:
            if self._c_file_off[i] + self._c_size[i] > offset:
                out.append(ChunkRef(self._c_file_off[i], self._c_size[i], self._c_blob_off[i], self._c_inner_off[i]))
            i += 1
        return out
