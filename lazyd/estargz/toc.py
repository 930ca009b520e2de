"""The TOC: decode the TOC member, validate every entry, build the entry tree and chunk table.

``TOC.parse`` takes the JSON bytes of ``stargz.index.json``; ``lazyd.estargz.entries``
decodes and validates the entries.  Names (and hardlink targets) are read as the
reference reads them (``lazyd.estargz.names``: ``./a/`` and ``/a`` -> ``a``, ``../../x``
-> ``x``; the root ``/`` or ``./`` is ``""``); an entry whose name repeats an earlier
one replaces it, as in the reference.  Hardlinks are resolved by ``lookup`` and
``children``, implied parent directories exist in ``lookup`` (``implied=True``) but
never in ``entries``.  Whiteout names are kept as they are.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

from lazyd.estargz.entries import (ENTRY_TYPES, MAX_FILE_SIZE, Chunk, PayloadEntry, TOCEntry, decode_entries,
                                   decode_payload_entries)
from lazyd.estargz.errors import EStargzError, TOCDigestMismatch, TOCError, TruncatedBlobError, UnsafePathError
from lazyd.estargz.gzipio import DECOMPRESS_ERRORS, MemberReader
from lazyd.estargz.names import normalize_name, parent_of  # noqa: F401 (re-exported)

__all__ = ["ENTRY_TYPES", "MAX_FILE_SIZE", "MAX_TOC_JSON_SIZE", "MAX_TOC_MEMBER_SIZE", "TOC", "Chunk", "Payload",
           "TOCEntry", "decode_toc_member", "normalize_name", "parent_of", "parse_payload", "toc_digest"]

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

MAX_CHUNK_SIZE = 1 << 30     # one chunk is decompressed and verified in memory

IMPLIED_NAMES_SLACK = 16 << 20
"""Bytes of implied parent-directory names a TOC may make besides twice its own size (see ``_tree``)."""
MAX_TOC_JSON_SIZE = 128 << 20
"""Largest ``stargz.index.json`` accepted: 128 MiB.

A TOC costs about 360 bytes of JSON per entry (two sha256 digests and a path per file), so
this admits about 370,000 entries; the biggest real layers have 100,000-200,000 (30-70 MB).
The whole JSON is held in memory to be verified and parsed, and parsing briefly costs about
4.5x the JSON's size (measured: 150 MB for a 34 MB, 100,000-entry TOC), so the cap bounds
what one hostile layer can make a process allocate.  It is checked against the tar header's
size before anything is inflated, and the inflater never produces more than the header
promised (plus ``TOC_TAR_SLACK``), so a small member that inflates to gigabytes (a TOC
bomb) is refused after inflating at most the cap -- and at once if its header is honest."""

MAX_TOC_MEMBER_SIZE = 48 << 20
"""Largest compressed TOC member accepted: 48 MiB.

