"""TOC JSON -> validated ``TOCEntry`` objects, decoded by msgspec straight into typed structs.

The decoder checks the document's shape and every field's type in C: integers must be
non-negative ints (not floats or bools), strings strings, ``type`` one of the eStargz
entry types, ``xattrs`` base64.  One Python pass then does what a type cannot say:
names read as the reference reads them, links present, sizes bounded, digests
``sha256:<64 hex>``, modtimes RFC 3339, owner names filled in, derived fields set.
(The decoder itself also bounds names and link targets to ``MAX_NAME_LEN`` characters,
ids and device numbers to 32 bits and payload offsets to ``MAX_OFFSET``.)

A document the decoder rejects is read again with ``json`` and checked field by field
(``_explain``), so every error names the entry and field at fault, as it always did;
that slow path runs only for bad input.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import stat
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, NoReturn, Optional

import msgspec
from msgspec import Meta

from lazyd.estargz.errors import TOCError, UnsafePathError
from lazyd.estargz.names import normalize_name

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
MAX_FILE_SIZE = 1 << 44  # 16 TiB: anything larger is treated as corrupt
# Longest name or link target, as PATH_MAX: no system call takes a longer path, so no unpacker
# can create the file.  It also bounds the parent directories one name can imply (each '/'
# may imply one, named by a prefix of the name: their cost grows with the square of its length).
MAX_NAME_LEN = 4096
MAX_ID = (1 << 32) - 1  # uid, gid, devMajor, devMinor: 32-bit on Linux (a wider one would wrap to another)
# offset and innerOffset: every consumer keeps them in int64 columns, and a chunk's inner end
# (innerOffset + size) is a C size_t when it is inflated.
MAX_OFFSET = MAX_FILE_SIZE << 16  # 2^60

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_TYPE_BITS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK, "hardlink": stat.S_IFREG,
              "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO, "chunk": stat.S_IFREG}

_UInt = Annotated[int, Meta(ge=0)]
_Id = Annotated[int, Meta(ge=0, le=MAX_ID)]
_Offset = Annotated[int, Meta(ge=0, le=MAX_OFFSET)]
_Name = Annotated[str, Meta(max_length=MAX_NAME_LEN)]
# Default of ``name``: told apart from any decoded string by identity (and it holds a NUL,
# which no valid name does).
_NO_NAME = "\x00(no name)"
_Kind = Literal["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"]

# JSON keys of TOCEntry fields.  The derived fields get keys no writer uses; whatever a
# TOC puts there is overwritten by ``decode_entries``.
_JSON_KEYS = {
    "link_name": "linkName", "uname": "userName", "gname": "groupName", "dev_major": "devMajor",
    "dev_minor": "devMinor", "chunk_offset": "chunkOffset", "chunk_size": "chunkSize", "chunk_digest": "chunkDigest",
    "inner_offset": "innerOffset", "modtime_text": "modtime",
    "modtime": "lazyd:modtime", "num_link": "lazyd:numLink", "children": "lazyd:children",
    "implied": "lazyd:implied", "chunks": "lazyd:chunks",
}


class Chunk(msgspec.Struct, frozen=True, gc=False):
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
    blob_end: Optional[int]
    digest: str
    inner_offset: int = 0

    @property
    def compressed_size(self) -> int | None:
        return None if self.blob_end is None else self.blob_end - self.blob_offset


# gc=False: entries are never in a reference cycle (children point down the tree, hardlinks
# at their targets, chunks hold only numbers and strings), so the collector need not track
# tens of thousands of them; a mount's TOC parse then triggers no collection passes.
class PayloadEntry(msgspec.Struct, kw_only=True, eq=False, gc=False, rename=_JSON_KEYS):
    """The fields of a TOC entry that locate and verify its payload: all that the fetcher
    decodes (``decode_payload_entries``); ``TOCEntry`` adds what a filesystem needs."""

    name: _Name = _NO_NAME
    type: _Kind
    size: _UInt = 0
    digest: str = ""
    offset: _Offset = 0
    chunk_offset: _UInt = 0
    chunk_size: _UInt = 0
    chunk_digest: str = ""
    inner_offset: _Offset = 0
    chunks: tuple[Chunk, ...] = ()  # derived by the chunk table


class TOCEntry(PayloadEntry, kw_only=True, eq=False, gc=False, rename=_JSON_KEYS):
    """One TOC entry with the fields a filesystem needs (names normalised, defaults filled).

    ``mode`` is the tar mode field as recorded; ``st_mode`` adds the type bits.
    ``modtime`` is epoch seconds (0.0 when absent); ``modtime_text`` the TOC's string.
    ``num_link``: names of a file (1 + hardlinks), or 2 + subdirectories for a directory.
    ``children`` maps base names to entries (hardlinks resolved) for directories.  For
    ``chunk`` entries only name/type/offset/chunk fields are meaningful.
    """

    mode: _UInt = 0
    uid: _Id = 0
    gid: _Id = 0
    uname: str = ""
    gname: str = ""
    modtime_text: str = ""
    link_name: _Name = ""
    dev_major: _Id = 0
    dev_minor: _Id = 0
    xattrs: Optional[dict[str, bytes]] = {}
    # derived by TOC.parse
    modtime: float = 0.0
    num_link: int = 1
    children: Optional[dict[str, "TOCEntry"]] = None
    implied: bool = False

    @property
    def st_mode(self) -> int:
        """Permission bits (``mode & 0o7777``) plus the file-type bits of ``type``."""
        return _TYPE_BITS[self.type] | (self.mode & 0o7777)

    @property
    def basename(self) -> str:
        return self.name.rpartition("/")[2]


class _Document(msgspec.Struct):
    entries: list[TOCEntry]
    version: int = 0


class _PayloadDocument(msgspec.Struct):
    entries: list[PayloadEntry]
    version: int = 0


_DECODER = msgspec.json.Decoder(_Document)
_PAYLOAD_DECODER = msgspec.json.Decoder(_PayloadDocument)


def decode_entries(json_bytes: bytes) -> tuple[int, list[TOCEntry]]:
    """Decode and validate ``stargz.index.json``: (version, entries in TOC order).

    Raises TOCError (UnsafePathError for a NUL in a name) naming the entry and field at fault.
    """
    try:
        doc = _DECODER.decode(json_bytes)
    except msgspec.ValidationError as exc:
        _explain(json_bytes, exc)
    except msgspec.DecodeError as exc:
        raise TOCError(f"TOC is not JSON: {exc}") from None
    except RecursionError:
        raise TOCError("TOC JSON is nested too deeply") from None
    entries = doc.entries
    _finish(entries)
    return doc.version, entries


def decode_payload_entries(json_bytes: bytes) -> list[PayloadEntry]:
    """Decode what locates and verifies each entry's payload: names (read as ``decode_entries``
    reads them), types, sizes, offsets and digests, with their checks; modes, owners, times,
    links and xattrs are left to ``decode_entries`` (about a third of its time).

    Raises what ``decode_entries`` raises for the fields it reads.
    """
    try:
        entries = _PAYLOAD_DECODER.decode(json_bytes).entries
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        decode_entries(json_bytes)  # the full decoder names the entry and field at fault
        raise TOCError(f"TOC is not valid: {exc}") from None  # (it takes a superset: not reached)
    for i, e in enumerate(entries):
        _check_payload_fields(i, e)
        e.chunks = ()
    return entries


def _check_payload_fields(i: int, e: PayloadEntry) -> object:
    """Name (normalised), size bound and digest format of entry ``i``; returns the name as
    the TOC spells it, for error messages."""
    raw_name = e.name
    if raw_name is _NO_NAME:
        if e.type != "chunk":
            raise TOCError(f"entry {i} (unnamed): missing field 'name'")
        e.name = ""
    else:
        try:
            e.name = normalize_name(raw_name)
        except UnsafePathError:
            raise UnsafePathError(f"entry {i} name {raw_name!r} contains a NUL byte") from None
    if e.size > MAX_FILE_SIZE:
        _absurd(_where(i, raw_name), e.size)
    digest, chunk_digest = e.digest, e.chunk_digest
    if digest and not _DIGEST_RE.match(digest) or chunk_digest and chunk_digest != digest and not _DIGEST_RE.match(
            chunk_digest):
        _check_digests(_where(i, raw_name), digest, chunk_digest)
    return raw_name


def _finish(entries: list[TOCEntry]) -> None:
    """The checks a type cannot express, owner names filled in, derived fields set (one pass).
    Error messages quote the name as the TOC spells it (``_where``)."""
    modtimes: dict[str, float] = {}
    unames: dict[int, str] = {}
    gnames: dict[int, str] = {}
    for i, e in enumerate(entries):
        kind = e.type
        raw_name = _check_payload_fields(i, e)
        if kind == "symlink" or kind == "hardlink":
            link = e.link_name
            if not link:
                _check_link(_where(i, raw_name), kind, link)
            if kind == "hardlink":
                e.link_name = normalize_name(link, f"{_where(i, raw_name)}: hardlink target")
        text = e.modtime_text
        if text:
            mt = modtimes.get(text)
            if mt is None:
                mt = modtimes[text] = _parse_modtime(text, _where(i, raw_name))
            e.modtime = mt
        else:
            e.modtime = 0.0
        if e.xattrs is None:
            e.xattrs = {}
        e.implied = False
        e.chunks = ()
        if kind == "dir":
            e.num_link = 2
            e.children = {}
        else:
            e.num_link = 1
            e.children = None
            if kind == "chunk":
                continue
        # Writers record userName/groupName only when they change for an id: fill in the rest.
        if e.uname:
            unames[e.uid] = e.uname
        else:
            e.uname = unames.get(e.uid, "")
        if e.gname:
            gnames[e.gid] = e.gname
        else:
            e.gname = gnames.get(e.gid, "")


# -- checks shared by the fast pass and the explanation of a rejected document ------------


def _where(i: int, raw_name: object) -> str:
    """``entry 3 './a'``: where an entry is, by index and the name the TOC gives it."""
    if raw_name is _NO_NAME or not isinstance(raw_name, str):
        return f"entry {i} (unnamed)"
    return f"entry {i} {raw_name!r}"


def _check_link(where: str, kind: str, link: str) -> None:
    if not link:
        raise TOCError(f"{where}: {kind} is missing field 'linkName'")


def _absurd(where: str, size: int) -> NoReturn:
    raise TOCError(f"{where}: size {size} is absurd (limit {MAX_FILE_SIZE})")


def _check_digests(where: str, digest: str, chunk_digest: str) -> None:
    for key, value in (("digest", digest), ("chunkDigest", chunk_digest)):
        if value and not _DIGEST_RE.match(value):
            raise TOCError(f"{where}: {key} {value!r} is not sha256:<64 hex>")


def _parse_modtime(value: str, where: str) -> float:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise TOCError(f"{where}: modtime {value!r} is not RFC 3339") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


_FIELD_TYPES: dict[str, type] = {
    **dict.fromkeys(("size", "mode", "uid", "gid", "offset", "devMajor", "devMinor", "chunkOffset", "chunkSize",
                     "innerOffset"), int),
    **dict.fromkeys(("name", "type", "modtime", "linkName", "userName", "groupName", "digest", "chunkDigest"), str),
}


def _explain(json_bytes: bytes, exc: msgspec.ValidationError) -> NoReturn:
    """Raise the TOCError that names what the decoder rejected (first bad entry, first bad field)."""
    try:
        doc = json.loads(json_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TOCError(f"TOC is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise TOCError(f"TOC JSON is a {type(doc).__name__}, not an object")
    version = doc.get("version", 0)
    if type(version) is not int:
        raise TOCError(f"TOC version must be an integer, got {version!r}")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list):
        raise TOCError("TOC JSON has no 'entries' list")
    for i, raw in enumerate(raw_entries):
        _check_raw_entry(i, raw)
    raise TOCError(f"TOC does not validate: {exc}")


def _check_raw_entry(i: int, raw: Any) -> None:
    """Every check of one entry as ``json`` decoded it, in the order the fast pass meets them."""
    if not isinstance(raw, dict):
        raise TOCError(f"entry {i} is a {type(raw).__name__}, not an object")
    where = _where(i, raw.get("name"))
    for key, v in raw.items():
        want = _FIELD_TYPES.get(key)
        if want is None or type(v) is want and (want is str or v >= 0):
            continue
        if want is int and type(v) is int:
            raise TOCError(f"{where}: {key} is negative ({v})")
        raise TOCError(f"{where}: {key} must be {'an integer' if want is int else 'a string'}, got {v!r}")
    kind = raw.get("type")
    if kind is None:
        raise TOCError(f"{where}: missing field 'type'")
    if kind not in ENTRY_TYPES:
        raise TOCError(f"{where}: unknown type {kind!r}")
    if kind != "chunk" and "name" not in raw:
        raise TOCError(f"{where}: missing field 'name'")
    normalize_name(raw.get("name", ""), f"entry {i} name")
    for key in ("name", "linkName"):
        if len(raw.get(key, "")) > MAX_NAME_LEN:
            raise TOCError(f"{where}: {key} of {len(raw[key])} characters is longer than {MAX_NAME_LEN}")
    if kind in ("symlink", "hardlink"):
        _check_link(where, kind, raw.get("linkName", ""))
    if kind == "hardlink":
        normalize_name(raw["linkName"], f"{where}: hardlink target")
    if raw.get("size", 0) > MAX_FILE_SIZE:
        _absurd(where, raw["size"])
    for key in ("uid", "gid", "devMajor", "devMinor"):
        if raw.get(key, 0) > MAX_ID:
            raise TOCError(f"{where}: {key} {raw[key]} does not fit 32 bits")
    for key in ("offset", "innerOffset"):
        if raw.get(key, 0) > MAX_OFFSET:
            raise TOCError(f"{where}: {key} {raw[key]} is absurd (limit {MAX_OFFSET})")
    _check_digests(where, raw.get("digest", ""), raw.get("chunkDigest", ""))
    rx = raw.get("xattrs")
    if rx is not None:
        if not isinstance(rx, dict):
            raise TOCError(f"{where}: xattrs must be an object")
        for k, v in rx.items():
            if not isinstance(v, str):
                raise TOCError(f"{where}: xattr {k!r} must be a base64 string")
            try:
                base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise TOCError(f"{where}: xattr {k!r} is not valid base64") from None
    if raw.get("modtime"):
        _parse_modtime(raw["modtime"], where)
