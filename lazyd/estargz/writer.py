"""Convert a tar or tar.gz layer into an eStargz blob, compressing members in parallel.

Layout (the one the reference ``estargz.Build`` writes): entries in tar order, except
that prioritized files (with their hardlink targets and those parent directories that
are in the layer) come first, followed by ``.prefetch.landmark``; without a list,
``.no.prefetch.landmark`` comes first.  Every payload chunk (``chunk_size`` bytes,
default 4 MiB) starts a new gzip member; the tar padding after a file and the tar
headers up to the next payload stay in that file's last member.  Then comes the TOC
member (a tar holding ``stargz.index.json``, then the tar end blocks) and the footer.

Tar headers are copied byte-for-byte from the input, so PAX records, GNU long names
and xattrs survive unchanged.  Names are read as the reference reads them
(``lazyd.estargz.names``: ``/``, ``./`` are the root, ``../../x`` is ``x``); a later
entry with the same cleaned name replaces an earlier one, as in the reference's
``estargz.Build``.  The TOC records each entry's name as the tar spells it (so does the
reference), and every reader cleans it the same way.  Members are compressed by a thread pool (the deflate
call releases the GIL); the output order and bytes do not depend on the pool size.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import mmap
import os
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Union

from lazyd.estargz.errors import BuildError
from lazyd.estargz.footer import footer_bytes
from lazyd.estargz.gzipio import COMPRESSOR, DECOMPRESS_ERRORS, DECOMPRESSOR, GZIP_WBITS
from lazyd.estargz.names import normalize_name, parent_of
from lazyd.estargz.toc import LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME

DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_LEVEL = 9  # what the reference (gzip.BestCompression) uses
_BATCH_BYTES = 1 << 20  # segments are grouped into compression tasks of about this size
_XATTR_PREFIX = "SCHILY.xattr."
_GZIP_MAGIC = b"\x1f\x8b"

Source = Union[str, "os.PathLike[str]", BinaryIO]


@dataclass
class BuildOptions:
    """Writer options.  ``prioritized``: ordered paths to place first (any spelling,
    ``/a/b`` == ``a/b``); a path not in the layer is an error unless ``allow_missing``."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    level: int = DEFAULT_LEVEL
    prioritized: list[str] = field(default_factory=list)
    allow_missing: bool = False
    workers: int | None = None  # compression threads; default: CPU count
    progress: Callable[[int], None] | None = None  # called with input bytes done


@dataclass(frozen=True)
class BuildResult:
    toc_digest: str
    diff_id: str
    blob_digest: str
    blob_size: int
    uncompressed_size: int
    missing_prioritized: tuple[str, ...] = ()


@dataclass(slots=True)
class _Member:
    """One input tar entry: where its raw header and payload are, and its metadata."""

    name: str           # normalised
    info: tarfile.TarInfo
    kind: str           # TOC type
    header: tuple[int, int] | bytes  # span in the input, or literal bytes
    data: int           # payload offset in the input
    size: int           # payload size (regular files only, else 0)
    payload: bytes | None = None  # literal payload (landmarks)


@dataclass(slots=True)
class _Segment:
    """The uncompressed bytes of one gzip member; ``chunk`` = (member, file offset, size)
    when the member starts with a payload chunk."""

    pieces: list[tuple[int, int] | bytes]
    chunk: tuple[_Member, int, int] | None
    length: int = 0


_KINDS = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg", tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink", tarfile.DIRTYPE: "dir", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


# -- input ---------------------------------------------------------------------------


@contextmanager
def _plain_tar(src: Source, tmpdir: str) -> Iterator[BinaryIO]:
    """An open, seekable, uncompressed tar for ``src``: a seekable plain tar is used in place;
    gzip input is decompressed, and a plain stream copied, to a file in ``tmpdir``."""
    with ExitStack() as stack:
        f: BinaryIO = stack.enter_context(open(src, "rb")) if isinstance(src, (str, os.PathLike)) else src
        head = f.read(2)
        if head != _GZIP_MAGIC and f.seekable() and hasattr(f, "fileno"):
            f.seek(0)
            yield f
            return
        out = stack.enter_context(open(os.path.join(tmpdir, "input.tar"), "w+b"))
        blocks = _blocks(head, f)
        if head == _GZIP_MAGIC:
            _gunzip(blocks, out)
        else:
            for block in blocks:
                out.write(block)
        out.flush()
        out.seek(0)
        yield out


def _blocks(head: bytes, f: BinaryIO) -> Iterator[bytes]:
    """``head`` (bytes already read) and then the rest of ``f``, in 1 MiB blocks."""
    if head:
        yield head
    while block := f.read(1 << 20):
        yield block


