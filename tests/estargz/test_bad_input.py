"""Damaged blobs: each kind of damage gives its own error type and a message naming it."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from lazyd.estargz import (
    FOOTER_SIZE,
    BuildOptions,
    ChunkDigestMismatch,
    FooterError,
    Reader,
    TOCDigestMismatch,
    TOCError,
    TruncatedBlobError,
    UnsafePathError,
    build,
    footer_bytes,
)
from lazyd.estargz.verify import verify_blob


@pytest.fixture()
def blob(tmp_path: Path, every_type_tar: Path) -> tuple[bytes, str]:
    out = tmp_path / "good.esgz"
    result = build(every_type_tar, out, BuildOptions(chunk_size=4000))
    return out.read_bytes(), result.toc_digest


def open_bytes(data: bytes, toc_digest: str | None = None) -> Reader:
    return Reader.open(lambda off, n: data[off : off + n], len(data), toc_digest)


def test_good_blob_verifies(blob: tuple[bytes, str]) -> None:
    data, digest = blob
    report = verify_blob(open_bytes(data, digest))
    assert report.chunks > 5 and report.files > 5


def test_truncated_blob(blob: tuple[bytes, str]) -> None:
    data, _ = blob
    with pytest.raises(FooterError, match="no eStargz footer"):
        open_bytes(data[:-10])
    r = open_bytes(data)
    c = r.toc.chunks[3]
    # a source that returns fewer bytes than the chunk extent
    short = Reader(lambda off, n: data[off : off + n - 7], len(data), r.footer, r.toc, r.toc_json)
    with pytest.raises(TruncatedBlobError, match=f"asked for {c.blob_end - c.blob_offset} bytes at blob offset"):
        short.read_chunk(c)
    # a blob cut inside the TOC member
    cut = data[: r.footer.toc_offset + 20] + footer_bytes(r.footer.toc_offset)
    with pytest.raises(TruncatedBlobError, match="TOC member is truncated"):
        open_bytes(cut)


def test_flipped_byte_in_chunk(blob: tuple[bytes, str]) -> None:
    data, digest = blob
    r = open_bytes(data, digest)
    tool = r.lookup("usr/bin/tool")
    assert tool is not None
    c = tool.chunks[2]
    for pos in (c.blob_offset + 20, c.blob_end - 12, c.blob_end - 3):  # deflate body, near the end, CRC
        bad = bytearray(data)
        bad[pos] ^= 0x40
        rb = open_bytes(bytes(bad), digest)
        with pytest.raises(ChunkDigestMismatch, match=f"chunk of 'usr/bin/tool'.* at blob offset {c.blob_offset}"):
            rb.read("usr/bin/tool", c.file_offset, 10)
        with pytest.raises(ChunkDigestMismatch):
            verify_blob(rb)


def test_corrupted_footer(blob: tuple[bytes, str]) -> None:
    data, _ = blob
    bad = bytearray(data)
    bad[-FOOTER_SIZE + 20] = ord("g")  # inside the hex TOC offset
    with pytest.raises(FooterError, match="not 16 hex digits"):
        open_bytes(bytes(bad))
    with pytest.raises(FooterError, match="no eStargz footer"):
        open_bytes(data + b"\x00")


def test_toc_digest_mismatch(blob: tuple[bytes, str]) -> None:
    data, digest = blob
    wrong = "sha256:" + "0" * 64
    with pytest.raises(TOCDigestMismatch, match=f"TOC digest is {digest}, expected {wrong}"):
        open_bytes(data, wrong)


def _with_toc(data: bytes, toc_offset: int, toc_json: bytes) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc_json)
        tf.addfile(info, io.BytesIO(toc_json))
    return data[:toc_offset] + gzip.compress(bio.getvalue()) + footer_bytes(toc_offset)


def test_toc_not_json_and_unsafe_names(blob: tuple[bytes, str]) -> None:
    data, _ = blob
    r = open_bytes(data)
    off = r.footer.toc_offset
    with pytest.raises(TOCError, match="TOC is not JSON"):
        open_bytes(_with_toc(data, off, b"<html>not json</html>"))
    doc = json.loads(r.toc_json)
    doc["entries"][3]["name"] = "etc/sh\x00adow"
    with pytest.raises(UnsafePathError, match=r"entry 3 name 'etc/sh\\x00adow' contains a NUL byte"):
        open_bytes(_with_toc(data, off, json.dumps(doc).encode()))
    # ".." cannot climb out of the layer: the reference reads "../../NAME" as "NAME", and so do we.
    doc = json.loads(r.toc_json)
    name = doc["entries"][3]["name"]
    doc["entries"][3]["name"] = "../../" + name
    moved = open_bytes(_with_toc(data, off, json.dumps(doc).encode()))
    assert moved.toc.entries[3].name == r.toc.entries[3].name
    assert moved.toc.names() == r.toc.names()
    doc = json.loads(r.toc_json)
    doc["entries"][1]["type"] = "socket"
    with pytest.raises(TOCError, match="unknown type 'socket'"):
        open_bytes(_with_toc(data, off, json.dumps(doc).encode()))


def test_chunk_digest_lies(blob: tuple[bytes, str]) -> None:
    """A TOC whose chunkDigest does not match the (intact) data never yields bytes."""
    data, _ = blob
    r = open_bytes(data)
    doc = json.loads(r.toc_json)
    for e in doc["entries"]:
        if e["name"].endswith("etc/hosts"):
            e["chunkDigest"] = "sha256:" + "1" * 64
    rb = open_bytes(_with_toc(data, r.footer.toc_offset, json.dumps(doc).encode()))
    with pytest.raises(ChunkDigestMismatch, match="TOC says sha256:1111"):
        rb.read("etc/hosts")


def test_legacy_footer_blob_reads(blob: tuple[bytes, str]) -> None:
    """A blob ending in the 47-byte legacy stargz footer opens and reads the same."""
    data, digest = blob
    r = open_bytes(data, digest)
    off = r.footer.toc_offset
    legacy = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + b"\x16\x00" + b"%016xSTARGZ" % off
              + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)
    old = open_bytes(data[:-FOOTER_SIZE] + legacy, digest)
    assert old.footer.size == 47 and old.footer.toc_offset == off
    assert old.read("usr/bin/tool") == r.read("usr/bin/tool")


def test_truncated_targz_input(tmp_path: Path, every_type_tar: Path) -> None:
    from lazyd.estargz import BuildError

    tgz = tmp_path / "in.tar.gz"
    tgz.write_bytes(gzip.compress(every_type_tar.read_bytes())[:-100])
    with pytest.raises(BuildError, match="input gzip stream is truncated"):
        build(tgz, tmp_path / "out.esgz")
    assert not (tmp_path / "out.esgz").exists()
