"""The footer: an empty gzip member whose extra field records the TOC offset.

eStargz (51 bytes): extra field = subfield ``SG``, length 22, ``"%016x" % toc_offset + "STARGZ"``.
Legacy stargz (47 bytes): extra field = the 22 bytes alone.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from lazyd.estargz.errors import FooterError

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47

_MAGIC = b"STARGZ"
# gzip header with FEXTRA, mtime 0, XFL 0, OS 255 (what Go's compress/gzip writes).
_HEAD = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
# An empty final stored deflate block, then CRC32 0 and ISIZE 0.
_EMPTY_BODY = b"\x01\x00\x00\xff\xff" + b"\x00" * 8


@dataclass(frozen=True, slots=True)
class Footer:
    toc_offset: int
    size: int  # FOOTER_SIZE or LEGACY_FOOTER_SIZE


def footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at ``toc_offset``; ValueError unless 0 <= toc_offset < 2**64
    (the footer holds exactly 16 hex digits)."""
    if not 0 <= toc_offset < 1 << 64:
        raise ValueError(f"TOC offset {toc_offset} does not fit the footer's 16 hex digits")
    sub = b"%016x" % toc_offset + _MAGIC
    return _HEAD + struct.pack("<H", 4 + len(sub)) + b"SG" + struct.pack("<H", len(sub)) + sub + _EMPTY_BODY


def _check_empty_member(raw: bytes, kind: str) -> None:
    d = zlib.decompressobj(31)
    try:
        out = d.decompress(raw)
    except zlib.error as exc:
        raise FooterError(f"{kind} footer is not a valid gzip member: {exc}") from None
    if out or not d.eof or d.unused_data:
        raise FooterError(f"{kind} footer is not an empty gzip member")


def _offset(hexpart: bytes, kind: str) -> int:
    try:
        text = hexpart.decode("ascii")
        if len(text) != 16 or not all(c in "0123456789abcdefABCDEF" for c in text):
            raise ValueError
        return int(text, 16)
    except ValueError:
        raise FooterError(f"{kind} footer: TOC offset {hexpart!r} is not 16 hex digits") from None


def _check_gzip_extra(f: bytes, want_xlen: int) -> None:
    """FooterError unless ``f`` starts a gzip header whose extra field is ``want_xlen`` bytes long."""
    if f[:4] != b"\x1f\x8b\x08\x04":
        raise FooterError("not a gzip header with an extra field")
    xlen = struct.unpack_from("<H", f, 10)[0]
    if xlen != want_xlen:
        raise FooterError(f"extra field length {xlen}, want {want_xlen}")


def _parse_estargz(f: bytes) -> int:
    _check_gzip_extra(f, 26)
    if f[12:14] != b"SG":
        raise FooterError(f"extra subfield id {f[12:14]!r}, want b'SG'")
    slen = struct.unpack_from("<H", f, 14)[0]
    if slen != 22:
        raise FooterError(f"SG subfield length {slen}, want 22")
    if f[32:38] != _MAGIC:
        raise FooterError("SG subfield lacks the STARGZ magic")
    off = _offset(f[16:32], "eStargz")
    _check_empty_member(f, "eStargz")
    return off


def _parse_legacy(f: bytes) -> int:
    _check_gzip_extra(f, 22)
    if f[28:34] != _MAGIC:
        raise FooterError("extra field lacks the STARGZ magic")
    off = _offset(f[12:28], "legacy stargz")
    _check_empty_member(f, "legacy stargz")
    return off


def read_footer(tail: bytes, blob_size: int) -> Footer:
    """Parse the footer from ``tail`` (the last >= 47 bytes of a blob of ``blob_size`` bytes).

    Tries the 51-byte eStargz footer, then the 47-byte legacy one; raises FooterError
    naming why neither fits.  The TOC offset must lie before the footer.
    """
    tail = bytes(tail)
    if blob_size < LEGACY_FOOTER_SIZE or len(tail) < LEGACY_FOOTER_SIZE:
        raise FooterError(f"blob of {blob_size} bytes (tail {len(tail)}) is too small for a footer")
    if len(tail) > blob_size:
        raise FooterError(f"tail of {len(tail)} bytes is longer than the blob ({blob_size})")
    errors = []
    for size, parse, kind in ((FOOTER_SIZE, _parse_estargz, "eStargz"), (LEGACY_FOOTER_SIZE, _parse_legacy, "legacy")):
        if len(tail) < size or blob_size < size:
            errors.append(f"{kind}: blob too small")
            continue
        try:
            off = parse(tail[-size:])
        except FooterError as exc:
            errors.append(f"{kind}: {exc}")
            continue
        if off >= blob_size - size:
            raise FooterError(f"{kind} footer: TOC offset {off} is not before the footer at {blob_size - size}")
        return Footer(off, size)
    raise FooterError("no eStargz footer: " + "; ".join(errors))


def parse_footer(tail: bytes, blob_size: int) -> int:
    """The TOC offset recorded in the footer at the end of ``tail`` (51- or 47-byte footer)."""
    return read_footer(tail, blob_size).toc_offset
