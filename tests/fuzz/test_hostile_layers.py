"""Hostile layers: names that climb out or are absolute, symlink loops, hardlinks to nothing,
absurd chunk and file sizes, a million entries, names deep enough to blow up the tree.  Each
gives a clear error or is parsed safely; where FUSE behaviour is not covered elsewhere
(tests/fuse/test_odd_names.py mounts the odd names), a worker mounts the layer.
The last tests pin the bugs fuzzing found in the tree and the inode table.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from lazyd.estargz import TOC, EStargzError, Reader, TOCError
from lazyd.estargz.entries import MAX_FILE_SIZE
from lazyd.estargz.toc import MAX_CHUNK_SIZE
from lazyd.estargz.inodes import InodeTable, InodeTableError
from tests.fuse.conftest import (  # noqa: F401 (worker_env is a fixture)
    BuiltLayer,
    ControlError,
    WorkerEnv,
    make_layer,
    read_file,
    worker_env,
)
from tests.fuse.fetcher import LocalLayer
from tests.fuzz.blobs import build_blob, toc_of, with_toc, write_tar
from tests.fuzz.conftest import PROFILE, CaseCounter, guarded
from tests.support.tocs import D, reg, toc_json

def reader_of(blob: bytes) -> Reader:
    return Reader.open(lambda off, n: blob[off : off + n], len(blob))


def layer_of(blob: bytes, workdir: Path, name: str) -> BuiltLayer:
    """A worker-mountable layer from blob bytes (for hand-made TOCs the writer would not make)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.esgz"
    path.write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    local = LocalLayer.load(path, digest)
    toc_path = workdir / f"{name}.toc.json"
    toc_path.write_bytes(local.toc_json)
    return BuiltLayer(path, path, digest, local, toc_path)


# -- names that climb out or are absolute -------------------------------------------------------


CLIMBING = {"../../etc/x": b"x\n", "/etc/abs": b"abs\n", "a/../../../../b": b"b\n", "./../c/./d": b"d\n"}


def test_climbing_and_absolute_names_stay_inside(tmp_path: Path) -> None:
    """Writer and reader: '..' never climbs above the layer root, '/' never makes a name absolute
    (names read as Go's path.Clean("/" + name) without the '/', as the reference reads them)."""
    tar = write_tar(tmp_path / "climb.tar", CLIMBING)
    r = reader_of(build_blob(tar, tmp_path / "climb.esgz"))
    assert r.toc.names() == ["", ".no.prefetch.landmark", "b", "c", "c/d", "etc", "etc/abs", "etc/x"]
    assert r.read("etc/x") == b"x\n" and r.read("/etc/abs") == b"abs\n" and r.read("../b") == b"b\n"
    assert r.lookup("..") is r.lookup("/") is r.lookup("") and r.lookup("").type == "dir"


def test_climbing_names_in_a_hand_made_toc() -> None:
    toc = TOC.parse(toc_json(
        {"name": "../../etc/x", "type": "reg"},
        {"name": "/../../..", "type": "dir", "mode": 0o700},
        {"name": "l", "type": "hardlink", "linkName": "../../../../etc/x"},
        {"name": "s", "type": "symlink", "linkName": "../../../../etc/shadow"},
    ))
    assert toc.names() == ["", "etc", "etc/x", "l", "s"]
    assert toc.lookup("").mode == 0o700  # the "/../../.." entry is the root
    assert toc.lookup("l") is toc.lookup("etc/x")
    assert toc.lookup("s").link_name == "../../../../etc/shadow"  # a symlink target is data, kept as is
    table = InodeTable.from_toc(toc)
    assert len(table) == 4  # root, etc, etc/x (also named l), s


# -- symlink loops ---------------------------------------------------------------------------


LOOPS = {"loop/a": "b", "loop/b": "a", "self": "self", "abs": "/abs", "up": "../up"}


def test_symlink_loops_parse(tmp_path: Path) -> None:
    """Symlinks are never resolved by the TOC or the inode table: a loop is just data."""
    tar = write_tar(tmp_path / "loop.tar", {"file": b"ok\n"}, symlinks=LOOPS)
    r = reader_of(build_blob(tar, tmp_path / "loop.esgz"))
    for name, target in LOOPS.items():
        assert r.lookup(name).type == "symlink" and r.lookup(name).link_name == target
    table = InodeTable.from_toc(r.toc)
    assert len(table) == 1 + 1 + 1 + len(LOOPS)  # root, file, loop/, the links (the landmark is hidden)


