"""Layers with odd entry names (root entries, absolute names, '..', duplicates, odd hardlink
targets) mount and serve exactly the tree the reference reads, and nothing outside the mount."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from tests.estargz.trees import (
    ODD_NAMES_TREE,
    Tree,
    ensure_reference_tools,
    odd_names_specs,
    reference_build,
    write_tar,
)
from tests.fuse.conftest import BuiltLayer, WorkerEnv, make_layer, read_file
from tests.fuse.fetcher import LocalLayer

_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "symlink"}


def _mounted_tree(mnt: Path) -> Tree:
    """The tree under ``mnt`` in the form of ``ODD_NAMES_TREE`` (sizes of regular files only)."""
    tree: Tree = {}

    def visit(rel: str) -> None:
        path = mnt / rel if rel else mnt
        st = os.lstat(path)
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        data = read_file(path) if kind == "reg" else b""
        link = os.readlink(path) if kind == "symlink" else ""
        tree[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, len(data) if kind == "reg" else 0, link,
                     hashlib.sha256(data).hexdigest() if kind == "reg" else "")
        if kind == "dir":
            for name in os.listdir(path):
                assert name not in ("", ".", "..") and "/" not in name, f"bad entry {name!r} in {rel!r}"
                visit(f"{rel}/{name}" if rel else name)

    visit("")
    return tree


def _reference_layer(tar: Path, workdir: Path) -> BuiltLayer:
    ensure_reference_tools()
    blob = workdir / "odd.ref.estargz"
    reference_build(tar, blob, "-mode", "build")
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    local = LocalLayer.load(blob, digest)
    toc_path = workdir / "odd.ref.toc.json"
    toc_path.write_bytes(local.toc_json)
    return BuiltLayer(tar, blob, digest, local, toc_path)


@pytest.mark.parametrize("producer", ["lazyd", "reference"])
def test_odd_names_mount_inside_the_layer(worker_env: WorkerEnv, tmp_path: Path, producer: str) -> None:
    tar = write_tar(tmp_path / "odd.tar", odd_names_specs())
    layer = (make_layer(tar, tmp_path / "blobs") if producer == "lazyd"
             else _reference_layer(tar, tmp_path))
    outside = os.listdir(tmp_path)
    worker_env.start_worker()
    mnt = worker_env.mount(layer, "odd")
    assert _mounted_tree(mnt) == ODD_NAMES_TREE
    assert os.stat(mnt / "link").st_ino == os.stat(mnt / "etc/hosts").st_ino
    assert os.stat(mnt / "bin/link2").st_ino == os.stat(mnt / "x").st_ino and os.stat(mnt / "x").st_nlink == 2
    # '..' in names never reached above the layer: nothing new beside the mount, nothing named x or y there.
    assert set(os.listdir(tmp_path)) - set(outside) <= {"mnt", "worker", "worker.log"}
    assert os.listdir(tmp_path / "mnt") == ["odd"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "mnt" / "x").exists()
    for rel, (kind, *_rest) in ODD_NAMES_TREE.items():
        if kind != "symlink":
            assert os.path.realpath(mnt / rel).startswith(str(mnt.resolve())), rel
