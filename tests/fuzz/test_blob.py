"""Fuzz whole blobs through Reader.open and Reader.read: the footer, TOC member, TOC and every
payload chunk of a real (writer-made) layer, with damaged bytes or a hand-written TOC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from lazyd.estargz import EStargzError, Reader
from tests.fuzz.blobs import build_blob, toc_of, with_toc, write_tar
from tests.fuzz.conftest import FUZZ, CaseCounter, guarded
from tests.fuzz.strategies import mutated
from tests.fuzz.toc_docs import _FIELDS

DEFLATE_RATIO = 1032


@pytest.fixture(scope="session")
def base_blob(fuzz_tmp: Path) -> bytes:
    tar = write_tar(fuzz_tmp / "small.tar", {"a/one": b"1" * 2500, "a/two": bytes(range(256)) * 9, "empty": b"",
                                              "b/three": b"three\n"},
                    symlinks={"a/sym": "../b/three"}, hardlinks={"hard": "a/one"})
    return build_blob(tar, fuzz_tmp / "small.esgz", chunk_size=1000)


def read_everything(blob: bytes) -> int:
    """Open ``blob`` and read every regular file in full; the bytes read."""
    r = Reader.open(lambda off, n: blob[off : off + n], len(blob), tail_hint=512)
    total = 0
    for name in r.toc.names():
        entry = r.lookup(name)
        if entry is not None and entry.type == "reg":
            total += len(r.read(name))
    return total


def check_blob(blob: bytes) -> None:
    out = guarded(lambda: read_everything(blob), (EStargzError,),
                  max_bytes=2 * 1024 * 1024 + 4 * DEFLATE_RATIO * len(blob))
    event(f"blob: {type(out.error).__name__ if out.error else 'read'}")


def test_base_blob_reads(base_blob: bytes) -> None:
    r = Reader.open(lambda off, n: base_blob[off : off + n], len(base_blob))
    assert r.read("a/one") == r.read("hard") == b"1" * 2500 and r.read("b/three") == b"three\n"
    assert len(r.toc.chunks) >= 8  # 1000-byte chunks: the fuzzed TOC has several members to point into
    # every file above, the hardlink again, and the writer's 1-byte .no.prefetch.landmark
    assert read_everything(base_blob) == 2500 + 2304 + 6 + 2500 + 1


@FUZZ
@given(data=st.data())
def test_blob_mutated_bytes(cases: CaseCounter, base_blob: bytes, data: st.DataObject) -> None:
    cases.hit()
    check_blob(data.draw(mutated(base_blob, max_edits=3)))


@FUZZ
@given(data=st.data())
def test_blob_hostile_toc_fields(cases: CaseCounter, base_blob: bytes, data: st.DataObject) -> None:
    """The real payload with a TOC whose entries have fields replaced by hostile values: offsets
    into the middle of members, huge sizes and inner offsets, wrong digests, renamed files."""
    cases.hit()
    _, doc = toc_of(base_blob)
    for _ in range(data.draw(st.integers(1, 4))):
        entry = data.draw(st.sampled_from(doc["entries"]))
        key = data.draw(st.sampled_from(sorted(_FIELDS)))
        entry[key] = data.draw(st.one_of(_FIELDS[key], st.integers(0, len(base_blob))))
    check_blob(with_toc(base_blob, json.dumps(doc).encode()))