def test_symlink_loops_mounted(worker_env: WorkerEnv, tmp_path: Path) -> None:  # noqa: F811
    """Mounted, a loop reads back with readlink, resolving it fails with ELOOP in the kernel,
    and the worker keeps serving."""
    tar = write_tar(tmp_path / "loop.tar", {"file": b"ok\n"}, symlinks=LOOPS)
    layer = make_layer(tar, tmp_path / "blobs")
    worker_env.start_worker()
    mnt = worker_env.mount(layer, "loops")
    for name, target in LOOPS.items():
        assert os.readlink(mnt / name) == target
    for name in ("loop/a", "loop/b", "self"):
        with pytest.raises(OSError) as got:
            os.stat(mnt / name)
        assert got.value.errno == errno.ELOOP, (name, got.value)
        with pytest.raises(OSError) as got:
            open(mnt / name, "rb").close()
        assert got.value.errno == errno.ELOOP
    # A target is resolved by the kernel where the caller stands: "../up" from the mount's top
    # names a sibling of the mountpoint (here nothing), not a file of the layer.
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "up")
    assert read_file(mnt / "file") == b"ok\n"
    assert worker_env.proc is not None and worker_env.proc.alive()


# -- hardlinks to a missing target ---------------------------------------------------------------


MISSING_LINKS = [
    ({"name": "l", "type": "hardlink", "linkName": "nowhere"}, "points at 'nowhere', which is not in the layer"),
    ({"name": "l", "type": "hardlink", "linkName": "../../etc/passwd"}, "points at 'etc/passwd', which is not in"),
    ({"name": "l", "type": "hardlink", "linkName": "d"}, "points at 'd', which is not in the layer"),  # implied dir
    ({"name": "l", "type": "hardlink", "linkName": "l"}, "link cycle"),
]


@pytest.mark.parametrize("link, message", MISSING_LINKS)
def test_hardlink_to_nothing_is_refused(link: dict[str, Any], message: str) -> None:
    with pytest.raises(TOCError, match=message):
        TOC.parse(toc_json({"name": "d/f", "type": "reg"}, link))


def test_hardlink_to_nothing_refused_by_the_worker(worker_env: WorkerEnv, tmp_path: Path) -> None:  # noqa: F811
    """worker.mount of such a TOC: invalid_request naming the hardlink; nothing mounted, worker alive."""
    doc = toc_json({"name": "f", "type": "reg"}, MISSING_LINKS[1][0])
    toc_path = tmp_path / "missing.toc.json"
    toc_path.write_bytes(doc)
    worker_env.start_worker()
    mountpoint = tmp_path / "mnt" / "missing"
    with pytest.raises(ControlError) as got:
        worker_env.control("worker.mount", {
            "mount_id": "missing", "mountpoint": str(mountpoint), "layer_digest": D,
            "toc_digest": "sha256:" + hashlib.sha256(doc).hexdigest(), "toc_path": str(toc_path), "blob_size": 100})
    assert got.value.code == "invalid_request" and "hardlink 'l' points at 'etc/passwd'" in str(got.value)
    assert not os.path.ismount(mountpoint)
    assert worker_env.control("worker.status")["mounts"] == []


