"""Fuzz the TOC member decoder and the TOC parser (lazyd.estargz.toc: decode_toc_member, TOC.parse).

Only EStargzError subclasses may escape; a parsed TOC must hold only cleaned names (nothing
above the layer root), consistent directories and a sound chunk table.  Every parse of a
small input is bounded in time and memory.
"""

from __future__ import annotations

import gzip
import json
import tarfile
import zlib

from hypothesis import event, given
from hypothesis import strategies as st

from lazyd.estargz import TOC, EStargzError, decode_toc_member, parse_payload
from tests.fuzz.conftest import FUZZ, CaseCounter, guarded
from tests.fuzz.strategies import json_values, mutated
from tests.fuzz.toc_docs import member_of, plausible_documents, tar_of, toc_documents

DEFLATE_RATIO = 1032  # the most one deflate byte can expand to
# Inflating n compressed bytes yields <= 1032 n bytes; tarfile and the JSON slice copy them
# at most a few times.  A 1 KiB member may therefore cost ~4 MiB, not more.
def member_budget(n: int) -> int:
    return 1024 * 1024 + 4 * DEFLATE_RATIO * n


def toc_budget(n: int) -> int:
    """A parsed TOC costs some hundred bytes per entry, each entry at least ~20 bytes of JSON."""
    return 1024 * 1024 + 400 * n


def check_member(member: bytes) -> None:
    out = guarded(lambda: decode_toc_member(member), (EStargzError,), max_bytes=member_budget(len(member)))
    event(f"decode_toc_member: {type(out.error).__name__ if out.error else 'decoded'}")
    if out.error is None:
        assert isinstance(out.result, bytes)
        check_parse(out.result)


def check_parse(toc_json: bytes, toc_offset: int | None = None) -> TOC | None:
    out = guarded(lambda: TOC.parse(toc_json, toc_offset=toc_offset), (EStargzError,),
                  max_bytes=toc_budget(len(toc_json)))
    payload = guarded(lambda: parse_payload(toc_json, toc_offset or 0), (EStargzError,),
                      max_bytes=toc_budget(len(toc_json))) if toc_offset is not None else None
    if out.error is not None:
        assert str(out.error)
        event(f"TOC.parse: {type(out.error).__name__}")
        return None
    event("TOC.parse: parsed")
    check_toc(out.result, toc_offset)
    if payload is not None:
        # The fetcher's parse accepts every TOC that TOC.parse accepts, with the same chunk table.
        assert payload.error is None, payload.error
        got, want = payload.result, out.result
        assert (got.chunks, got.prefetch_end, got.no_prefetch) == (want.chunks, want.prefetch_end, want.no_prefetch)
    return out.result


def check_toc(toc: TOC, toc_offset: int | None) -> None:
    """What every parsed TOC guarantees to the FUSE layer."""
    names = toc.names()
    assert names[0] == ""
    for name in names:
        parts = name.split("/")
        assert name == "" or all(p not in ("", ".", "..") for p in parts), f"unclean name {name!r}"
        assert "\x00" not in name
        entry = toc.lookup(name)
        assert entry is not None, name
        if entry.children is not None:
            for base, child in entry.children.items():
                assert base and "/" not in base and base not in (".", ".."), (name, base)
                assert toc.lookup(f"{name}/{base}" if name else base) is not None
        if entry.type == "reg":
            covered = 0
            for c in toc.file_chunks(entry):
                assert c.file_offset == covered and c.size > 0
                covered += c.size
            assert covered == entry.size
    root = toc.lookup("")
    assert root is not None and root.type == "dir"
    for c in toc.chunks:
        assert c.blob_offset >= 0 and c.inner_offset >= 0
        if c.blob_end is not None:
            assert c.blob_end > c.blob_offset
        if toc_offset is not None:
            assert c.blob_end is not None and c.blob_end <= toc_offset


# -- decode_toc_member -------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=1024))
def test_member_arbitrary_bytes(cases: CaseCounter, data: bytes) -> None:
    cases.hit()
    check_member(data)


@FUZZ
@given(plain=st.binary(max_size=2048), level=st.integers(0, 9))
def test_member_gzip_of_arbitrary_bytes(cases: CaseCounter, plain: bytes, level: int) -> None:
    """A valid gzip member around anything: the tar reader sees arbitrary headers."""
    cases.hit()
    check_member(gzip.compress(plain, compresslevel=level, mtime=0))


