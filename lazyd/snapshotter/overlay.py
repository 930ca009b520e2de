"""Snapshot directories and mounts, built like containerd's snapshots/overlay.

``<root>/snapshots/<id>/fs`` is a snapshot's upper (or, for a remote layer, lazyd's
mountpoint); ``<root>/snapshots/<id>/work`` is overlayfs's workdir for active ones.
A promoted remote layer also has ``<root>/snapshots/<id>/local``, a plain directory that
replaces ``fs`` as the layer's lower directory (its existence is what "promoted" means).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lazyd.mounttable import unmount_below
from lazyd.snapshotter.metadata import Kind

OVERLAY_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


@dataclass(frozen=True)
class Mount:
    """A mount for containerd (``containerd.types.Mount``)."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)


class Layout:
    """Paths under the snapshotter root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = root / "snapshots"
        self.snapshots.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        self.overlay_options = ["index=off"] if OVERLAY_INDEX_PARAM.exists() else []

    def dir(self, sid: int) -> Path:
        return self.snapshots / str(sid)

    def upper(self, sid: int) -> Path:
        return self.dir(sid) / "fs"

    def work(self, sid: int) -> Path:
        return self.dir(sid) / "work"

    def local(self, sid: int) -> Path:
        """A promoted layer's plain directory (made by ``promote``, renamed into place atomically)."""
        return self.dir(sid) / "local"

    def promoted(self, sid: int) -> bool:
        return self.local(sid).is_dir()

    def lower(self, sid: int) -> Path:
        """The directory a committed snapshot contributes as a lower layer: ``local`` once promoted, else ``fs``."""
        local = self.local(sid)
        return local if local.is_dir() else self.upper(sid)

    def create_dirs(self, sid: int, kind: Kind, parent_ids: list[int]) -> Path:
        """Make ``snapshots/<id>/fs`` (and ``work`` for active), owned like the parent's fs."""
        tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots))
        try:
            (tmp / "fs").mkdir(mode=0o755)
            if kind == Kind.ACTIVE:
                (tmp / "work").mkdir(mode=0o711)
            if parent_ids:
                st = os.stat(self.lower(parent_ids[0]))
                os.lchown(tmp / "fs", st.st_uid, st.st_gid)
            os.chmod(tmp, 0o755)
            tmp.rename(self.dir(sid))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.dir(sid)

    def own_like_parent(self, sid: int, parent_ids: list[int]) -> None:
        """Give ``snapshots/<id>/fs`` its parent's owner, as ``create_dirs`` does (for dirs made before the parent was known)."""
        if parent_ids:
            st = os.stat(self.lower(parent_ids[0]))
            os.lchown(self.upper(sid), st.st_uid, st.st_gid)

    def mounts(self, sid: int, kind: Kind, parent_ids: list[int]) -> list[Mount]:
        """containerd overlay's mounts(): bind for no/one read-only layer, else overlay."""
        if not parent_ids:
            return [Mount("bind", str(self.upper(sid)), ["ro" if kind == Kind.VIEW else "rw", "rbind"])]
        options: list[str] = []
        if kind == Kind.ACTIVE:
            options += [f"workdir={self.work(sid)}", f"upperdir={self.upper(sid)}"]
        elif len(parent_ids) == 1:
            return [Mount("bind", str(self.lower(parent_ids[0])), ["ro", "rbind"])]
        options.append("lowerdir=" + ":".join(str(self.lower(p)) for p in parent_ids))
        options += self.overlay_options
        return [Mount("overlay", "overlay", options)]

    def remove_dir(self, sid: int) -> None:
        """Unmount anything left below ``snapshots/<id>`` and delete it."""
        path = self.dir(sid)
        unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)

    def orphan_dirs(self, known: set[int]) -> list[Path]:
        """Directories under ``snapshots/`` with no metadata row (left by crashes or removals)."""
        out = []
        for entry in self.snapshots.iterdir():
            if not entry.name.isdigit() or int(entry.name) not in known:
                out.append(entry)
        return out


def usage(path: Path) -> tuple[int, int]:
    """(bytes, inodes) used by ``path`` and everything below it, hard links once (containerd's fs.DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        names = [*dirnames, *filenames] if dirpath != str(path) else ["", *dirnames, *filenames]
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name) if name else dirpath)
            except FileNotFoundError:
                continue
            ino = (st.st_dev, st.st_ino)
            if ino in seen:
                continue
            seen.add(ino)
            size += st.st_blocks * 512
    return size, len(seen)