# -- absurd sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("entries, message", [
    ([reg("big", 2**62, 100)], f"size {2**62} is absurd"),
    ([reg("f", 4000, 100, chunkSize=2**62)], f"chunk \\[0, \\+{2**62}\\) runs past the file size 4000"),
    ([reg("f", 2**40, 100, chunkSize=2**30),
      {"type": "chunk", "name": "f", "offset": 200, "chunkOffset": 2**30, "chunkSize": 2**62, "chunkDigest": D}],
     "runs past the file size"),
    ([reg("f", MAX_FILE_SIZE, 100)], f"chunk size {MAX_FILE_SIZE} is absurd \\(limit {MAX_CHUNK_SIZE}\\)"),
    ([reg("f", 2**30, 2**62)], "offset .* is absurd"),
    ([reg("f", 10, 100, innerOffset=2**62)], "innerOffset .* is absurd"),
])
def test_absurd_chunk_sizes_are_refused(entries: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(TOCError, match=message):
        TOC.parse(toc_json(*entries), toc_offset=2**63)


@pytest.fixture()
def four_gib_blob(tmp_path: Path) -> bytes:
    """A real 4-file layer whose TOC claims 1 GiB per file (4 GiB in all): each file's one chunk
    claims 1 GiB (the largest chunk allowed) but its member holds a few bytes."""
    tar = write_tar(tmp_path / "small.tar", {f"f{i}": b"%d\n" % i for i in range(4)})
    blob = build_blob(tar, tmp_path / "small.esgz")
    _, doc = toc_of(blob)
    for e in doc["entries"]:
        if e["type"] == "reg" and e["name"].startswith("f"):
            e["size"] = 2**30
            e.pop("chunkSize", None)
    return with_toc(blob, json.dumps(doc).encode())


def test_four_gib_claim_parses_and_reads_fail_cheaply(four_gib_blob: bytes) -> None:
    """Sizes are claims: the TOC parses, but no read returns a byte the member does not hold, and
    a read allocates what the member inflates to, not what the TOC claims."""
    r = reader_of(four_gib_blob)
    files = [r.lookup(f"f{i}") for i in range(4)]
    assert sum(f.size for f in files) == 4 * 2**30 and InodeTable.from_toc(r.toc).total_size >= 4 * 2**30
    for i in range(4):
        out = guarded(lambda: r.read(f"f{i}", 0, 4096), (EStargzError,), max_bytes=8 * 1024 * 1024)
        assert out.error is not None and re.search(r"member holds \d+ bytes, need 1073741824", str(out.error))


def test_four_gib_claim_mounted(worker_env: WorkerEnv, tmp_path: Path, four_gib_blob: bytes) -> None:  # noqa: F811
    """Mounted: stat shows the claimed size, a read fails with EIO, the worker keeps serving."""
    layer = layer_of(four_gib_blob, tmp_path / "blobs", "fourgib")
    worker_env.start_worker()
    mnt = worker_env.mount(layer, "fourgib")
    assert [os.stat(mnt / f"f{i}").st_size for i in range(4)] == [2**30] * 4
    with pytest.raises(OSError) as got:
        with open(mnt / "f0", "rb") as f:
            f.read(4096)
    assert got.value.errno == errno.EIO
    assert worker_env.control("worker.status")["mounts"][0]["mount_id"] == "fourgib"
    assert worker_env.proc is not None and worker_env.proc.alive()


# -- many entries ---------------------------------------------------------------------------------------


MANY = 1_000_000 if PROFILE == "long" else 100_000


@pytest.mark.parametrize("kind", ["empty files", "root entries"])
def test_many_empty_entries(cases: CaseCounter, kind: str) -> None:
    """100,000 (CI) or 1,000,000 (scripts/fuzz) empty entries parse in bounded time and memory:
    under 20 us and 1 KiB an entry (measured: ~1.6 us and ~500 bytes for a million files)."""
    if kind == "empty files":
        entries = [{"name": f"d{i // 1000}/e{i}", "type": "reg"} for i in range(MANY)]
    else:  # every entry names the root again (later entries replace earlier ones)
        entries = [{"name": "./" if i % 2 else "/", "type": "dir"} for i in range(MANY)]
    doc = toc_json(*entries)
    del entries
    start = time.perf_counter()
    toc = TOC.parse(doc)
    seconds = time.perf_counter() - start
    assert len(toc.entries) == MANY
    assert len(toc.names()) == (MANY + MANY // 1000 + 1 if kind == "empty files" else 1)
    del toc
    tracemalloc.start()
    try:
        TOC.parse(doc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    cases.measure(f"TOC.parse of {MANY:,} {kind} ({len(doc) >> 20} MiB of JSON)",
                  f"{seconds:.2f} s, {peak / 2**20:.0f} MiB traced peak ({peak // MANY} bytes an entry)")
    assert seconds < 20e-6 * MANY, f"{seconds:.1f} s"
    assert peak < 1024 * MANY, f"{peak} bytes"


# -- bugs fuzzing found ----------------------------------------------------------------------------------


def test_implied_directories_cost_linear_memory() -> None:
    """Every implied parent directory is named by its full path, so one deep name costs
    O(depth^2): 32 names of 2,047 levels (130 KiB of JSON) took ~160 MiB before the tree
    bounded implied names by the TOC's size."""
    deep = "/".join(["a"] * 2046)  # 4,091 characters: within MAX_NAME_LEN
    doc = toc_json(*({"name": f"{i:x}/{deep}", "type": "dir"} for i in range(32)))
    guarded(lambda: TOC.parse(doc), (TOCError,), max_bytes=1024 * 1024 + 400 * len(doc))


@pytest.mark.parametrize("modtime", ["9999-12-31T23:59:59Z", "1600-01-01T00:00:00Z"])
def test_far_modtimes_in_the_inode_table(modtime: str) -> None:
    """Valid RFC 3339 times beyond int64 nanoseconds raised struct.error (now clamped)."""
    toc = TOC.parse(toc_json({"name": "f", "type": "reg", "modtime": modtime}))
    table = InodeTable.from_toc(toc)
    assert len(table) == 2


@pytest.mark.parametrize("root", [{"name": "./", "type": "hardlink", "linkName": "f"}, {"name": "./", "type": "reg"}])
def test_replaced_root_entries_in_the_inode_table(root: dict[str, Any]) -> None:
    """A non-directory root entry that a later root directory replaces: TOC.parse lets the later
    one win; the inode table raised IndexError (hardlink) or InodeTableError on it."""
    toc = TOC.parse(toc_json({"name": "f", "type": "reg"}, root, {"name": "/", "type": "dir", "mode": 0o700}))
    assert toc.lookup("").type == "dir"
    try:
        table = InodeTable.from_toc(toc)
    except InodeTableError as exc:
        raise AssertionError(f"TOC.parse accepted the layer, the inode table refuses it: {exc}") from None
    assert table.attr(1).mode & 0o7777 == 0o700
