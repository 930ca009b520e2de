"""TOC model and validation, footer parsing, innerOffset chunks (hand-made inputs)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import pytest

from lazyd.estargz import (
    FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    TOC,
    FooterError,
    Reader,
    TOCDigestMismatch,
    TOCError,
    UnsafePathError,
    decode_chunk,
    decode_toc_member,
    footer_bytes,
    parse_footer,
    parse_payload,
)
from tests.support.tocs import D, reg, toc_json


def test_footer_roundtrip_and_legacy() -> None:
    f = footer_bytes(0x1234)
    assert len(f) == FOOTER_SIZE
    assert gzip.decompress(f) == b""
    assert parse_footer(f, 100_000) == 0x1234
    assert parse_footer(b"junk" + f, 100_000) == 0x1234
    legacy = gzip.compress(b"")  # build a 47-byte legacy footer by hand
    legacy = (b"\x1f\x8b\x08\x04" + b"\x00" * 4 + b"\x00\xff" + b"\x16\x00" + b"%016xSTARGZ" % 77
              + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)
    assert len(legacy) == LEGACY_FOOTER_SIZE
    assert parse_footer(b"\x00" * 10 + legacy, 5000) == 77


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f[:-1] + b"\x01", "not an empty gzip member|not a valid gzip member"),
    (lambda f: f.replace(b"STARGZ", b"STARGX"), "STARGZ magic"),
    (lambda f: f[:12] + b"XG" + f[14:], "subfield id"),
    (lambda f: f[:16] + b"zz" + f[18:], "not 16 hex digits"),
    (lambda f: b"\x00" * 51, "not a gzip header"),
])
def test_bad_footer(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FooterError, match=message):
        parse_footer(mutate(footer_bytes(100)), 10_000)


def test_footer_offset_past_end_and_tiny_blob() -> None:
    with pytest.raises(FooterError, match="not before the footer"):
        parse_footer(footer_bytes(10_000), 10_010)
    with pytest.raises(FooterError, match="too small"):
        parse_footer(b"\x1f\x8b", 2)


def test_names_normalised_implied_dirs_hardlinks() -> None:
    t = TOC.parse(toc_json(
        {"name": "./", "type": "dir", "mode": 0o755},
        reg("./a/b/file.txt", 5, 100, uid=1, userName="u", modtime="2023-11-14T22:13:20Z"),
        {"name": "./a/b/link", "type": "hardlink", "linkName": "./a/b/file.txt"},
        {"name": "a/sym", "type": "symlink", "linkName": "../x"},
        {"name": "a/dev", "type": "char", "devMajor": 1, "devMinor": 3, "uid": 1},
        {"name": "a/.wh..wh..opq", "type": "reg"},
    ), toc_offset=200)
    f = t.lookup("/a/b/file.txt")
    assert f is not None and f.name == "a/b/file.txt" and f.num_link == 2
    assert f.modtime == 1_700_000_000.0 and f.st_mode == 0o100000
    assert t.lookup("a/b/link") is f
    assert t.lookup("a/dev").uname == "u"  # filled from the first entry with uid 1
    a = t.lookup("a")
    assert a is not None and a.implied and a.type == "dir"
    assert sorted(a.children) == [".wh..wh..opq", "b", "dev", "sym"]
    assert t.lookup("a/b").children == {"file.txt": f, "link": f}
    assert t.lookup("a/sym").link_name == "../x"
    assert t.root.name == "" and not t.root.implied and t.root.num_link == 3
    assert [e.name for e in t.entries if e.implied] == []
    assert t.file_chunks(t.lookup("a/b/link")) == [t.chunks[0]]
    assert t.chunks[0].blob_end == 200 and t.prefetch_end is None
    assert t.lookup("../etc") is None


def test_chunk_entries_and_blob_ends() -> None:
    t = TOC.parse(toc_json(
        reg("big", 10, 100, chunkSize=4),
        {"name": "big", "type": "chunk", "offset": 150, "chunkOffset": 4, "chunkSize": 4, "chunkDigest": D},
        {"name": "big", "type": "chunk", "offset": 190, "chunkOffset": 8, "chunkDigest": D},
        reg(".prefetch.landmark", 1, 250),
        reg("small", 3, 300),
    ), toc_offset=400)
    assert [(c.file_offset, c.size, c.blob_offset, c.blob_end) for c in t.chunks] == [
        (0, 4, 100, 150), (4, 4, 150, 190), (8, 2, 190, 250), (0, 1, 250, 300), (0, 3, 300, 400)]
    assert t.prefetch_end == 250
    assert t.entries[2].name == "big" and t.entries[2].chunk_size == 2
    assert TOC.parse(toc_json(reg("a", 3, 300))).chunks[0].blob_end is None


# Bad payload fields: refused by TOC.parse and by the fetcher's parse_payload, with one error.
PAYLOAD_FAULTS = [
    ([{"name": "x", "type": "weird"}], TOCError, "unknown type 'weird'"),
    ([{"type": "reg"}], TOCError, "missing field 'name'"),
    ([{"name": "x"}], TOCError, "missing field 'type'"),
    ([reg("x", 3, 0)], TOCError, "missing field 'offset'"),
    ([reg("a", 3, 300), reg("b", 3, 200)], TOCError, "non-monotonic offset 200"),
    ([reg("a", 3, 300), reg("b", 3, 300)], TOCError, "duplicate offset 300"),
    ([reg("etc/pass\x00wd", 3, 300)], UnsafePathError, "entry 0 name 'etc/pass\\\\x00wd' contains a NUL byte"),
    ([reg("a", 1 << 60, 300)], TOCError, "size 1152921504606846976 is absurd"),
    ([reg("a", -1, 300)], TOCError, "size is negative"),
    ([reg("a", "3", 300)], TOCError, "size must be an integer"),
    ([reg("a", 3, 300, chunkDigest="md5:00")], TOCError, "chunkDigest 'md5:00' is not sha256"),
    ([{"name": "a", "type": "reg", "size": 3, "offset": 9}], TOCError, "missing field 'chunkDigest'"),
    ([reg("a", 10, 300, chunkSize=4)], TOCError, "chunks cover 4 of 10 bytes"),
    ([{"name": "a", "type": "chunk", "offset": 5, "chunkDigest": D}], TOCError, "does not follow"),
    ([reg("a", 3, 5000)], TOCError, "not before the TOC at 1000"),
]
# Bad metadata (links, times, xattrs, the tree): TOC.parse's (the worker's) to refuse.
METADATA_FAULTS = [
    ([{"name": "x", "type": "symlink"}], TOCError, "missing field 'linkName'"),
    ([{"name": "l", "type": "hardlink", "linkName": "x\x00"}], UnsafePathError, "hardlink target 'x\\\\x00' contains a NUL"),
    ([{"name": "l", "type": "hardlink", "linkName": "../../x"}], TOCError, "points at 'x', which is not in the layer"),
    ([{"name": "/", "type": "symlink", "linkName": "x"}], TOCError, "the layer root is a symlink"),
    ([reg("a", 3, 300, modtime="yesterday")], TOCError, "modtime 'yesterday'"),
    ([reg("a", 3, 300, xattrs={"user.x": "!!"})], TOCError, "not valid base64"),
    ([{"name": "l", "type": "hardlink", "linkName": "nowhere"}], TOCError, "not in the layer"),
    ([reg("f", 3, 300), reg("f/g", 3, 400)], TOCError, "which is a reg, not a directory"),
]


@pytest.mark.parametrize("entries, error, message", PAYLOAD_FAULTS + METADATA_FAULTS)
def test_malformed_entries(entries: list[dict[str, object]], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        TOC.parse(toc_json(*entries), toc_offset=1000)


@pytest.mark.parametrize("entries, error, message", PAYLOAD_FAULTS)
def test_payload_refuses_what_toc_parse_refuses_in_the_fields_it_reads(
        entries: list[dict[str, object]], error: type[Exception], message: str) -> None:
    """The fetcher's parse (``parse_payload``) refuses a bad payload field with TOC.parse's error."""
    with pytest.raises(error, match=message):
        parse_payload(toc_json(*entries), 1000)


def test_payload_leaves_metadata_to_the_filesystem_and_matches_toc_parse() -> None:
    """What is not about payload (times, xattrs, links, the tree) is the worker's to refuse;
    on a TOC both accept, the chunk table and landmarks are TOC.parse's."""
    for entries, _, _ in METADATA_FAULTS:
        assert parse_payload(toc_json(*entries), 1000).entries == len(entries)
    doc = toc_json({"name": "./", "type": "dir"}, reg("./usr/bin/a", 10, 100, chunkSize=4),
                   {"type": "chunk", "offset": 150, "chunkOffset": 4, "chunkSize": 6, "chunkDigest": D},
                   reg("/.prefetch.landmark", 2, 250, chunkSize=1),
                   {"name": ".prefetch.landmark", "type": "chunk", "offset": 260, "chunkOffset": 1, "chunkSize": 1,
                    "chunkDigest": D}, reg("b", 3, 300),
                   {"name": ".no.prefetch.landmark/x", "type": "dir"})
    want = TOC.parse(doc, toc_offset=1000)
    got = parse_payload(doc, 1000, want.digest)
    assert got.chunks == want.chunks and len(got.chunks) == 5
    assert got.prefetch_end == want.prefetch_end == 250
    assert got.no_prefetch and want.no_prefetch  # an implied parent directory is a name too
    with pytest.raises(TOCDigestMismatch):
        parse_payload(doc, 1000, "sha256:" + "0" * 64)


