"""The root filesystem lazyd serves is the one containerd's overlayfs snapshotter builds.

busybox-with-deletions is pulled twice into one containerd: the plain image with
``ctr images pull`` onto overlayfs, the eStargz copy with ``lazyctl rpull`` onto lazyd.
Read-only views of both are mounted and every path is compared: type, mode, owner,
size, sha256, link target, device number and xattrs. The layer directories are compared
one by one too, which checks whiteouts (0/0 character devices) and opaque directories
(``trusted.overlay.opaque``) as overlayfs sees them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from lazyd.containerd.client import ContainerdClient, Mount

from tests.interop.trees import layer_dirs, mounted

from .conftest import SNAPSHOTTER, Images, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

Entry = tuple[Any, ...]


def describe(root: Path) -> dict[str, Entry]:
    """path -> (type, mode, uid, gid, size, sha256, link target, rdev, xattrs) for everything under root."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            digest = size = target = rdev = None
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs = tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False))
                                  for k in os.listxattr(path, follow_symlinks=False)))
            out[str(path.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, digest,
                                                target, rdev, xattrs)
    return out


def assert_same_tree(expected: dict[str, Entry], actual: dict[str, Entry], what: str) -> None:
    missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    assert not missing and not extra, f"{what}: missing {missing[:10]}, unexpected {extra[:10]}"
    differ = [(p, expected[p], actual[p]) for p in sorted(expected) if expected[p] != actual[p]]
    assert not differ, f"{what}: {len(differ)} paths differ, first: {differ[:3]}"


def _view(address: str, snapshotter: str, key: str, parent: str) -> list[Mount]:
    async def go() -> list[Mount]:
        async with ContainerdClient(address) as client:
            return await client.view(snapshotter, key, parent)

    return asyncio.run(go())


def test_rootfs_identical_to_overlayfs(stack: Stack, images: Images, tmp_path: Path) -> None:
    stack.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", images.busybox_plain)
    manifest = json.loads(stack.ctr("content", "get", _target(stack, images.busybox_plain)).stdout)
    config = json.loads(stack.ctr("content", "get", manifest["config"]["digest"]).stdout)
    plain_chain = _chain(config["rootfs"]["diff_ids"])
    lazy = stack.rpull(images.busybox_esgz)
    assert [layer["mode"] for layer in lazy["layers"]] == ["lazy"] * 3, lazy

    ref_mounts = _view(stack.address, "overlayfs", "view-overlayfs", plain_chain)
    lazy_mounts = _view(stack.address, SNAPSHOTTER, "view-lazyd", lazy["chain_id"])
    ref_layers, lazy_layers = layer_dirs(ref_mounts), layer_dirs(lazy_mounts)
    assert len(ref_layers) == len(lazy_layers) == 3
    for i, (a, b) in enumerate(zip(ref_layers, lazy_layers)):
        assert_same_tree(describe(Path(a)), describe(Path(b)), f"layer dir {i} (0 = top)")

    deleting, opaque = describe(Path(ref_layers[1])), describe(Path(ref_layers[0]))
    assert deleting["etc/group"][0] == stat.S_IFCHR and deleting["etc/group"][7] == (0, 0), "no whiteout"
    assert ("trusted.overlay.opaque", b"y") in opaque["var/log"][8], "no opaque directory"

    with mounted(ref_mounts, tmp_path / "ref") as ref_root, mounted(lazy_mounts, tmp_path / "lazy") as lazy_root:
        expected, actual = describe(ref_root), describe(lazy_root)
    assert "etc/group" not in expected and "bin/vi" not in expected and "bin/sh" in expected
    assert [p for p in expected if p.startswith("var/log/")] == ["var/log/fresh.log"]
    assert ("user.lazyd", b"xattr-value") in expected["data/file.txt"][8]
    assert_same_tree(expected, actual, "merged root filesystem")


def _target(stack: Stack, ref: str) -> str:
    for line in stack.ctr("images", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == ref:
            return fields[2]
    raise AssertionError(f"{ref} is not in containerd's image list")


def _chain(diff_ids: list[str]) -> str:
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain
