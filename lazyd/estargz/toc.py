"""The TOC: decode the TOC member, validate every entry, build the entry tree and chunk table.

``TOC.parse`` takes the JSON bytes of ``stargz.index.json``.  Names (and hardlink
targets) are read as the reference reads them (``lazyd.estargz.names``: ``./a/`` and
``/a`` -> ``a``, ``../../x`` -> ``x``; the root ``/`` or ``./`` is ``""``); an entry whose
name repeats an earlier one replaces it, as in the reference.  Hardlinks are resolved
by ``lookup`` and ``children``, implied parent directories exist in ``lookup`` (``implied=True``) but
never in ``entries``.  Whiteout names are kept as they are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import stat
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from lazyd.estargz.errors import TOCDigestMismatch, TOCError, TruncatedBlobError, UnsafePathError
from lazyd.estargz.gzipio import DECOMPRESS_ERRORS, decompress_member
from lazyd.estargz.names import normalize_name, parent_of

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
MAX_FILE_SIZE = 1 << 44      # 16 TiB: anything larger is treated as corrupt
MAX_CHUNK_SIZE = 1 << 30     # one chunk is decompressed and verified in memory
MAX_TOC_JSON_SIZE = 1 << 29  # 512 MiB of JSON

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_FIELD_TYPES: dict[str, type] = {
    **dict.fromkeys(("size", "mode", "uid", "gid", "offset", "devMajor", "devMinor", "chunkOffset", "chunkSize",
                     "innerOffset"), int),
    **dict.fromkeys(("name", "type", "modtime", "linkName", "userName", "groupName", "digest", "chunkDigest"), str),
}
_TYPE_BITS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK, "hardlink": stat.S_IFREG,
              "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO, "chunk": stat.S_IFREG}


@dataclass(frozen=True, slots=True)
class Chunk:
    """One verifiable piece of a regular file's payload.

    ``blob_offset`` is where its gzip member starts; ``blob_end`` is where the next
    member with payload (or the TOC) starts, so ``blob[blob_offset:blob_end]`` holds
    the whole member.  ``blob_end`` is None only for the last member when the TOC
    offset was not given to ``TOC.parse``.  The chunk's bytes are the decompressed
    member's ``[inner_offset, inner_offset + size)``.
    """

    name: str
    file_offset: int
    size: int
    blob_offset: int
    blob_end: int | None
    digest: str
    inner_offset: int = 0

    @property
    def compressed_size(self) -> int | None:
        return None if self.blob_end is None else self.blob_end - self.blob_offset


@dataclass(slots=True, eq=False)
class TOCEntry:
    """One TOC entry with the fields a filesystem needs (names normalised, defaults filled).

    ``mode`` is the tar mode field as recorded; ``st_mode`` adds the type bits.
    ``modtime`` is epoch seconds (0.0 when absent).  ``num_link``: names of a file
    (1 + hardlinks), or 2 + subdirectories for a directory.  ``children`` maps base
    names to entries (hardlinks resolved) for directories.  For ``chunk`` entries only
    name/type/offset/chunk fields are meaningful.
    """

    name: str
    type: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    modtime: float = 0.0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    offset: int = 0
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    inner_offset: int = 0
    num_link: int = 1
    children: dict[str, "TOCEntry"] | None = None
    implied: bool = False
    chunks: tuple[Chunk, ...] = ()

    @property
    def st_mode(self) -> int:
        """Permission bits (``mode & 0o7777``) plus the file-type bits of ``type``."""
        return _TYPE_BITS[self.type] | (self.mode & 0o7777)

    @property
    def basename(self) -> str:
        return self.name.rpartition("/")[2]


def decode_toc_member(data: bytes | memoryview) -> bytes:
    """Decompress the TOC gzip member (trailing bytes, e.g. the footer, are ignored),
    read its tar wrapper and return the ``stargz.index.json`` bytes."""
    try:
        raw, ended, _ = decompress_member(data, MAX_TOC_JSON_SIZE + 4096)
    except DECOMPRESS_ERRORS as exc:
        raise TOCError(f"TOC member is not valid gzip: {exc}") from None
    if not ended and len(raw) < MAX_TOC_JSON_SIZE + 4096:
        raise TruncatedBlobError(f"TOC member is truncated ({len(data)} compressed bytes end mid-stream)")
    try:
        tf = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
        member = tf.next()
    except tarfile.TarError as exc:
        raise TOCError(f"TOC member does not hold a tar: {exc}") from None
    if member is None:
        raise TOCError("TOC member holds an empty tar")
    if member.name != TOC_TAR_NAME or not member.isreg():
        raise TOCError(f"TOC tar entry is {member.name!r}, want regular file {TOC_TAR_NAME!r}")
    if member.size > MAX_TOC_JSON_SIZE:
        raise TOCError(f"TOC JSON of {member.size} bytes is larger than {MAX_TOC_JSON_SIZE}")
    body = raw[member.offset_data : member.offset_data + member.size]
    if len(body) != member.size:
        raise TruncatedBlobError(f"TOC JSON has {len(body)} of {member.size} bytes")
    return body


def toc_digest(json_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(json_bytes).hexdigest()


def _parse_modtime(value: str, where: str) -> float:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise TOCError(f"{where}: modtime {value!r} is not RFC 3339") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def _where(i: int, raw: dict[str, Any]) -> str:
    name = raw.get("name")
    return f"entry {i} {name!r}" if isinstance(name, str) else f"entry {i} (unnamed)"


def _entry_from_json(i: int, raw: Any, modtimes: dict[str, float]) -> TOCEntry:
    """One validated entry; ``modtimes`` caches parsed modtime strings (layers repeat them)."""
    if not isinstance(raw, dict):
        raise TOCError(f"entry {i} is a {type(raw).__name__}, not an object")
    for key, v in raw.items():
        want = _FIELD_TYPES.get(key)
        if want is None or type(v) is want and (want is str or v >= 0):
            continue
        if want is int and type(v) is int:
            raise TOCError(f"{_where(i, raw)}: {key} is negative ({v})")
        raise TOCError(f"{_where(i, raw)}: {key} must be {'an integer' if want is int else 'a string'}, got {v!r}")
    kind = raw.get("type")
    if kind is None:
        raise TOCError(f"{_where(i, raw)}: missing field 'type'")
    if kind not in ENTRY_TYPES:
        raise TOCError(f"{_where(i, raw)}: unknown type {kind!r}")
    if kind != "chunk" and "name" not in raw:
        raise TOCError(f"{_where(i, raw)}: missing field 'name'")
    name = normalize_name(raw.get("name", ""), f"entry {i} name")
    link = raw.get("linkName", "")
    if kind in ("symlink", "hardlink") and not link:
        raise TOCError(f"{_where(i, raw)}: {kind} is missing field 'linkName'")
    if kind == "hardlink":
        link = normalize_name(link, f"{_where(i, raw)}: hardlink target")
    size = raw.get("size", 0)
    if size > MAX_FILE_SIZE:
        raise TOCError(f"{_where(i, raw)}: size {size} is absurd (limit {MAX_FILE_SIZE})")
    digest, chunk_digest = raw.get("digest", ""), raw.get("chunkDigest", "")
    for key, value in (("digest", digest), ("chunkDigest", chunk_digest)):
        if value and not _DIGEST_RE.match(value):
            raise TOCError(f"{_where(i, raw)}: {key} {value!r} is not sha256:<64 hex>")
    xattrs: dict[str, bytes] = {}
    rx = raw.get("xattrs")
    if rx:
        if not isinstance(rx, dict):
            raise TOCError(f"{_where(i, raw)}: xattrs must be an object")
        for k, v in rx.items():
            if not isinstance(v, str):
                raise TOCError(f"{_where(i, raw)}: xattr {k!r} must be a base64 string")
            try:
                xattrs[k] = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise TOCError(f"{_where(i, raw)}: xattr {k!r} is not valid base64") from None
    mt = raw.get("modtime")
    modtime = 0.0
    if mt:
        modtime = modtimes.get(mt, -1.0)
        if modtime == -1.0:
            modtime = modtimes[mt] = _parse_modtime(mt, _where(i, raw))
    return TOCEntry(
        name=name, type=kind, size=size, mode=raw.get("mode", 0), uid=raw.get("uid", 0), gid=raw.get("gid", 0),
        uname=raw.get("userName", ""), gname=raw.get("groupName", ""), modtime=modtime, link_name=link,
        dev_major=raw.get("devMajor", 0), dev_minor=raw.get("devMinor", 0), xattrs=xattrs, digest=digest,
        offset=raw.get("offset", 0), chunk_offset=raw.get("chunkOffset", 0), chunk_size=raw.get("chunkSize", 0),
        chunk_digest=chunk_digest, inner_offset=raw.get("innerOffset", 0), num_link=2 if kind == "dir" else 1,
        children={} if kind == "dir" else None,
    )


class TOC:
    """A validated TOC: entries in TOC order, a name index, and the chunk table."""

    def __init__(self, version: int, entries: list[TOCEntry], digest: str, toc_offset: int | None,
                 chunks: list[Chunk], by_name: dict[str, TOCEntry], root: TOCEntry) -> None:
        self.version = version
        self.entries = entries
        self.digest = digest
        self.toc_offset = toc_offset
        self.chunks = chunks
        self.root = root
        self._by_name = by_name
        landmark = by_name.get(PREFETCH_LANDMARK)
        self.prefetch_end: int | None = landmark.chunks[0].blob_offset if landmark and landmark.chunks else None
        self.no_prefetch = NO_PREFETCH_LANDMARK in by_name

    # -- parsing -------------------------------------------------------------

    @classmethod
    def parse(cls, json_bytes: bytes, expected_digest: str | None = None, toc_offset: int | None = None) -> "TOC":
        """Validate ``stargz.index.json`` and build the model.

        ``expected_digest`` (``sha256:...``) is checked against the sha256 of the bytes
        first (TOCDigestMismatch).  ``toc_offset`` is the blob offset of the TOC member:
        it bounds every payload offset and becomes the ``blob_end`` of the last chunk
        member; without it that ``blob_end`` is None (read up to the TOC).
        """
        json_bytes = bytes(json_bytes)
        digest = toc_digest(json_bytes)
        if expected_digest is not None and digest != expected_digest:
            raise TOCDigestMismatch(f"TOC digest is {digest}, expected {expected_digest}")
        if len(json_bytes) > MAX_TOC_JSON_SIZE:
            raise TOCError(f"TOC JSON of {len(json_bytes)} bytes is larger than {MAX_TOC_JSON_SIZE}")
        try:
            doc = json.loads(json_bytes)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TOCError(f"TOC is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise TOCError(f"TOC JSON is a {type(doc).__name__}, not an object")
        version = doc.get("version", 0)
        if type(version) is not int:
            raise TOCError(f"TOC version must be an integer, got {version!r}")
        raw_entries = doc.get("entries")
        if not isinstance(raw_entries, list):
            raise TOCError("TOC JSON has no 'entries' list")
        if toc_offset is not None and toc_offset < 0:
            raise TOCError(f"TOC offset {toc_offset} is negative")
        modtimes: dict[str, float] = {}
        entries = [_entry_from_json(i, raw, modtimes) for i, raw in enumerate(raw_entries)]
        _fill_owner_names(entries)
        chunks = _chunk_table(entries, toc_offset)
        by_name, root = _tree(entries)
        return cls(version, entries, digest, toc_offset, chunks, by_name, root)

    # -- queries -------------------------------------------------------------

    def lookup(self, name: str, resolve: bool = True) -> TOCEntry | None:
        """The entry for ``name`` (any spelling: ``/a``, ``./a/``); hardlinks resolve to their
        target unless ``resolve`` is False; implied parent directories are returned with
        ``implied=True``."""
        try:
            key = normalize_name(name)
        except UnsafePathError:
            return None
        entry = self._by_name.get(key)
        return _resolve(entry, self._by_name) if entry is not None and resolve else entry

    def listdir(self, name: str) -> dict[str, TOCEntry] | None:
        """Children of directory ``name`` (base name -> entry), or None if it is not a directory."""
        entry = self.lookup(name)
        return None if entry is None or entry.children is None else dict(entry.children)

    def file_chunks(self, entry: TOCEntry) -> list[Chunk]:
        """Chunks of a regular file (or a hardlink to one), in file order; [] for empty files."""
        if entry.type == "hardlink":
            entry = _resolve(entry, self._by_name)
        if entry.type != "reg":
            raise TOCError(f"{entry.name!r} is a {entry.type}, not a regular file")
        return list(entry.chunks)

    def names(self) -> list[str]:
        """Every name in the tree (implied directories included), sorted."""
        return sorted(self._by_name)


def _fill_owner_names(entries: list[TOCEntry]) -> None:
    """Writers record userName/groupName only when they change for an id: fill in the rest."""
    unames: dict[int, str] = {}
    gnames: dict[int, str] = {}
    for e in entries:
        if e.type == "chunk":
            continue
        if e.uname:
            unames[e.uid] = e.uname
        else:
            e.uname = unames.get(e.uid, "")
        if e.gname:
            gnames[e.gid] = e.gname
        else:
            e.gname = gnames.get(e.gid, "")


def _chunk_table(entries: list[TOCEntry], toc_offset: int | None) -> list[Chunk]:
    """Validate payload layout and return chunks in blob order (blob_end filled)."""
    pending: list[tuple[TOCEntry, TOCEntry]] = []  # (chunk-bearing entry, its file), blob_end unknown yet
    file: TOCEntry | None = None
    covered = 0
    last: tuple[int, int] | None = None
    last_at: tuple[int, TOCEntry] | None = None

    def finish() -> None:
        if file is not None and covered != file.size:
            raise TOCError(f"regular file {file.name!r}: chunks cover {covered} of {file.size} bytes")

    for i, e in enumerate(entries):
        if e.type == "chunk":
            if file is None or covered >= file.size:
                raise TOCError(f"{_at(i, e)}: chunk entry does not follow an unfinished regular file")
            if e.name and e.name != file.name:
                raise TOCError(f"{_at(i, e)}: chunk entry names {e.name!r} but follows {file.name!r}")
            e.name = file.name
            if e.chunk_offset != covered:
                raise TOCError(f"{_at(i, e)}: chunkOffset {e.chunk_offset}, expected {covered}")
        elif e.type == "reg":
            finish()
            file, covered = None, 0
            if e.size == 0:
                continue
            if e.chunk_offset != 0:
                raise TOCError(f"{_at(i, e)}: first chunkOffset of a file must be 0, got {e.chunk_offset}")
            file = e
        else:
            finish()
            file, covered = None, 0
            continue
        assert file is not None
        size = e.chunk_size or (file.size - e.chunk_offset)
        if e.chunk_offset + size > file.size:
            raise TOCError(f"{_at(i, e)}: chunk [{e.chunk_offset}, +{size}) runs past the file size {file.size}")
        if size > MAX_CHUNK_SIZE:
            raise TOCError(f"{_at(i, e)}: chunk size {size} is absurd (limit {MAX_CHUNK_SIZE})")
        e.chunk_size = size
        if e.offset == 0 and e.inner_offset == 0:
            raise TOCError(f"{_at(i, e)}: missing field 'offset' for a payload chunk")
        pos = (e.offset, e.inner_offset)
        if last is not None and pos <= last:
            kind = "duplicate" if pos == last else "non-monotonic"
            raise TOCError(f"{_at(i, e)}: {kind} offset {e.offset} (innerOffset {e.inner_offset}) "
                           f"after {last[0]} (innerOffset {last[1]}) of {_at(*last_at) if last_at else ''}")
        if toc_offset is not None and e.offset >= toc_offset:
            raise TOCError(f"{_at(i, e)}: offset {e.offset} is not before the TOC at {toc_offset}")
        last, last_at = pos, (i, e)
        if not e.chunk_digest:
            if size == file.size and file.digest:
                e.chunk_digest = file.digest
            else:
                raise TOCError(f"{_at(i, e)}: missing field 'chunkDigest'")
        pending.append((e, file))
        covered += size
    finish()

    chunks: list[Chunk] = []
    per_file: dict[int, list[Chunk]] = {}
    end = toc_offset
    next_offset: int | None = None  # offset of the member after this one, in blob order
    for e, f in reversed(pending):
        if next_offset is not None and e.offset != next_offset:
            end = next_offset
        next_offset = e.offset
        c = Chunk(f.name, e.chunk_offset, e.chunk_size, e.offset, end, e.chunk_digest, e.inner_offset)
        chunks.append(c)
        per_file.setdefault(id(f), []).append(c)
    chunks.reverse()
    for e in entries:
        got = per_file.get(id(e))
        if got is not None:
            got.reverse()
            e.chunks = tuple(got)
    return chunks


def _at(i: int, e: TOCEntry) -> str:
    return f"entry {i} {e.name!r}"


def _resolve(entry: TOCEntry, by_name: dict[str, TOCEntry]) -> TOCEntry:
    if entry.type != "hardlink":
        return entry
    seen = set()
    while entry.type == "hardlink":
        if entry.link_name in seen or len(seen) > 64:
            raise TOCError(f"hardlink {entry.name!r}: link cycle through {entry.link_name!r}")
        seen.add(entry.link_name)
        target = by_name.get(entry.link_name)
        if target is None or target.implied:
            raise TOCError(f"hardlink {entry.name!r} points at {entry.link_name!r}, which is not in the layer")
        entry = target
    if entry.type == "dir":
        raise TOCError(f"hardlink points at directory {entry.name!r}")
    return entry


def _tree(entries: list[TOCEntry]) -> tuple[dict[str, TOCEntry], TOCEntry]:
    """Name index (later duplicates win, implied parents added) and directory children."""
    by_name: dict[str, TOCEntry] = {}
    for e in entries:
        if e.type != "chunk":
            by_name[e.name] = e
    root = by_name.get("")
    if root is None:
        root = TOCEntry(name="", type="dir", mode=0o755, num_link=2, children={}, implied=True)
        by_name[""] = root
    elif root.type != "dir":
        raise TOCError(f"the layer root is a {root.type}, not a directory")
    for name in list(by_name):
        p = parent_of(name)
        missing = []
        while name and p not in by_name:
            missing.append(p)
            name, p = p, parent_of(p)
        for d in missing:
            by_name[d] = TOCEntry(name=d, type="dir", mode=0o755, num_link=2, children={}, implied=True)
    for name, e in by_name.items():
        if not name:
            continue
        parent = by_name[parent_of(name)]
        if parent.children is None:
            raise TOCError(f"{name!r} is inside {parent.name!r}, which is a {parent.type}, not a directory")
        target = _resolve(e, by_name) if e.type == "hardlink" else e
        if e.type == "hardlink":
            target.num_link += 1
        elif e.type == "dir":
            parent.num_link += 1
        parent.children[e.name.rpartition("/")[2]] = target
    return by_name, root
