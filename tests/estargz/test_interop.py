"""Interop with the reference tools (stargz-snapshotter 0.12): both directions."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyd.estargz import BuildOptions, build, open_file
from tests.estargz.trees import check_blob_against_tar, reference_build, reference_verify

pytestmark = pytest.mark.usefixtures("reference_tools")

LANDMARKS = frozenset({".prefetch.landmark", ".no.prefetch.landmark"})


@pytest.mark.parametrize("tree", ["python_tar", "every_type_tar"])
@pytest.mark.parametrize("args", [
    pytest.param(("-mode", "build"), id="build"),
    pytest.param(("-mode", "writer"), id="writer"),
    pytest.param(("-mode", "build", "-chunk-size", "1000"), id="build-chunk1000"),
    pytest.param(("-mode", "writer", "-chunk-size", "1000"), id="writer-chunk1000"),
    pytest.param(("-mode", "build", "-procs", "2", "-level", "1"), id="build-procs2"),
])
def test_reference_blob_reads_back(request: pytest.FixtureRequest, tmp_path: Path, tree: str,
                                   args: tuple[str, ...]) -> None:
    src: Path = request.getfixturevalue(tree)
    blob = tmp_path / "ref.esgz"
    info = reference_build(src, blob, *args)
    n = check_blob_against_tar(blob, src, str(info["tocDigest"]))
    assert n > 10
    with open_file(blob) as r:
        assert r.toc.digest == info["tocDigest"]
        if "-chunk-size" in args:
            assert any(c.file_offset > 0 for c in r.toc.chunks), "expected multi-chunk files"
        if "build" in args:
            assert r.toc.no_prefetch and r.toc.prefetch_end is None


def test_reference_prioritized_blob(tmp_path: Path, every_type_tar: Path) -> None:
    prio = tmp_path / "prio.txt"
    prio.write_text("etc/hosts.link\nusr/bin/tool\n")
    blob = tmp_path / "ref.esgz"
    info = reference_build(every_type_tar, blob, "-prioritized", str(prio), "-chunk-size", "4096")
    check_blob_against_tar(blob, every_type_tar, str(info["tocDigest"]))
    with open_file(blob) as r:
        assert r.toc.prefetch_end is not None
        tool = r.lookup("usr/bin/tool")
        hosts = r.lookup("etc/hosts")
        assert tool is not None and hosts is not None
        assert tool.chunks[-1].blob_offset < r.toc.prefetch_end
        assert hosts.chunks[0].blob_offset < tool.chunks[0].blob_offset
        outside = r.lookup("etc/secret")
        assert outside is not None and outside.chunks[0].blob_offset > r.toc.prefetch_end


@pytest.mark.parametrize("tree", ["python_tar", "every_type_tar"])
@pytest.mark.parametrize("chunk_size", [4 << 20, 1000])
def test_our_blob_passes_reference_verify(request: pytest.FixtureRequest, tmp_path: Path, tree: str,
                                          chunk_size: int) -> None:
    src: Path = request.getfixturevalue(tree)
    blob = tmp_path / "ours.esgz"
    result = build(src, blob, BuildOptions(chunk_size=chunk_size))
    proc = reference_verify(blob, result.toc_digest)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT: OK" in proc.stderr
    check_blob_against_tar(blob, src, result.toc_digest)


def test_our_prioritized_blob_passes_reference_verify(tmp_path: Path, python_tar: Path) -> None:
    blob = tmp_path / "ours.esgz"
    prio = ["usr/lib/python3/json/decoder.py", "/usr/lib/python3/email/parser.py"]
    result = build(python_tar, blob, BuildOptions(prioritized=prio))
    proc = reference_verify(blob, result.toc_digest)
    assert proc.returncode == 0, proc.stderr
    with open_file(blob) as r:
        assert r.toc.prefetch_end is not None
        for name in prio:
            e = r.lookup(name)
            assert e is not None and e.chunks[-1].blob_end <= r.toc.prefetch_end


def test_reference_extracts_our_files(tmp_path: Path, every_type_tar: Path) -> None:
    """The reference reader returns the same bytes for a file our writer split into many chunks."""
    import subprocess

    from tests.estargz.trees import ESTARGZ_VERIFY

    blob = tmp_path / "ours.esgz"
    build(every_type_tar, blob, BuildOptions(chunk_size=1000))
    out = subprocess.run([str(ESTARGZ_VERIFY), "-extract", "usr/bin/tool", str(blob)], capture_output=True, check=True)
    with open_file(blob) as r:
        assert out.stdout == r.read("usr/bin/tool")
        assert len(out.stdout) == 20_000


def test_same_layout_as_reference(tmp_path: Path, every_type_tar: Path, python_tar: Path) -> None:
    """Same entry order and the same payload chunks (file, offset, size) as estargz.Build -procs 1."""
    for src in (every_type_tar, python_tar):
        ref, ours = tmp_path / "ref.esgz", tmp_path / "ours.esgz"
        reference_build(src, ref, "-chunk-size", "3000")
        build(src, ours, BuildOptions(chunk_size=3000))
        with open_file(ref) as a, open_file(ours) as b:
            assert [(e.name, e.type) for e in a.toc.entries] == [(e.name, e.type) for e in b.toc.entries]
            assert [(c.name, c.file_offset, c.size, c.digest) for c in a.toc.chunks] == \
                [(c.name, c.file_offset, c.size, c.digest) for c in b.toc.chunks]
            assert {e.name: e.digest for e in a.toc.entries if e.type == "reg"} == \
                {e.name: e.digest for e in b.toc.entries if e.type == "reg"}


def test_default_chunk_size_big_file_both_ways(tmp_path: Path) -> None:
    """A 9 MiB file is split into 4 MiB chunks the same way by both writers, and each reads the other's."""
    import random

    from tests.estargz.trees import Spec, write_tar

    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randint(2, 9))) for _ in range(500)]
    big = b" ".join(rng.choices(words, k=1_800_000))[: 9 << 20]
    src = write_tar(tmp_path / "big.tar", [Spec("data/", "dir", mode=0o755), Spec("data/big.txt", data=big),
                                          Spec("data/after", data=b"after")])
    ours, ref = tmp_path / "ours.esgz", tmp_path / "ref.esgz"
    result = build(src, ours, BuildOptions(level=6))
    info = reference_build(src, ref, "-level", "6")
    assert reference_verify(ours, result.toc_digest).returncode == 0
    for blob, digest in ((ours, result.toc_digest), (ref, str(info["tocDigest"]))):
        check_blob_against_tar(blob, src, digest)
        with open_file(blob) as r:
            assert [(c.file_offset, c.size) for c in r.lookup("data/big.txt").chunks] == [
                (0, 4 << 20), (4 << 20, 4 << 20), (8 << 20, 1 << 20)]
    assert abs(result.blob_size - ref.stat().st_size) < 0.03 * ref.stat().st_size