def _gunzip(blocks: Iterator[bytes], dst: BinaryIO) -> None:
    """Decompress every member of a gzip stream (tar.gz input) into ``dst``; zero bytes
    after the last member (padding some tools add) are ignored."""
    d = DECOMPRESSOR.decompressobj(GZIP_WBITS)
    fed = padding = False
    try:
        for block in blocks:
            while block:
                if padding or (not fed and block[0] == 0):
                    if block.strip(b"\0"):
                        raise BuildError("input gzip stream has trailing data after its last member")
                    padding = True
                    break
                fed = True
                dst.write(d.decompress(block))
                block = b""
                if d.eof:
                    block, fed = d.unused_data, False
                    d = DECOMPRESSOR.decompressobj(GZIP_WBITS)
    except DECOMPRESS_ERRORS as exc:
        raise BuildError(f"input is not a valid gzip stream: {exc}") from None
    if fed:
        raise BuildError("input gzip stream is truncated")


def _scan(f: BinaryIO) -> list[_Member]:
    """Read every header of the tar; later duplicates replace earlier entries."""
    members: dict[str, _Member] = {}
    try:
        tf = tarfile.open(fileobj=f, mode="r:", encoding="utf-8", errors="surrogateescape")
    except tarfile.ReadError as exc:
        if f.seek(0, os.SEEK_END) == 0:
            return []
        raise BuildError(f"input is not a tar archive: {exc}") from None
    prev_end = 0
    while True:
        try:
            info = tf.next()
        except tarfile.TarError as exc:
            raise BuildError(f"input tar is corrupt after offset {prev_end}: {exc}") from None
        if info is None:
            break
        start, prev_end = prev_end, tf.offset
        if info.issparse():
            raise BuildError(f"tar entry {info.name!r} is a sparse file, which eStargz cannot hold")
        kind = _KINDS.get(info.type)
        if kind is None:
            raise BuildError(f"tar entry {info.name!r} has unsupported type {info.type!r}")
        try:
            info.name.encode("utf-8")
            info.linkname.encode("utf-8")
        except UnicodeEncodeError:
            raise BuildError(f"tar entry {info.name!r} has a name or link that is not UTF-8") from None
        name = normalize_name(info.name, "tar entry name")
        if kind == "hardlink":
            normalize_name(info.linkname, f"tar entry {info.name!r}: hardlink target")
        if not name and kind != "dir":
            raise BuildError(f"tar entry {info.name!r} names the layer root but is a {kind}, not a directory")
        if name in (TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            continue  # a previous conversion's TOC or landmark
        size = info.size if kind == "reg" else 0
        members.pop(name, None)
        members[name] = _Member(name, info, kind, (start, info.offset_data), info.offset_data, size)
    return list(members.values())


def _landmark(name: str) -> _Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = len(LANDMARK_CONTENTS), 0, tarfile.REGTYPE
    header = info.tobuf(tarfile.USTAR_FORMAT)
    return _Member(name, info, "reg", header, 0, len(LANDMARK_CONTENTS), LANDMARK_CONTENTS)


def _order(members: list[_Member], prioritized: list[str], allow_missing: bool) -> tuple[list[_Member], list[str]]:
    """Prioritized entries first (parents and hardlink targets that exist in the layer before them),
    then the landmark, then everything else in tar order.  Absent parents are not invented."""
    if not prioritized:
        return [_landmark(NO_PREFETCH_LANDMARK), *members], []
    index = {m.name: m for m in members}
    moved: dict[str, _Member] = {}
    missing: list[str] = []

    def move(name: str) -> None:
        if name in moved or name not in index:
            return
        if name:
            p, chain = parent_of(name), []
            while True:
                chain.append(p)
                if not p:
                    break
                p = parent_of(p)
            for d in reversed(chain):
                if d in index and d not in moved:
                    moved[d] = index[d]
        m = index[name]
        if m.kind == "hardlink":
            move(normalize_name(m.info.linkname))
        moved[name] = m

    for raw in prioritized:
        name = normalize_name(raw, "prioritized file")
        if name not in index:
            if not allow_missing:
                raise BuildError(f"prioritized file {raw!r} is not in the layer")
            missing.append(raw)
            continue
        move(name)
    rest = [m for m in members if m.name not in moved]
    return [*moved.values(), _landmark(PREFETCH_LANDMARK), *rest], missing


# -- layout --------------------------------------------------------------------------


def _segments(members: list[_Member], chunk_size: int) -> list[_Segment]:
    """Split the output stream into gzip members: a new one before every payload chunk."""
    segs = [_Segment([], None)]
    for m in members:
        segs[-1].pieces.append(m.header)
        if m.kind != "reg" or m.size == 0:
            continue
        for off in range(0, m.size, chunk_size):
            n = min(chunk_size, m.size - off)
            piece: tuple[int, int] | bytes = (
                m.payload[off : off + n] if m.payload is not None else (m.data + off, m.data + off + n))
            segs.append(_Segment([piece], (m, off, n)))
        pad = -m.size % 512
        if pad:
            segs[-1].pieces.append(bytes(pad))
    for s in segs:
        s.length = sum(len(p) if isinstance(p, bytes) else p[1] - p[0] for p in s.pieces)
    if not segs[0].pieces:
        segs.pop(0)
    return segs


def _view(buf: mmap.mmap | bytes, piece: tuple[int, int] | bytes) -> bytes | memoryview:
    return piece if isinstance(piece, bytes) else memoryview(buf)[piece[0] : piece[1]]


def _compress_batch(buf: mmap.mmap | bytes, segs: list[_Segment], level: int) -> list[tuple[bytes, str]]:
    """Compress each segment to one gzip member; digest the chunk it starts with."""
    out = []
    for s in segs:
        parts = [_view(buf, p) for p in s.pieces]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        member = COMPRESSOR.compress(data, level, GZIP_WBITS)
        digest = ""
        if s.chunk is not None:
            digest = "sha256:" + hashlib.sha256(parts[0]).hexdigest()
        out.append((member, digest))
    return out


def _batches(segs: list[_Segment]) -> Iterator[list[_Segment]]:
    batch: list[_Segment] = []
    size = 0
    for s in segs:
        batch.append(s)
        size += s.length
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# -- TOC -----------------------------------------------------------------------------


def _modtime(mtime: float) -> str:
    secs = math.floor(mtime + 0.5)
    if secs == 0:
        return ""
    try:
        t = datetime.fromtimestamp(secs, tz=timezone.utc)
    except (OverflowError, ValueError, OSError):
        raise BuildError(f"modification time {mtime} cannot be written as RFC 3339") from None
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}Z"


