"""Decode one chunk: decompress its gzip member and verify the chunkDigest before returning bytes."""

from __future__ import annotations

import hashlib

from lazyd.estargz.errors import ChunkDigestMismatch, TruncatedBlobError
from lazyd.estargz.gzipio import DECOMPRESS_ERRORS, decompress_prefix_checked
from lazyd.estargz.toc import Chunk


def decode_chunk(chunk: Chunk, compressed: bytes | memoryview) -> bytes:
    """The chunk's bytes from ``compressed`` = ``blob[chunk.blob_offset:chunk.blob_end]``.

    Only the first gzip member is decoded (bytes after it are ignored), to its end,
    so its CRC is checked too.  Raises
    TruncatedBlobError when the member ends too early or the data runs out, and
    ChunkDigestMismatch when it does not decompress or its sha256 differs from
    ``chunk.digest``; no byte is returned unless verified.
    """
    if chunk.blob_end is not None and len(compressed) < chunk.blob_end - chunk.blob_offset:
        raise TruncatedBlobError(
            f"chunk of {chunk.name!r} at blob offset {chunk.blob_offset}: got {len(compressed)} compressed bytes, "
            f"need {chunk.blob_end - chunk.blob_offset}")
    want = chunk.inner_offset + chunk.size
    try:
        out, ended = decompress_prefix_checked(compressed, want)
    except DECOMPRESS_ERRORS as exc:
        raise ChunkDigestMismatch(
            f"chunk of {chunk.name!r} at blob offset {chunk.blob_offset} does not decompress: {exc}") from None
    if not ended:
        raise TruncatedBlobError(
            f"chunk of {chunk.name!r} at blob offset {chunk.blob_offset}: compressed data ends inside its "
            f"gzip member ({len(compressed)} bytes given)")
    if len(out) < want:
        raise ChunkDigestMismatch(
            f"chunk of {chunk.name!r} at blob offset {chunk.blob_offset}: member holds {len(out)} bytes, "
            f"need {want}")
    data = out[chunk.inner_offset:] if chunk.inner_offset else out
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != chunk.digest:
        raise ChunkDigestMismatch(
            f"chunk of {chunk.name!r} [{chunk.file_offset}, +{chunk.size}) at blob offset {chunk.blob_offset}: "
            f"digest {actual}, TOC says {chunk.digest}")
    return data
