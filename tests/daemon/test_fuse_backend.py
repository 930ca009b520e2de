"""``fuse_backend`` reaches the workers: a daemon with the pyfuse3 binding serves the same tree
and bytes as one with llfuse, and says which binding it runs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.daemon.conftest import DaemonProc
from tests.support.estargz_images import EStargzImage


def _tree(root: Path) -> dict[str, str]:
    """Every path below ``root`` with the sha256 of a regular file, the target of a link, or its kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "dir" if path.is_dir() else "other"
    return out


def test_pyfuse3_workers_serve_what_llfuse_workers_serve(daemon_factory, busybox: EStargzImage) -> None:
    trees = {}
    for backend in ("llfuse", "pyfuse3"):
        d: DaemonProc = daemon_factory(backend, extra=f'fuse_backend = "{backend}"').start()
        mps = d.mount_layers(busybox, "l")
        trees[backend] = [_tree(mp) for mp in mps]
        with d.client() as c:
            st = c.status()
        assert [w.fuse_binding.split()[0] for w in st.workers] == [backend] * d.workers
        assert all(w.fuse_binding.endswith("+lazyd.readino") for w in st.workers)
        d.shutdown()
    assert trees["pyfuse3"] == trees["llfuse"]
    assert sum(len(t) for t in trees["llfuse"]) > 100
    assert any(v not in ("dir", "other") and not v.startswith("-> ") for v in trees["llfuse"][0].values())