The footer says where the TOC member starts, so a hostile footer can make it the whole blob;
this cap is checked before the member is fetched.  TOC JSON compresses at least 3x (its
least compressible part is the hex digests: measured 3.8x on a 100,000-entry TOC with two
random digests per file), so 48 MiB holds any TOC under ``MAX_TOC_JSON_SIZE``."""

TOC_TAR_SLACK = 1 << 20
"""Inflated bytes allowed after the JSON in the TOC member: the tar padding and end blocks
(at most 10 KiB with any tar writer); a member that goes on longer is refused."""

_TAR_HEAD = 64 * 1024  # inflated bytes read to find the tar header (PAX records included)
_PIECE = 1 << 20  # the JSON is inflated and hashed this many bytes at a time


def decode_toc_member(data: bytes | memoryview, expected_digest: str | None = None) -> bytes:
    """Decompress the TOC gzip member (trailing bytes, e.g. the footer, are ignored),
    read its tar wrapper and return the ``stargz.index.json`` bytes.

    Inflates no more than the tar header announces (refused above ``MAX_TOC_JSON_SIZE``) plus
    ``TOC_TAR_SLACK``, and reads at most ``MAX_TOC_MEMBER_SIZE`` compressed bytes.  With
    ``expected_digest`` the member is first inflated and hashed without keeping anything
    (TOCDigestMismatch, or any other refusal, then costs no memory) and only a member that
    matches is inflated again and returned: inflating is fast (about 0.05 s for a
    100,000-entry TOC), holding a hostile JSON is not.
    """
    view = memoryview(data)
    if expected_digest is not None:
        _, digest = _inflate_json(view, keep=False)
        if digest != expected_digest:
            raise TOCDigestMismatch(f"TOC digest is {digest}, expected {expected_digest}")
    body, _ = _inflate_json(view, keep=True)
    return body


def _inflate_json(view: memoryview, keep: bool) -> tuple[bytes, str]:
    """(the JSON if ``keep`` else b"", its digest if not ``keep`` else ""): every check of
    ``decode_toc_member`` but the digest's."""
    reader = MemberReader(view[:MAX_TOC_MEMBER_SIZE])
    try:
        head = reader.read(_TAR_HEAD)
    except DECOMPRESS_ERRORS as exc:
        raise TOCError(f"TOC member is not valid gzip: {exc}") from None
    if len(head) < _TAR_HEAD and not reader.eof:
        raise _cut(len(view))
    try:
        tf = tarfile.open(fileobj=io.BytesIO(head), mode="r:")
        member = tf.next()
    except tarfile.TarError as exc:
        raise TOCError(f"TOC member does not hold a tar: {exc}") from None
    if member is None:
        raise TOCError("TOC member holds an empty tar")
    if member.name != TOC_TAR_NAME or not member.isreg():
        raise TOCError(f"TOC tar entry is {member.name!r}, want regular file {TOC_TAR_NAME!r}")
    if member.size > MAX_TOC_JSON_SIZE:
        raise TOCError(f"TOC JSON of {member.size} bytes is larger than {MAX_TOC_JSON_SIZE}")
    if member.offset_data > len(head):
        raise TOCError(f"TOC tar header takes {member.offset_data} bytes (more than {_TAR_HEAD})")
    first = head[member.offset_data : member.offset_data + member.size]
    after = len(head) - member.offset_data - len(first)  # inflated bytes after the JSON so far
    del head
    hasher = None if keep else hashlib.sha256(first)
    pieces = [first] if keep else []
    remaining = member.size - len(first)
    try:
        while remaining > 0:
            piece = reader.read(min(remaining, _PIECE))
            if not piece:
                break
            if keep:
                pieces.append(piece)
            else:
                hasher.update(piece)  # type: ignore[union-attr]
            remaining -= len(piece)
        while not reader.eof and after <= TOC_TAR_SLACK:
            rest = reader.read(_PIECE)
            if not rest:
                break
            after += len(rest)
    except DECOMPRESS_ERRORS as exc:
        raise TOCError(f"TOC member is not valid gzip: {exc}") from None
    if remaining > 0 and reader.eof:
        raise TruncatedBlobError(f"TOC JSON has {member.size - remaining} of {member.size} bytes")
    if not reader.eof:
        if after > TOC_TAR_SLACK:
            raise TOCError(f"TOC member goes on for more than {TOC_TAR_SLACK} bytes after the "
                           f"{member.size}-byte JSON")
        raise _cut(len(view))
    if not keep:
        return b"", "sha256:" + hasher.hexdigest()  # type: ignore[union-attr]
    return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), ""


def _cut(given: int) -> EStargzError:
    """The error for a TOC member that did not end within the input."""
    if given > MAX_TOC_MEMBER_SIZE:
        return TOCError(f"TOC member is larger than {MAX_TOC_MEMBER_SIZE} bytes")
    return TruncatedBlobError(f"TOC member is truncated ({given} compressed bytes end mid-stream)")


