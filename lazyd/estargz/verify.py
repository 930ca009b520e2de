"""Verify a whole blob: every chunk against its chunkDigest and every file against its digest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from lazyd.estargz.errors import ChunkDigestMismatch
from lazyd.estargz.reader import Reader


@dataclass(frozen=True)
class VerifyReport:
    chunks: int
    files: int
    bytes: int


def verify_blob(reader: Reader, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Decode and check every chunk (blob order), and each file's whole-payload digest.

    Raises ChunkDigestMismatch or TruncatedBlobError on the first bad chunk or file;
    ``progress`` is called with the compressed bytes of each verified chunk.
    """
    chunks = files = total = 0
    for entry in reader.toc.entries:
        if entry.type != "reg" or not entry.chunks:
            continue
        hasher = hashlib.sha256()
        for chunk in entry.chunks:
            data = reader.read_chunk(chunk, cache=False)
            hasher.update(data)
            total += len(data)
            chunks += 1
            if progress is not None:
                end = chunk.blob_end if chunk.blob_end is not None else reader.footer.toc_offset
                progress(end - chunk.blob_offset)
        files += 1
        actual = "sha256:" + hasher.hexdigest()
        if entry.digest and actual != entry.digest:
            raise ChunkDigestMismatch(f"file {entry.name!r}: digest {actual}, TOC says {entry.digest}")
    return VerifyReport(chunks, files, total)
