"""Entry names are read as the reference reads them (Go's path.Clean("/" + name)), by the TOC
parser, the writer and the reference alike; odd names make a readable layer, never an unsafe one."""

from __future__ import annotations

import json
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from lazyd.estargz import TOC, BuildOptions, UnsafePathError, build, normalize_name, open_file
from tests.estargz.trees import (
    ODD_NAMES_TREE,
    Spec,
    Tree,
    go_tool,
    lazyd_tree,
    odd_names_specs,
    reference_build,
    reference_tree,
    reference_verify,
    unpacked_tree,
    write_tar,
)

D = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def go_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gobin")


@pytest.mark.parametrize("name, clean", [
    ("", ""), ("/", ""), (".", ""), ("./", ""), ("//", ""), ("/./", ""), ("..", ""), ("/..", ""), ("../..", ""),
    ("a", "a"), ("a/b", "a/b"), ("/etc/x", "etc/x"), ("//etc//x/", "etc/x"), ("./etc/x/.", "etc/x"),
    ("a/../b", "b"), ("../../x", "x"), ("/../y", "y"), ("a/b/../../../c", "c"), ("a/b/..", "a"),
    (".bashrc", ".bashrc"), ("a/.b", "a/.b"), ("...", "..."), ("a/..b/c..", "a/..b/c.."), ("é/ü", "é/ü"),
])
def test_cleaning_rules(name: str, clean: str) -> None:
    assert normalize_name(name) == clean


def test_nul_bytes_are_refused() -> None:
    with pytest.raises(UnsafePathError, match=r"tar entry name 'a\\x00b' contains a NUL byte"):
        normalize_name("a\x00b", "tar entry name")


def test_cleaning_matches_go(go_bin: Path) -> None:
    """Thousands of generated names, cleaned by lazyd and by Go's path.Clean, agree."""
    rnd = random.Random(11)
    parts = ["", ".", "..", "...", "a", "b", ".a", "a.", "..a", "é"]
    names = [rnd.choice(["", "/", "//"]) + "/".join(rnd.choice(parts) for _ in range(rnd.randint(1, 6)))
             + rnd.choice(["", "/", "/."]) for _ in range(5000)]
    proc = subprocess.run([str(go_tool("goclean", go_bin))], input=json.dumps(names), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    want = json.loads(proc.stdout)
    got = [normalize_name(n) for n in names]
    bad = [(n, g, w) for n, g, w in zip(names, got, want) if g != w]
    assert not bad, bad[:10]


def test_toc_root_named_slash_and_duplicates() -> None:
    """A TOC as ``ctr-remote image convert`` writes it for a umoci layer (root entry ``/``), with
    names that repeat after cleaning: the later entry wins, children stay on the directory."""
    t = TOC.parse(json.dumps({"version": 1, "entries": [
        {"name": "/", "type": "dir", "mode": 0o711, "xattrs": {"user.a": "MQ=="}},
        {"name": "./", "type": "dir", "mode": 0o700},
        {"name": "/etc/", "type": "dir", "mode": 0o750},
        {"name": "/etc/a", "type": "reg", "size": 1, "offset": 100, "digest": D, "chunkDigest": D},
        {"name": "etc", "type": "dir", "mode": 0o755},
        {"name": "./etc/a", "type": "reg", "size": 2, "offset": 200, "digest": D, "chunkDigest": D},
        {"name": "../../h", "type": "hardlink", "linkName": "/../etc/./a"},
    ]}).encode(), toc_offset=300)
    assert [e.name for e in t.entries] == ["", "", "etc", "etc/a", "etc", "etc/a", "h"]
    assert t.root is t.entries[1] and t.root.mode == 0o700 and not t.root.xattrs
    etc = t.lookup("/etc")
    assert etc is t.entries[4] and etc.mode == 0o755 and sorted(etc.children) == ["a"]
    assert t.lookup("etc/a") is t.entries[5] and t.lookup("h") is t.entries[5] and t.entries[5].num_link == 2
    assert t.root.children == {"etc": etc, "h": t.entries[5]}
    assert t.lookup("../../etc/a") is t.entries[5]


def _assert_same(trees: dict[str, Tree]) -> None:
    for label, tree in trees.items():
        got = {k: v for k, v in tree.items() if k not in (".no.prefetch.landmark", ".prefetch.landmark")}
        assert got == ODD_NAMES_TREE, (label, sorted(set(got.items()) ^ set(ODD_NAMES_TREE.items())))


@pytest.mark.usefixtures("reference_tools")
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_odd_names_same_tree_everywhere(tmp_path: Path, go_bin: Path, fmt: int) -> None:
    """One tar with root, absolute, '..', duplicate and odd-hardlink names, converted by lazyd and
    by the reference (Build and Writer), reads as the same tree under lazyd's TOC, the reference
    reader and the reference's unpacked stream."""
    src = write_tar(tmp_path / "odd.tar", odd_names_specs(), fmt)
    reftree = go_tool("reftree", go_bin)
    blobs = {"lazyd": tmp_path / "lazyd.esgz", "ref-build": tmp_path / "ref-build.esgz",
             "ref-writer": tmp_path / "ref-writer.esgz", "lazyd-prio": tmp_path / "lazyd-prio.esgz"}
    ours = build(src, blobs["lazyd"])
    prio = build(src, blobs["lazyd-prio"], BuildOptions(prioritized=["/bin/link2", "../deep/dir/f"]))
    reference_build(src, blobs["ref-build"], "-mode", "build")
    reference_build(src, blobs["ref-writer"], "-mode", "writer")
    for blob, digest in ((blobs["lazyd"], ours.toc_digest), (blobs["lazyd-prio"], prio.toc_digest),
                         (blobs["ref-build"], None)):
        proc = reference_verify(blob, digest)
        assert proc.returncode == 0 and "RESULT: OK" in proc.stderr, proc.stderr
    trees: dict[str, Tree] = {}
    for label, blob in blobs.items():
        trees[f"{label} read by lazyd"] = lazyd_tree(blob)
        trees[f"{label} read by the reference"] = reference_tree(blob, reftree)
        trees[f"{label} unpacked by the reference"] = unpacked_tree(blob)
    _assert_same(trees)
    # The prioritized files (and their parents and hardlink targets) come before the landmark.
    with open_file(blobs["lazyd-prio"]) as r:
        names = [e.name for e in r.toc.entries]
        assert names[: names.index(".prefetch.landmark")] == ["", "bin", "x", "bin/link2", "deep/dir/f"]


def test_writer_records_tar_names(tmp_path: Path) -> None:
    """The TOC keeps each name as the tar spells it (as the reference does); readers clean it."""
    src = write_tar(tmp_path / "t.tar", [Spec("/", "dir"), Spec("/etc/", "dir"), Spec("../x", data=b"1"),
                                         Spec("l", "hardlink", link="/../x")])
    build(src, tmp_path / "o.esgz")
    with open_file(tmp_path / "o.esgz") as r:
        doc = json.loads(r.toc_json)
        assert [(e["name"], e.get("linkName")) for e in doc["entries"]] == [
            (".no.prefetch.landmark", None), ("/", None), ("/etc/", None), ("../x", None), ("l", "/../x")]
        assert [e.name for e in r.toc.entries] == [".no.prefetch.landmark", "", "etc", "x", "l"]
        assert r.read("l") == b"1"
