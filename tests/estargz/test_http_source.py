"""The Reader over HTTP range requests to a real registry (distribution 2.8)."""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyd.estargz import BuildOptions, Reader, build, open_file
from tests.support.registry import Registry, start_registry


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = start_registry(tmp_path)
    try:
        yield reg
    finally:
        reg.stop()


def push_blob(reg: Registry, repo: str, data: bytes, digest: str) -> str:
    req = urllib.request.Request(f"{reg.url}/v2/{repo}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(req) as resp:
        location = urllib.parse.urljoin(reg.url, resp.headers["Location"])
    sep = "&" if "?" in location else "?"
    req = urllib.request.Request(f"{location}{sep}digest={digest}", data=data, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 201
    return f"{reg.url}/v2/{repo}/blobs/{digest}"


def test_reader_over_http_ranges(tmp_path: Path, registry: Registry, python_tar: Path) -> None:
    blob = tmp_path / "layer.esgz"
    result = build(python_tar, blob, BuildOptions(chunk_size=64 << 10, level=6))
    url = push_blob(registry, "test/layer", blob.read_bytes(), result.blob_digest)
    fetched: list[int] = []

    def source(offset: int, length: int) -> bytes:
        req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 206
            data = resp.read()
        fetched.append(len(data))
        return data

    remote = Reader.open(source, result.blob_size, result.toc_digest)
    name = "usr/lib/python3/json/decoder.py"
    with open_file(blob) as local:
        assert remote.read(name) == local.read(name)
        assert remote.read(name, 100, 50) == local.read(name, 100, 50)
        big = max((e for e in local.toc.entries if e.type == "reg"), key=lambda e: e.size)
        assert remote.read(big.name, big.size - 70_000, 70_000) == local.read(big.name, big.size - 70_000, 70_000)
    # one request for the tail (footer + TOC), one per file read (adjacent chunks coalesced)
    assert len(fetched) == 3
    assert sum(fetched[1:]) < result.blob_size / 3, "a few files should need only a small part of the blob"
