"""Compare a mounted layer with its source tar, applying overlayfs whiteout conventions."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path

_KIND = {
    tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def _norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def walk(root: Path) -> set[str]:
    """Every path below ``root`` (relative, without following symlinks)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in dirnames + filenames:
            out.add(n if rel == "." else f"{rel}/{n}")
    return out


def check_tree(root: Path, tar_path: Path) -> int:
    """Assert that the tree at ``root`` equals the tar; returns how many entries were checked."""
    with tarfile.open(tar_path) as tf:
        members = {_norm(m.name): m for m in tf.getmembers() if _norm(m.name)}
        expected: set[str] = set()
        links: dict[str, list[str]] = {}
        opaque = {name.rpartition("/")[0] for name in members if name.rpartition("/")[2] == ".wh..wh..opq"}
        for name, m in members.items():
            if m.islnk():
                links.setdefault(_norm(m.linkname), []).append(name)
        for name, m in members.items():
            parts = name.split("/")
            for i in range(1, len(parts)):
                expected.add("/".join(parts[:i]))
            base = parts[-1]
            path = root / name
            if base == ".wh..wh..opq":
                parent = root / "/".join(parts[:-1])
                assert os.getxattr(parent, "trusted.overlay.opaque") == b"y", name
                continue
            if base.startswith(".wh."):
                target = "/".join(parts[:-1] + [base[4:]])
                if target in members:
                    continue
                expected.add(target)
                st = os.lstat(root / target)
                assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, f"{target}: not a 0:0 char device"
                assert (st.st_uid, st.st_gid) == (0, 0), target
                continue
            expected.add(name)
            st = os.lstat(path)
            key = name
            if m.islnk():
                key = _norm(m.linkname)
                target = members[_norm(m.linkname)]
                tst = os.lstat(root / _norm(m.linkname))
                assert st.st_ino == tst.st_ino, f"hardlink {name} has its own inode"
                assert st.st_nlink == 1 + len(links[_norm(m.linkname)]), f"{name}: nlink {st.st_nlink}"
                m = target
            else:
                assert stat.S_IFMT(st.st_mode) == _KIND[m.type], f"{name}: mode {oct(st.st_mode)}"
            assert stat.S_IMODE(st.st_mode) == m.mode & 0o7777, f"{name}: mode {oct(st.st_mode)} != {oct(m.mode)}"
            assert (st.st_uid, st.st_gid) == (m.uid, m.gid), f"{name}: owner {st.st_uid}:{st.st_gid}"
            assert st.st_mtime_ns == int(m.mtime) * 1_000_000_000, f"{name}: mtime {st.st_mtime_ns} != {m.mtime}"
            if m.isreg():
                assert st.st_size == m.size, f"{name}: size {st.st_size} != {m.size}"
                with open(path, "rb") as f:
                    got = hashlib.sha256(f.read()).hexdigest()
                want = hashlib.sha256(tf.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
                assert got == want, f"{name}: content differs"
                if not links.get(key):
                    assert st.st_nlink == 1, f"{name}: nlink {st.st_nlink}"
            elif m.issym():
                assert os.readlink(path) == m.linkname, f"{name}: link target {os.readlink(path)!r}"
            elif m.ischr() or m.isblk():
                assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (m.devmajor, m.devminor), name
            want_x = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            if name in opaque:
                want_x["trusted.overlay.opaque"] = b"y"
            if not m.issym():
                got_x = {k: os.getxattr(path, k) for k in os.listxattr(path)}
                assert got_x == want_x, f"{name}: xattrs {got_x} != {want_x}"
    listed = walk(root)
    assert listed == expected, f"extra: {sorted(listed - expected)[:10]}, missing: {sorted(expected - listed)[:10]}"
    return len(listed)