def test_not_json_and_digest_mismatch() -> None:
    with pytest.raises(TOCError, match="TOC is not JSON"):
        TOC.parse(b"{not json")
    with pytest.raises(TOCError, match="no 'entries' list"):
        TOC.parse(b'{"version": 1}')
    data = toc_json(reg("a", 3, 300))
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    assert TOC.parse(data, expected_digest=good).digest == good
    with pytest.raises(TOCDigestMismatch, match=f"expected {D}"):
        TOC.parse(data, expected_digest=D)


def _tar(name: str, data: bytes) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return bio.getvalue()


def test_decode_toc_member_checks_wrapper() -> None:
    assert decode_toc_member(gzip.compress(_tar("stargz.index.json", b"{}")) + footer_bytes(0)) == b"{}"
    with pytest.raises(TOCError, match="want regular file 'stargz.index.json'"):
        decode_toc_member(gzip.compress(_tar("other.json", b"{}")))
    with pytest.raises(TOCError, match="not valid gzip"):
        decode_toc_member(b"\x1f\x8b\x08\x00garbage-garbage-garbage")


def test_inner_offset_chunks_share_a_member() -> None:
    """Two small files in one gzip member (innerOffset, as newer writers make) read back verified."""
    a, b = b"first file", b"second file!"
    plain = _tar("x", b"")[:512] + a + bytes(512 - len(a)) + _tar("y", b"")[:512] + b + bytes(512 - len(b))
    head = gzip.compress(b"\0" * 512)  # member 0: some header bytes
    member = gzip.compress(plain)
    toc_off = len(head) + len(member)

    def d(x: bytes) -> str:
        return "sha256:" + hashlib.sha256(x).hexdigest()

    doc = toc_json(
        {"name": "a", "type": "reg", "size": len(a), "offset": len(head), "innerOffset": 512, "digest": d(a),
         "chunkDigest": d(a)},
        {"name": "b", "type": "reg", "size": len(b), "offset": len(head), "innerOffset": 1536, "digest": d(b),
         "chunkDigest": d(b)},
    )
    blob = head + member + gzip.compress(_tar("stargz.index.json", doc)) + footer_bytes(toc_off)
    r = Reader.open(lambda off, n: blob[off : off + n], len(blob))
    ca, cb = r.toc.chunks
    assert (ca.blob_offset, ca.blob_end, ca.inner_offset) == (len(head), toc_off, 512)
    assert (cb.blob_offset, cb.blob_end, cb.inner_offset) == (len(head), toc_off, 1536)
    assert r.read("a") == a and r.read("b", 7) == b"file!"
    assert decode_chunk(cb, blob[cb.blob_offset : cb.blob_end]) == b
