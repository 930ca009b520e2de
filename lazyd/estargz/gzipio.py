"""Deflate backends: one gzip member per call, decompressed one member at a time.

Compression uses zlib-ng (``zlib_ng``) when installed: at level 9 it is about 2.5x
faster than stdlib zlib with output as small (bench/bench_convert.py shows it);
stdlib zlib is the fallback.  Decompression uses ISA-L (``isal``) when installed,
else zlib.  All three release the GIL, so threads compress in parallel.
"""

from __future__ import annotations

import zlib
from types import ModuleType

try:
    from zlib_ng import zlib_ng as _compressor_mod
except ImportError:  # pragma: no cover - depends on the environment
    _compressor_mod = zlib
try:
    from isal import isal_zlib as _decompressor_mod
except ImportError:  # pragma: no cover - depends on the environment
    _decompressor_mod = zlib

GZIP_WBITS = 31
COMPRESSOR: ModuleType = _compressor_mod
DECOMPRESSOR: ModuleType = _decompressor_mod
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = tuple({zlib.error, _decompressor_mod.error})


def compress_member(parts: list[bytes | memoryview], level: int) -> bytes:
    """Compress ``parts`` (concatenated) into one complete gzip member."""
    c = COMPRESSOR.compressobj(level, COMPRESSOR.DEFLATED, GZIP_WBITS)
    out = [c.compress(p) for p in parts]
    out.append(c.flush())
    return b"".join(out)


def decompress_member(data: bytes | memoryview, limit: int | None = None) -> tuple[bytes, bool, int]:
    """Decompress the first gzip member in ``data``.

    Returns (bytes, ended, consumed): ``ended`` tells whether the member's trailer was
    reached (CRC checked), ``consumed`` how many input bytes the member used (only
    meaningful when ended).  With ``limit``, at most that many bytes are produced.
    """
    d = DECOMPRESSOR.decompressobj(GZIP_WBITS)
    if limit is None:
        out = d.decompress(data)
    else:
        out = d.decompress(data, limit) if limit > 0 else b""
    consumed = len(data) - len(d.unused_data) if d.eof else len(data)
    return out, bool(d.eof), consumed


class MemberReader:
    """The first gzip member of ``data``, inflated incrementally: ``read(n)`` inflates at most
    ``n`` bytes, feeding the input ``IN_STEP`` bytes at a time, so neither a large member nor
    one that inflates enormously (a "gzip bomb") costs more memory than the caller asks for."""

    IN_STEP = 64 * 1024

    def __init__(self, data: bytes | memoryview) -> None:
        self._d = DECOMPRESSOR.decompressobj(GZIP_WBITS)
        self._view = memoryview(data)
        self._pos = 0
        self._pending: bytes | memoryview = b""

    @property
    def eof(self) -> bool:
        """The member's trailer was reached (its CRC and length checked)."""
        return bool(self._d.eof)

    def read(self, n: int) -> bytes:
        """Up to ``n`` inflated bytes; fewer only at the member's end or the end of the input.

        Raises the backend's error (see DECOMPRESS_ERRORS) for invalid data."""
        parts: list[bytes] = []
        got = 0
        d = self._d
        while got < n and not d.eof:
            if not self._pending:
                if self._pos >= len(self._view):
                    break
                self._pending = self._view[self._pos : self._pos + self.IN_STEP]
                self._pos += len(self._pending)
            out = d.decompress(self._pending, n - got)
            self._pending = d.unconsumed_tail
            if out:
                parts.append(out)
                got += len(out)
        if d.eof:
            self._pending = b""
        return parts[0] if len(parts) == 1 else b"".join(parts)


def decompress_prefix_checked(data: bytes | memoryview, want: int, max_rest: int = 1 << 28) -> tuple[bytes, bool]:
    """The first ``want`` decompressed bytes of the first gzip member in ``data``, after
    decompressing (and discarding) the rest of that member so its CRC is checked.

    Returns (bytes, ended); ``ended`` is False when the input stops inside the member.
    At most ``max_rest`` further bytes are inflated; a longer member counts as ended.
    """
    d = DECOMPRESSOR.decompressobj(GZIP_WBITS)
    out = d.decompress(data, want) if want > 0 else b""
    rest = d.unconsumed_tail if want > 0 else data
    budget = max_rest
    while not d.eof and rest and budget > 0:
        budget -= len(d.decompress(rest, 1 << 20))
        rest = d.unconsumed_tail
    return out, bool(d.eof) or budget <= 0