@FUZZ
@given(data=st.data(), doc=toc_documents(), name=st.sampled_from(["stargz.index.json", "other", "./stargz.index.json"]),
       fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE]),
       pax=st.one_of(st.none(), st.dictionaries(st.sampled_from(["path", "size", "comment", "mtime", "linkpath"]),
                                                st.text(max_size=20), max_size=2)))
def test_member_mutated_tar(cases: CaseCounter, data: st.DataObject, doc: bytes, name: str, fmt: int, kind: bytes,
                            pax: dict[str, str] | None) -> None:
    """Tar wrappers of every format, with header bytes mutated before compression."""
    cases.hit()
    try:
        raw = tar_of(name, doc, fmt, kind, pax)
    except (ValueError, tarfile.TarError):
        return  # tarfile cannot write this header (e.g. a pax 'size' that is not a number)
    check_member(gzip.compress(data.draw(mutated(raw, max_edits=3)), mtime=0))


@FUZZ
@given(data=st.data(), doc=toc_documents(), tail=st.binary(max_size=64))
def test_member_mutated_gzip(cases: CaseCounter, data: st.DataObject, doc: bytes, tail: bytes) -> None:
    """A real TOC member with compressed bytes flipped, cut or padded (the footer follows it in a blob)."""
    cases.hit()
    check_member(data.draw(mutated(member_of(doc) + tail, max_edits=2)))


def test_member_deflate_bomb_is_bounded() -> None:
    """The densest member (1 MiB of zeros in ~1 KiB) stays within the budget (a TOC is allowed 512 MiB
    of JSON, so a bigger member may inflate further: that bound is MAX_TOC_JSON_SIZE)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = c.compress(b"\0" * (1 << 20)) + c.flush()
    assert len(member) < 1100
    out = guarded(lambda: decode_toc_member(member), (EStargzError,), max_bytes=member_budget(len(member)))
    assert out.error is not None and "empty tar" in str(out.error), out.error


# -- TOC.parse -------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=1024))
def test_parse_arbitrary_bytes(cases: CaseCounter, data: bytes) -> None:
    cases.hit()
    check_parse(data)


@FUZZ
@given(value=json_values)
def test_parse_arbitrary_json(cases: CaseCounter, value: object) -> None:
    cases.hit()
    check_parse(json.dumps(value).encode())
    check_parse(json.dumps({"version": 1, "entries": value}).encode())


@FUZZ
@given(doc=toc_documents(), toc_offset=st.one_of(st.none(), st.integers(0, 6000), st.just(2**64)))
def test_parse_toc_documents(cases: CaseCounter, doc: bytes, toc_offset: int | None) -> None:
    """Entry lists with hostile names, types, sizes, offsets, digests, times and xattrs."""
    cases.hit()
    check_parse(doc, toc_offset)


@FUZZ
@given(doc=plausible_documents(), toc_offset=st.one_of(st.none(), st.integers(0, 2000), st.just(2**45)))
def test_parse_plausible_documents(cases: CaseCounter, doc: bytes, toc_offset: int | None) -> None:
    """TOCs that mostly follow the rules, so the tree and chunk table are built from hostile names."""
    cases.hit()
    check_parse(doc, toc_offset)


@FUZZ
@given(data=st.data(), doc=st.one_of(toc_documents(), plausible_documents()))
def test_parse_mutated_json(cases: CaseCounter, data: st.DataObject, doc: bytes) -> None:
    cases.hit()
    check_parse(data.draw(mutated(doc)))


# -- the TOC's consumers: the FUSE inode table and the fetcher's chunk index ----------------------

@FUZZ
@given(doc=plausible_documents(), toc_offset=st.integers(1, 3000))
def test_parsed_toc_consumers(cases: CaseCounter, doc: bytes, toc_offset: int) -> None:
    """Every TOC that parses turns into the worker's inode table and the fetcher's chunk index,
    or is refused with their own errors (InodeTableError, ChunkIndexError)."""
    from lazyd.fetcher.layers import ChunkIndex, ChunkIndexError
    from lazyd.estargz.inodes import InodeTable, InodeTableError

    cases.hit()
    toc = check_parse(doc, toc_offset)
    if toc is None:
        return
    out = guarded(lambda: InodeTable.from_toc(toc), (InodeTableError,), max_bytes=toc_budget(len(doc)))
    event(f"InodeTable: {type(out.error).__name__ if out.error else 'built'}")
    guarded(lambda: ChunkIndex.from_toc(toc, toc_offset), (ChunkIndexError,), max_bytes=toc_budget(len(doc)))