class _TOCBuilder:
    """Accumulates TOC entries (as the reference's JSON, zero fields omitted)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, object]] = []
        self._unames: dict[int, str] = {}
        self._gnames: dict[int, str] = {}

    def _name_if_changed(self, names: dict[int, str], ident: int, name: str) -> str:
        if not name or names.get(ident) == name:
            return ""
        names[ident] = name
        return name

    def add(self, m: _Member) -> dict[str, object]:
        info = m.info
        # The name as the tar spells it (Python's tarfile drops a directory's trailing "/", so it
        # is put back: "./", "/" and "etc/" as the reference records them).
        e: dict[str, object] = {"name": info.name + "/" if m.kind == "dir" else info.name, "type": m.kind}
        if m.kind == "reg" and m.size:
            e["size"] = m.size
        if t := _modtime(info.mtime):
            e["modtime"] = t
        if m.kind in ("hardlink", "symlink"):
            e["linkName"] = info.linkname
        for key, value in (("mode", info.mode), ("uid", info.uid), ("gid", info.gid)):
            if value:
                e[key] = value
        if u := self._name_if_changed(self._unames, info.uid, info.uname):
            e["userName"] = u
        if g := self._name_if_changed(self._gnames, info.gid, info.gname):
            e["groupName"] = g
        if m.kind in ("char", "block"):
            if info.devmajor:
                e["devMajor"] = info.devmajor
            if info.devminor:
                e["devMinor"] = info.devminor
        xattrs = {}
        for k, v in info.pax_headers.items():
            if k.startswith(_XATTR_PREFIX):
                raw = v.encode("utf-8", "surrogateescape")
                xattrs[k[len(_XATTR_PREFIX):]] = base64.b64encode(raw).decode("ascii")
        if xattrs:
            e["xattrs"] = xattrs
        self.entries.append(e)
        return e

    def add_chunk(self, m: _Member, first: dict[str, object], off: int, n: int, chunk_size: int,
                  blob_offset: int, digest: str) -> None:
        e = first if off == 0 else {"name": m.info.name, "type": "chunk"}
        if off:
            self.entries.append(e)
        e["offset"] = blob_offset
        if off:
            e["chunkOffset"] = off
        if n == chunk_size:
            e["chunkSize"] = n  # as the reference: a full-size chunk records its size, the last one 0
        e["chunkDigest"] = digest

    def json(self) -> bytes:
        # compact: json's C encoder is not used when indenting, and readers do not care
        text = json.dumps({"version": 1, "entries": self.entries}, ensure_ascii=False, separators=(",", ":"))
        try:
            return text.encode()
        except UnicodeEncodeError as exc:
            bad = text[max(0, exc.start - 40) : exc.end + 10]
            raise BuildError(f"a user/group or xattr name is not UTF-8 and cannot go in the TOC: ...{bad!r}") from None


def _toc_member_plain(toc_json: bytes) -> bytes:
    info = tarfile.TarInfo(TOC_TAR_NAME)
    info.size, info.mode = len(toc_json), 0
    return info.tobuf(tarfile.USTAR_FORMAT) + toc_json + bytes(-len(toc_json) % 512) + bytes(1024)


# -- build ---------------------------------------------------------------------------


def build(src: Source, dst: "str | os.PathLike[str] | BinaryIO", options: BuildOptions | None = None) -> BuildResult:
    """Convert tar/tar.gz ``src`` (path or binary file) to an eStargz blob at ``dst``."""
    opts = options or BuildOptions()
    if opts.chunk_size <= 0:
        raise BuildError(f"chunk size must be positive, got {opts.chunk_size}")
    if not 0 <= opts.level <= 9:
        raise BuildError(f"compression level must be 0..9, got {opts.level}")
    workers = opts.workers or os.cpu_count() or 1
    own_dst = isinstance(dst, (str, os.PathLike))
    if own_dst and isinstance(src, (str, os.PathLike)) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise BuildError(f"output {os.fspath(dst)!r} is the input file")
    with ExitStack() as stack:
        tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="lazyd-estargz-"))
        tar = stack.enter_context(_plain_tar(src, tmpdir))
        members, missing = _order(_scan(tar), opts.prioritized, opts.allow_missing)
        tar.seek(0, os.SEEK_END)
        buf: mmap.mmap | bytes = b""
        if tar.tell():
            buf = stack.enter_context(mmap.mmap(tar.fileno(), 0, access=mmap.ACCESS_READ))
        out: BinaryIO = stack.enter_context(open(dst, "wb")) if own_dst else dst  # type: ignore[arg-type]
        try:
            return _write(buf, members, out, opts, workers, tuple(missing))
        except BaseException:
            if own_dst:
                out.close()
                Path(dst).unlink(missing_ok=True)  # type: ignore[arg-type]
            raise


def _write(buf: mmap.mmap | bytes, members: list[_Member], out: BinaryIO, opts: BuildOptions, workers: int,
           missing: tuple[str, ...]) -> BuildResult:
    segs = _segments(members, opts.chunk_size)
    toc = _TOCBuilder()
    firsts: dict[int, dict[str, object]] = {}
    pending = iter(members)
    diff = hashlib.sha256()
    blob = hashlib.sha256()
    offset = 0
    uncompressed = 0
    file_hash: hashlib._Hash | None = None  # running digest of a multi-chunk file

    def add_entries_until(target: _Member | None) -> None:
        """TOC entries in output order: every member up to and including ``target``."""
        for m in pending:
            firsts[id(m)] = toc.add(m)
            if m.kind == "reg" and m.size == 0:
                firsts[id(m)]["digest"] = "sha256:" + hashlib.sha256(b"").hexdigest()
            if m is target:
                return

    def consume(batch: list[_Segment], results: list[tuple[bytes, str]]) -> None:
        nonlocal offset, uncompressed, file_hash
        for s, (member, digest) in zip(batch, results):
            if s.chunk is not None:
                m, off, n = s.chunk
                if off == 0:
                    add_entries_until(m)
                first = firsts[id(m)]
                toc.add_chunk(m, first, off, n, opts.chunk_size, offset, digest)
                if off == 0 and n == m.size:
                    first["digest"] = digest
                else:
                    if off == 0:
                        file_hash = hashlib.sha256()
                    assert file_hash is not None
                    file_hash.update(_view(buf, s.pieces[0]))
                    if off + n == m.size:
                        first["digest"] = "sha256:" + file_hash.hexdigest()
                        file_hash = None
            for p in s.pieces:
                diff.update(_view(buf, p))
            out.write(member)
            blob.update(member)
            offset += len(member)
            uncompressed += s.length
            if opts.progress:
                opts.progress(s.length)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz-deflate") as pool:
        inflight: deque[tuple[list[_Segment], Future[list[tuple[bytes, str]]]]] = deque()
        try:
            for batch in _batches(segs):
                inflight.append((batch, pool.submit(_compress_batch, buf, batch, opts.level)))
                if len(inflight) >= 4 * workers:
                    b, fut = inflight.popleft()
                    consume(b, fut.result())
            while inflight:
                b, fut = inflight.popleft()
                consume(b, fut.result())
        finally:
            for _, fut in inflight:
                fut.cancel()
    add_entries_until(None)
    toc_json = toc.json()
    plain = _toc_member_plain(toc_json)
    diff.update(plain)
    tail = COMPRESSOR.compress(plain, opts.level, GZIP_WBITS) + footer_bytes(offset)
    out.write(tail)
    blob.update(tail)
    out.flush()
    return BuildResult(
        toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
        diff_id="sha256:" + diff.hexdigest(),
        blob_digest="sha256:" + blob.hexdigest(),
        blob_size=offset + len(tail),
        uncompressed_size=uncompressed + len(plain),
        missing_prioritized=missing,
    )


