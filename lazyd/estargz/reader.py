"""Random access to an eStargz blob through a ``RangeSource``.

The same reader serves a local file (``file_source``), an HTTP range fetcher or a
cache: it only calls ``source(offset, length)``.  Every chunk is verified before
any of its bytes are returned.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lazyd.estargz.chunk import decode_chunk
from lazyd.estargz.errors import NotARegularFileError, TruncatedBlobError
from lazyd.estargz.footer import FOOTER_SIZE, Footer, read_footer
from lazyd.estargz.toc import TOC, Chunk, TOCEntry, decode_toc_member

RangeSource = Callable[[int, int], bytes]  # (offset, length) -> compressed bytes of the blob

_CACHE_BYTES = 16 << 20  # decoded chunks kept for sequential small reads


def _fetch(source: RangeSource, offset: int, length: int) -> bytes:
    data = source(offset, length)
    if len(data) != length:
        raise TruncatedBlobError(f"asked for {length} bytes at blob offset {offset}, got {len(data)}")
    return data


class Reader:
    """Reads files of one blob; open with ``Reader.open``.  Not thread-safe: use one per thread."""

    def __init__(self, source: RangeSource, blob_size: int, footer: Footer, toc: TOC, toc_json: bytes) -> None:
        self.source = source
        self.blob_size = blob_size
        self.footer = footer
        self.toc = toc
        self.toc_json = toc_json
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cached_bytes = 0

    @classmethod
    def open(cls, source: RangeSource, blob_size: int, toc_digest: str | None = None, *,
             tail_hint: int = 64 << 10) -> "Reader":
        """Read the footer and the TOC (checked against ``toc_digest`` when given).

        The last ``tail_hint`` bytes are fetched first; when the TOC lies inside them
        (small layers) no second request is made.
        """
        tail_len = min(blob_size, max(tail_hint, FOOTER_SIZE))
        tail_start = blob_size - tail_len
        tail = _fetch(source, tail_start, tail_len)
        footer = read_footer(tail, blob_size)
        end = blob_size - footer.size
        if footer.toc_offset >= tail_start:
            member = tail[footer.toc_offset - tail_start : end - tail_start]
        else:
            member = _fetch(source, footer.toc_offset, end - footer.toc_offset)
        toc_json = decode_toc_member(member)
        toc = TOC.parse(toc_json, expected_digest=toc_digest, toc_offset=footer.toc_offset)
        return cls(source, blob_size, footer, toc, toc_json)

    def lookup(self, name: str) -> TOCEntry | None:
        return self.toc.lookup(name)

    def read_chunk(self, chunk: Chunk, cache: bool = True) -> bytes:
        """The verified bytes of one chunk (kept in a small decoded-chunk cache when ``cache``)."""
        key = (chunk.blob_offset, chunk.inner_offset)
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            return data
        data = decode_chunk(chunk, _fetch(self.source, chunk.blob_offset, self._end(chunk) - chunk.blob_offset))
        if cache:
            self._remember(key, data)
        return data

    def _remember(self, key: tuple[int, int], data: bytes) -> None:
        if len(data) > _CACHE_BYTES // 2:
            return
        self._cache[key] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > _CACHE_BYTES:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)

    def read(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes ``[offset, offset+size)`` of regular file ``name`` (clipped to its end).

        Chunks not in the cache are fetched with one source call per run of adjacent
        members, then each is verified before any byte is used.
        """
        entry = self.toc.lookup(name)
        if entry is None or entry.type != "reg":
            what = "missing" if entry is None else f"a {entry.type}"
            raise NotARegularFileError(f"{name!r} is {what}, not a regular file")
        if offset < 0 or (size is not None and size < 0):
            raise ValueError(f"negative offset or size ({offset}, {size})")
        stop = entry.size if size is None else min(entry.size, offset + size)
        wanted = [c for c in entry.chunks if c.file_offset < stop and c.file_offset + c.size > offset]
        self._prefetch([c for c in wanted if (c.blob_offset, c.inner_offset) not in self._cache])
        parts = []
        for chunk in wanted:
            data = self.read_chunk(chunk)
            lo = max(offset, chunk.file_offset) - chunk.file_offset
            parts.append(data[lo : min(stop, chunk.file_offset + chunk.size) - chunk.file_offset])
        return b"".join(parts)

    def _prefetch(self, chunks: list[Chunk]) -> None:
        """Fetch runs of adjacent chunk members in one source call each and cache them verified."""
        i = 0
        while i < len(chunks):
            j, decoded = i + 1, chunks[i].size
            while (j < len(chunks) and chunks[j].blob_offset == self._end(chunks[j - 1])
                   and decoded + chunks[j].size <= _CACHE_BYTES // 2):
                decoded += chunks[j].size
                j += 1
            if j - i > 1:
                start = chunks[i].blob_offset
                data = _fetch(self.source, start, self._end(chunks[j - 1]) - start)
                for c in chunks[i:j]:
                    piece = memoryview(data)[c.blob_offset - start : self._end(c) - start]
                    self._remember((c.blob_offset, c.inner_offset), decode_chunk(c, piece))
            i = j

    def _end(self, chunk: Chunk) -> int:
        return chunk.blob_end if chunk.blob_end is not None else self.footer.toc_offset

    def iter_file(self, name: str) -> Iterator[bytes]:
        """A file's verified bytes, chunk by chunk (without caching them)."""
        entry = self.toc.lookup(name)
        if entry is None or entry.type != "reg":
            what = "missing" if entry is None else f"a {entry.type}"
            raise NotARegularFileError(f"{name!r} is {what}, not a regular file")
        for chunk in entry.chunks:
            yield self.read_chunk(chunk, cache=False)


def file_source(fileobj: "os.PathLike[str] | str | int") -> tuple[RangeSource, Callable[[], None], int]:
    """A RangeSource over a local file: (source, close, size)."""
    fd = os.open(fileobj, os.O_RDONLY) if not isinstance(fileobj, int) else fileobj
    size = os.fstat(fd).st_size

    def source(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return source, lambda: os.close(fd), size


@contextmanager
def open_file(path: "os.PathLike[str] | str", toc_digest: str | None = None) -> Iterator[Reader]:
    """A Reader over a local blob file, closed on exit."""
    source, close, size = file_source(path)
    try:
        yield Reader.open(source, size, toc_digest)
    finally:
        close()
