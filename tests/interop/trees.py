"""Root filesystems of snapshots, read from the host: a read-only View is mounted and walked.

``describe`` records, for every path, what the matrix compares: type, permission bits,
owner, size and sha256 of regular files, symlink targets, device numbers and xattrs.
(mtimes are left out: eStargz TOCs keep whole seconds, tars may keep nanoseconds.)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lazyd.containerd.client import ContainerdClient, Mount

Entry = tuple[Any, ...]


def chain_id(diff_ids: list[str]) -> str:
    """The OCI chain ID of a stack of layers (containerd names committed snapshots by it)."""
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def describe(root: Path, readers: int = 8) -> dict[str, Entry]:
    """path -> (type, mode bits, uid, gid, size, sha256, link target, rdev, xattrs) for everything under root.

    For regular files "size" is (size, link count), so a hardlink that became a copy shows.

    Files are hashed by ``readers`` threads: on a lazy mount each first read waits for the
    registry, so reading many files at once is what keeps a big image's walk short.
    """
    out: dict[str, Entry] = {}
    regular: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            digest = size = target = rdev = None
            if stat.S_ISREG(st.st_mode):
                size = (st.st_size, st.st_nlink)
                regular.append(path)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs = tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False))
                                  for k in os.listxattr(path, follow_symlinks=False)))
            out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                                st.st_gid, size, digest, target, rdev, xattrs)
    with ThreadPoolExecutor(readers) as pool:
        for path, digest in zip(regular, pool.map(_sha256, regular)):
            rel = str(path.relative_to(root))
            entry = out[rel]
            out[rel] = entry[:5] + (digest,) + entry[6:]
    st = root.stat()
    out["."] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None, None, None, None, ())
    return out


def tree_differences(expected: dict[str, Entry], actual: dict[str, Entry]) -> list[str]:
    """Human-readable differences between two ``describe`` results (empty when equal)."""
    problems = [f"missing {p}" for p in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected {p}" for p in sorted(actual.keys() - expected.keys())]
    problems += [f"{p}: expected {expected[p]}, got {actual[p]}" for p in sorted(expected.keys() & actual.keys())
                 if expected[p] != actual[p]]
    return problems


def view(address: str, namespace: str, snapshotter: str, parent: str) -> tuple[str, list[Mount]]:
    """A read-only View of snapshot ``parent``: (its key, its mounts)."""
    key = f"interop-view-{uuid.uuid4().hex[:12]}"

    async def go() -> list[Mount]:
        async with ContainerdClient(address, namespace) as client:
            return await client.view(snapshotter, key, parent)

    return key, asyncio.run(go())


def layer_dirs(mounts: list[Mount]) -> list[str]:
    """The layer directories of a read-only view, top layer first."""
    (m,) = mounts
    if m.type == "bind":
        return [m.source]
    lower = next(o for o in m.options if o.startswith("lowerdir="))
    return lower[len("lowerdir="):].split(":")


@contextmanager
def mounted(mounts: list[Mount], target: Path) -> Iterator[Path]:
    """Mount a view's mounts (one overlay or bind mount) read-only at ``target``."""
    (m,) = mounts
    target.mkdir(parents=True)
    if m.type == "bind":
        argv = ["mount", "--bind", "-o", "ro", m.source, str(target)]
    else:
        argv = ["mount", "-t", m.type, m.source, "-o", ",".join(m.options), str(target)]
    subprocess.run(argv, check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, capture_output=True)
        target.rmdir()


def snapshot_tree(address: str, namespace: str, snapshotter: str, chain: str, where: Path) -> dict[str, Entry]:
    """``describe`` of the root filesystem of committed snapshot ``chain``, through a View mounted at ``where``."""
    key, mounts = view(address, namespace, snapshotter, chain)
    try:
        with mounted(mounts, where) as root:
            return describe(root)
    finally:
        subprocess.run(["ctr", "--address", address, "--namespace", namespace, "snapshots", "--snapshotter",
                        snapshotter, "rm", key], capture_output=True)