def toc_digest(json_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(json_bytes).hexdigest()


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
        if toc_offset is not None and toc_offset < 0:
            raise TOCError(f"TOC offset {toc_offset} is negative")
        version, entries = decode_entries(json_bytes)
        chunks = _chunk_table(entries, toc_offset)
        by_name, root = _tree(entries, 2 * len(json_bytes) + IMPLIED_NAMES_SLACK)
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


@dataclass(frozen=True)
class Payload:
    """Where a TOC's payload lies (``parse_payload``): its chunks in blob order and the landmarks."""

    chunks: list[Chunk]
    prefetch_end: int | None  # blob offset of ``.prefetch.landmark``'s member
    no_prefetch: bool  # the layer has ``.no.prefetch.landmark``
    entries: int


def parse_payload(json_bytes: bytes, toc_offset: int, expected_digest: str | None = None) -> Payload:
    """The chunk table and landmarks of a TOC (its digest checked against ``expected_digest``
    if given: ``decode_toc_member`` may have done it).

    What a fetcher needs, in about 40% of ``TOC.parse``'s time: it validates the payload
    layout as ``TOC.parse`` does (same chunk table, same errors), and the names, sizes and
    digests it reads; modes, owners, times, links and the entry tree are the filesystem's.
    Later entries win a name, as in ``TOC.parse``.
    """
    if expected_digest is not None and (digest := toc_digest(json_bytes)) != expected_digest:
        raise TOCDigestMismatch(f"TOC digest is {digest}, expected {expected_digest}")
    if len(json_bytes) > MAX_TOC_JSON_SIZE:
        raise TOCError(f"TOC JSON of {len(json_bytes)} bytes is larger than {MAX_TOC_JSON_SIZE}")
    if toc_offset < 0:
        raise TOCError(f"TOC offset {toc_offset} is negative")
    entries = decode_payload_entries(json_bytes)
    chunks = _chunk_table(entries, toc_offset)
    landmark: PayloadEntry | None = None
    no_prefetch = False
    for e in entries:
        name = e.name
        if e.type == "chunk":
            continue
        if name == PREFETCH_LANDMARK:
            landmark = e
        elif name == NO_PREFETCH_LANDMARK or name.startswith(NO_PREFETCH_LANDMARK + "/"):
            no_prefetch = True  # (a parent of a name is a name of the tree too)
    prefetch_end = landmark.chunks[0].blob_offset if landmark is not None and landmark.chunks else None
    return Payload(chunks, prefetch_end, no_prefetch, len(entries))


def _chunk_table(entries: Sequence[PayloadEntry], toc_offset: int | None) -> list[Chunk]:
    """Validate payload layout and return chunks in blob order (blob_end filled); each regular
    file's ``chunks`` are set."""
    pending: list[tuple[PayloadEntry, PayloadEntry]] = []  # (chunk-bearing entry, its file), blob_end unknown yet
    append = pending.append
    file: PayloadEntry | None = None
    fsize = covered = 0
    last_offset = last_inner = -1  # (offset, innerOffset) of the previous chunk, which is last_at
    last_at: tuple[int, PayloadEntry] | None = None
    for i, e in enumerate(entries):
        kind = e.type
        if kind == "chunk":
            if file is None or covered >= fsize:
                raise TOCError(f"{_at(i, e)}: chunk entry does not follow an unfinished regular file")
            if e.name and e.name != file.name:
                raise TOCError(f"{_at(i, e)}: chunk entry names {e.name!r} but follows {file.name!r}")
            e.name = file.name
            if e.chunk_offset != covered:
                raise TOCError(f"{_at(i, e)}: chunkOffset {e.chunk_offset}, expected {covered}")
        else:
            if file is not None and covered != fsize:
                raise TOCError(f"regular file {file.name!r}: chunks cover {covered} of {fsize} bytes")
            file = None
            if kind != "reg" or not e.size:
                continue
            if e.chunk_offset != 0:
                raise TOCError(f"{_at(i, e)}: first chunkOffset of a file must be 0, got {e.chunk_offset}")
            file, fsize, covered = e, e.size, 0
        start = e.chunk_offset
        size = e.chunk_size or (fsize - start)
        if start + size > fsize:
            raise TOCError(f"{_at(i, e)}: chunk [{start}, +{size}) runs past the file size {fsize}")
        if size > MAX_CHUNK_SIZE:
            raise TOCError(f"{_at(i, e)}: chunk size {size} is absurd (limit {MAX_CHUNK_SIZE})")
        e.chunk_size = size
        offset, inner = e.offset, e.inner_offset
        if offset == 0 and inner == 0:
            raise TOCError(f"{_at(i, e)}: missing field 'offset' for a payload chunk")
        if offset < last_offset or offset == last_offset and inner <= last_inner:
            what = "duplicate" if (offset, inner) == (last_offset, last_inner) else "non-monotonic"
            raise TOCError(f"{_at(i, e)}: {what} offset {offset} (innerOffset {inner}) "
                           f"after {last_offset} (innerOffset {last_inner}) of {_at(*last_at) if last_at else ''}")
        if toc_offset is not None and offset >= toc_offset:
            raise TOCError(f"{_at(i, e)}: offset {offset} is not before the TOC at {toc_offset}")
        last_offset, last_inner, last_at = offset, inner, (i, e)
        if not e.chunk_digest:
            if size == fsize and file.digest:
                e.chunk_digest = file.digest
            else:
                raise TOCError(f"{_at(i, e)}: missing field 'chunkDigest'")
        append((e, file))
        covered += size
    if file is not None and covered != fsize:
        raise TOCError(f"regular file {file.name!r}: chunks cover {covered} of {fsize} bytes")

    # Backwards: a member ends where the next member (a different offset) starts.  A file's
    # chunk entries are consecutive, so its chunks are one run of this walk.
    chunks: list[Chunk] = []
    add = chunks.append
    end = toc_offset
    next_offset: int | None = None
    run: list[Chunk] = []
    run_file: PayloadEntry | None = None
    for e, f in reversed(pending):
        offset = e.offset
        if next_offset is not None and offset != next_offset:
            end = next_offset
        next_offset = offset
        c = Chunk(f.name, e.chunk_offset, e.chunk_size, offset, end, e.chunk_digest, e.inner_offset)
        add(c)
        if f is not run_file:
            if run_file is not None:
                run.reverse()
                run_file.chunks = tuple(run)
            run, run_file = [c], f
        else:
            run.append(c)
    if run_file is not None:
        run.reverse()
        run_file.chunks = tuple(run)
    chunks.reverse()
    return chunks


def _at(i: int, e: PayloadEntry) -> str:
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


def _tree(entries: list[TOCEntry], implied_budget: int) -> tuple[dict[str, TOCEntry], TOCEntry]:
    """Name index (later duplicates win, implied parents added) and directory children.

    Implied parent directories are named by their full path, so one deep name implies
    O(depth^2) bytes of names: at most ``implied_budget`` bytes of them are made (TOCError
    beyond), which keeps the memory a TOC can cost linear in its size."""
    budget = [implied_budget]
    by_name: dict[str, TOCEntry] = {}
    for e in entries:
        if e.type != "chunk":
            by_name[e.name] = e
    root = by_name.get("")
    if root is None:
        root = by_name[""] = _implied("")
    elif root.type != "dir":
        raise TOCError(f"the layer root is a {root.type}, not a directory")
    hardlinks: list[tuple[dict[str, TOCEntry], str, TOCEntry]] = []
    for name, e in list(by_name.items()):
        if not name:
            continue
        parent_name, _, base = name.rpartition("/")
        parent = by_name.get(parent_name)
        if parent is None:
            parent = _implied_parents(parent_name, by_name, budget)
        children = parent.children
        if children is None:
            raise TOCError(f"{name!r} is inside {parent.name!r}, which is a {parent.type}, not a directory")
        kind = e.type
        if kind == "hardlink":
            hardlinks.append((children, base, e))  # resolved once every name is known
            continue
        if kind == "dir":
            parent.num_link += 1
        children[base] = e
    for children, base, e in hardlinks:
        target = _resolve(e, by_name)
        target.num_link += 1
        children[base] = target
    return by_name, root


def _implied(name: str) -> TOCEntry:
    return TOCEntry(name=name, type="dir", mode=0o755, num_link=2, children={}, implied=True)


def _implied_parents(name: str, by_name: dict[str, TOCEntry], budget: list[int]) -> TOCEntry:
    """Directory ``name`` (absent from the layer) and any absent parents, linked into the tree;
    ``budget[0]``: bytes of implied names still allowed (decreased here)."""
    missing = []
    while name not in by_name:  # the root is always there
        missing.append(name)
        budget[0] -= len(name) + 64  # the name, and roughly what its entry costs besides
        if budget[0] < 0:
            raise TOCError("the TOC implies more parent directories than its size allows (a name nested "
                           f"thousands of levels deep, such as {name[:80]!r}...)")
        name = name.rpartition("/")[0]
    parent = by_name[name]
    for d in reversed(missing):
        if parent.children is None:
            raise TOCError(f"{d!r} is inside {parent.name!r}, which is a {parent.type}, not a directory")
        entry = by_name[d] = _implied(d)
        parent.children[d.rpartition("/")[2]] = entry
        parent.num_link += 1
        parent = entry
    return parent
