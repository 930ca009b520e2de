"""Exceptions of the eStargz format layer; every one names what was wrong."""

from __future__ import annotations


class EStargzError(Exception):
    """Base class of every eStargz format error."""


class FooterError(EStargzError):
    """The blob does not end with a valid eStargz (51-byte) or legacy stargz (47-byte) footer."""


class TOCError(EStargzError):
    """The TOC member, its tar wrapper, its JSON or one of its entries is malformed."""


class TOCDigestMismatch(EStargzError):
    """The sha256 of the TOC JSON is not the digest the caller expected."""


class ChunkDigestMismatch(EStargzError):
    """A chunk's decompressed bytes do not match its chunkDigest (or do not decompress at all)."""


class TruncatedBlobError(EStargzError):
    """Fewer bytes were available than the blob layout requires."""


class UnsafePathError(TOCError):
    """An entry name (or hardlink target) cannot name a file: it holds a NUL byte.  (Absolute
    names and '..' are not errors: they are cleaned as the reference cleans them.)"""


class NotARegularFileError(EStargzError):
    """A read asked for a name that is missing or not a regular file."""


class BuildError(EStargzError):
    """The writer cannot convert its input (not a tar, unsupported entry, missing prioritized file)."""
