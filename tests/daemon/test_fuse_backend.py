"""``fuse_backend`` reaches the workers: a daemon with the pyfuse3 binding serves the same tree
and bytes as one with llfuse, and says which binding it runs."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

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


def test_layer_with_xattrs_moves_off_a_worker_that_turned_them_off(daemon_factory, busybox: EStargzImage) -> None:
    """workers = 3, xattr_free_workers (the default): workers 0 and 1 start undecided and get the layers
    not known to have extended attributes, worker 2 always serves them.  Once worker 0 has answered a
    GETXATTR with no such layer mounted, the kernel asks it no more, and a layer with extended
    attributes placed on it moves to worker 2, where its later mounts go at once."""
    plain, rich = busybox.layers[0], busybox.layers[-1]
    d: DaemonProc = daemon_factory("x", workers=3).start()
    a = d.mount_layer(busybox.ref, plain, "a")  # worker 0
    c = d.mount_layer(busybox.ref, plain, "c")  # worker 1
    with pytest.raises(OSError) as info:
        os.getxattr(a / "bin/busybox", "trusted.overlay.metacopy")
    assert info.value.errno == errno.EOPNOTSUPP
    b = d.mount_layer(busybox.ref, rich, "b")  # a tie of 0 and 1: worker 0 first, which refuses it
    assert os.getxattr(b / "data/file.txt", "user.lazyd") == b"xattr-value"
    e = d.mount_layer(busybox.ref, rich, "e")  # known now: a worker that always serves them
    assert os.getxattr(e / "data/file.txt", "user.lazyd") == b"xattr-value"
    f = d.mount_layer(busybox.ref, plain, "f")  # not known to have any: an undecided or xattr-free worker
    with d.client() as cl:
        st = cl.status()
    on = {m.mountpoint: m.worker_id for m in st.mounts}
    assert on[str(a)] == 0 and on[str(c)] == 1 and on[str(b)] == 2 and on[str(e)] == 2, on
    assert on[str(f)] in (0, 1), on
    assert [(w.worker_id, w.xattrs) for w in st.workers if w.worker_id >= 0] == [(0, False), (1, True), (2, True)]
    assert f"layer {rich.digest} has extended attributes: mounting it on worker 2" in d.log.read_text()
