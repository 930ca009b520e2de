"""Reader behaviour: range coalescing, caching, clipping, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyd.estargz import BuildOptions, NotARegularFileError, Reader, build


def test_reads_coalesce_and_cache(tmp_path: Path, every_type_tar: Path) -> None:
    blob = tmp_path / "out.esgz"
    build(every_type_tar, blob, BuildOptions(chunk_size=3000))
    data = blob.read_bytes()
    calls: list[tuple[int, int]] = []

    def source(off: int, n: int) -> bytes:
        calls.append((off, n))
        return data[off : off + n]

    r = Reader.open(source, len(data))
    calls.clear()
    tool = r.lookup("usr/bin/tool")
    assert tool is not None and len(tool.chunks) == 7
    whole = r.read("usr/bin/tool")
    assert whole == (bytes(range(256)) * 79)[:20_000]
    # chunks 0..5 are adjacent members; the last one's member also holds later headers
    assert len(calls) == 1 and calls[0][0] == tool.chunks[0].blob_offset
    calls.clear()
    assert r.read("usr/bin/tool", 2999, 2) == whole[2999:3001]
    assert calls == []  # served from the decoded-chunk cache
    assert r.read("usr/bin/tool", 19_990, 100) == whole[19_990:]
    assert r.read("usr/bin/tool", 50_000, 10) == b""
    assert r.read("etc/empty") == b""
    assert b"".join(r.iter_file("etc/hosts.link")) == b"127.0.0.1 localhost\n"
    with pytest.raises(NotARegularFileError, match="'etc' is a dir, not a regular file"):
        r.read("etc")
    with pytest.raises(NotARegularFileError, match="'nope' is missing"):
        r.read("nope")
    with pytest.raises(ValueError):
        r.read("etc/hosts", -1, 5)
