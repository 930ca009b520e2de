"""The writer: layout, inputs, prioritized files, results."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
import threading
import zlib
from pathlib import Path

import pytest

from lazyd.estargz import BuildError, BuildOptions, UnsafePathError, build, open_file
from tests.estargz.trees import Spec, check_blob_against_tar, write_tar


def members(blob: bytes) -> list[int]:
    """Start offsets of every gzip member in the blob."""
    starts, pos = [], 0
    while pos < len(blob):
        starts.append(pos)
        d = zlib.decompressobj(31)
        d.decompress(blob[pos:])
        assert d.eof
        pos = len(blob) - len(d.unused_data)
    return starts


def test_layout_member_per_chunk_then_toc_and_footer(tmp_path: Path, every_type_tar: Path) -> None:
    blob_path = tmp_path / "out.esgz"
    result = build(every_type_tar, blob_path, BuildOptions(chunk_size=3000))
    blob = blob_path.read_bytes()
    starts = members(blob)
    with open_file(blob_path) as r:
        chunk_starts = [c.blob_offset for c in r.toc.chunks]
        # member 0 (headers), one member per payload chunk, the TOC member, the footer
        assert starts == [0, *chunk_starts, r.footer.toc_offset, len(blob) - 51]
        for c in r.toc.chunks:
            plain = zlib.decompressobj(31).decompress(blob[c.blob_offset : c.blob_end])
            assert plain[: c.size] == r.read(c.name, c.file_offset, c.size)
        # the tar header of each file is in the member before its payload
        tool = r.lookup("usr/bin/tool")
        assert tool is not None and len(tool.chunks) == 7
        prev = max(s for s in starts if s < tool.chunks[0].blob_offset)
        before = zlib.decompressobj(31).decompress(blob[prev : tool.chunks[0].blob_offset])
        assert b"usr/bin/tool" in before[-1536:]
    assert result.blob_size == len(blob)
    assert result.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    plain = gzip.decompress(blob)
    assert result.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert result.uncompressed_size == len(plain)


def test_output_is_plain_targz(tmp_path: Path, every_type_tar: Path) -> None:
    blob = tmp_path / "out.esgz"
    build(every_type_tar, blob, BuildOptions(chunk_size=5000))
    listing = subprocess.run(f"gzip -dc {blob} | tar tf -", shell=True, capture_output=True, text=True, check=True)
    names = listing.stdout.splitlines()
    with tarfile.open(every_type_tar) as tf:
        want = [m.name for m in tf.getmembers()]
    assert names[0] == ".no.prefetch.landmark" and names[-1] == "stargz.index.json"
    assert [n.rstrip("/") for n in names[1:-1]] == [n.rstrip("/") for n in want]


def test_same_bytes_for_any_worker_count(tmp_path: Path, python_tar: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ra = build(python_tar, a, BuildOptions(workers=1, level=6))
    rb = build(python_tar, b, BuildOptions(workers=3, level=6))
    assert ra == rb and a.read_bytes() == b.read_bytes()


def test_targz_and_stream_inputs(tmp_path: Path, every_type_tar: Path) -> None:
    tgz = tmp_path / "in.tar.gz"
    raw = every_type_tar.read_bytes()
    tgz.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))  # multi-member gzip
    want = build(every_type_tar, tmp_path / "plain.esgz")
    assert build(tgz, tmp_path / "gz.esgz") == want
    # non-seekable streams (a pipe), plain and gzip-compressed
    for payload in (raw, tgz.read_bytes()):
        rfd, wfd = os.pipe()
        writer = threading.Thread(target=lambda p=payload: (os.write(wfd, p) if len(p) < 60000 else
                                                           _write_all(wfd, p), os.close(wfd)))
        writer.start()
        with os.fdopen(rfd, "rb") as stream:
            assert build(stream, tmp_path / "pipe.esgz") == want
        writer.join()
    out = io.BytesIO()
    assert build(every_type_tar, out) == want
    assert out.getvalue() == (tmp_path / "plain.esgz").read_bytes()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def test_prioritized_order_and_landmark(tmp_path: Path, every_type_tar: Path) -> None:
    blob = tmp_path / "out.esgz"
    build(every_type_tar, blob, BuildOptions(prioritized=["/usr/bin/tool", "./etc/hosts.link"]))
    with open_file(blob) as r:
        names = [e.name for e in r.toc.entries if e.type != "chunk"]
        # parents that exist come first, the hardlink target before the link, then the landmark
        assert names[:8] == ["", "usr", "usr/bin", "usr/bin/tool", "etc", "etc/hosts", "etc/hosts.link",
                             ".prefetch.landmark"]
        assert r.toc.prefetch_end == r.lookup(".prefetch.landmark").chunks[0].blob_offset
        assert r.lookup("usr/bin/tool").chunks[-1].blob_end <= r.toc.prefetch_end
    check_blob_against_tar(blob, every_type_tar)


@pytest.mark.usefixtures("reference_tools")
def test_prioritized_without_parent_entries(tmp_path: Path) -> None:
    """An upper layer that leaves out unchanged parents: still prioritized, no parents invented."""
    src = write_tar(tmp_path / "upper.tar", [
        Spec("usr/lib/libfoo.so", data=b"foo" * 100),
        Spec("usr/bin/app", data=b"app" * 100, mode=0o755),
        Spec("etc/app.conf", data=b"conf"),
    ])
    blob = tmp_path / "out.esgz"
    build(src, blob, BuildOptions(prioritized=["usr/bin/app", "etc/app.conf"]))
    with open_file(blob) as r:
        names = [e.name for e in r.toc.entries]
        assert names == ["usr/bin/app", "etc/app.conf", ".prefetch.landmark", "usr/lib/libfoo.so"]
        assert r.lookup("usr").implied
        assert r.read("usr/bin/app") == b"app" * 100
    # the reference cannot do this (it fails with `file: "usr": not found`), but it can read ours
    from tests.estargz.trees import ESTARGZ_BUILD, reference_verify

    prio = tmp_path / "prio.txt"
    prio.write_text("usr/bin/app\n")
    ref = subprocess.run([str(ESTARGZ_BUILD), "-prioritized", str(prio), "-o", str(tmp_path / "ref"), str(src)],
                         capture_output=True, text=True)
    assert ref.returncode != 0 and '"usr/bin": not found' in ref.stderr
    assert reference_verify(blob).returncode == 0


def test_missing_prioritized(tmp_path: Path, every_type_tar: Path) -> None:
    with pytest.raises(BuildError, match="prioritized file 'no/such/file' is not in the layer"):
        build(every_type_tar, tmp_path / "x", BuildOptions(prioritized=["no/such/file"]))
    assert not (tmp_path / "x").exists()
    result = build(every_type_tar, tmp_path / "y", BuildOptions(prioritized=["no/such/file", "etc/hosts"],
                                                                 allow_missing=True))
    assert result.missing_prioritized == ("no/such/file",)


def test_duplicates_previous_toc_and_empty(tmp_path: Path, every_type_tar: Path) -> None:
    src = write_tar(tmp_path / "dup.tar", [Spec("a", data=b"old"), Spec("b", data=b"b"), Spec("a", data=b"new")])
    blob = tmp_path / "dup.esgz"
    build(src, blob)
    with open_file(blob) as r:
        assert [e.name for e in r.toc.entries] == [".no.prefetch.landmark", "b", "a"]
        assert r.read("a") == b"new"
    # converting an eStargz blob again drops its TOC and landmark
    first = tmp_path / "first.esgz"
    build(every_type_tar, first)
    again = tmp_path / "again.esgz"
    build(first, again)
    with open_file(again) as r:
        assert sum(e.name == ".no.prefetch.landmark" for e in r.toc.entries) == 1
        assert r.lookup("stargz.index.json") is None
    check_blob_against_tar(again, every_type_tar)
    # an empty tar still makes a valid blob
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    build(empty, tmp_path / "empty.esgz")
    with open_file(tmp_path / "empty.esgz") as r:
        assert [e.name for e in r.toc.entries] == [".no.prefetch.landmark"]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_header_formats_survive(tmp_path: Path, fmt: int) -> None:
    specs = [Spec("dir/", "dir", mode=0o755), Spec("dir/" + "n" * 90, data=b"x"), Spec("dir/s", "symlink", link="n")]
    if fmt != tarfile.USTAR_FORMAT:
        specs.append(Spec("dir/" + "long" * 80, data=b"long"))
    src = write_tar(tmp_path / "in.tar", specs, fmt)
    blob = tmp_path / "out.esgz"
    build(src, blob, BuildOptions(level=1))
    check_blob_against_tar(blob, src)


def test_unsafe_and_unsupported_input(tmp_path: Path) -> None:
    src = tmp_path / "nul.tar"  # only a PAX record can carry a NUL byte in a name
    with tarfile.open(src, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.pax_headers = 1, {"path": "etc/pass\x00wd"}
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UnsafePathError, match=r"tar entry name 'etc/pass\\x00wd' contains a NUL byte"):
        build(src, tmp_path / "out")
    src = write_tar(tmp_path / "root.tar", [Spec("./", data=b"x")])
    with pytest.raises(BuildError, match="tar entry './' names the layer root but is a reg, not a directory"):
        build(src, tmp_path / "out")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(BuildError, match="not a tar archive"):
        build(tmp_path / "junk.tar", tmp_path / "out")
    (tmp_path / "junk.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(BuildError, match="not a valid gzip stream"):
        build(tmp_path / "junk.gz", tmp_path / "out")
    with pytest.raises(BuildError, match="chunk size must be positive"):
        build(src, tmp_path / "out", BuildOptions(chunk_size=0))
    good = write_tar(tmp_path / "good.tar", [Spec("a", data=b"a")])
    with pytest.raises(BuildError, match="is the input file"):
        build(good, good)
    assert tarfile.open(good).getnames() == ["a"]
