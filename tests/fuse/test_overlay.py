"""Mounted layers stacked as overlayfs lowerdirs behave like the extracted image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fuse.conftest import WorkerEnv, make_layer, read_file
from tests.support.treecheck import check_tree
from tests.support.images import build_busybox, layer_tars


def _overlay(lower: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    opts = "lowerdir=" + ":".join(str(p) for p in lower)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], check=True, capture_output=True)


@pytest.mark.slow
def test_busybox_layers_through_overlay(worker_env: WorkerEnv, tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    build_busybox(layout, "t", with_deletions=True)
    base_tar, upper_tar = layer_tars(layout, "t", tmp_path / "tars")
    base = make_layer(base_tar, tmp_path / "blobs")
    upper = make_layer(upper_tar, tmp_path / "blobs")
    worker_env.start_worker()
    base_mnt = worker_env.mount(base, "base")
    upper_mnt = worker_env.mount(upper, "upper")
    check_tree(base_mnt, base_tar)
    check_tree(upper_mnt, upper_tar)
    merged = tmp_path / "merged"
    _overlay([upper_mnt, base_mnt], merged)  # the upper layer comes first
    assert not (merged / "etc/group").exists() and (merged / "etc/passwd").exists()
    for applet in ("vi", "wget", "telnet"):
        assert not os.path.lexists(merged / "bin" / applet)
    assert os.path.islink(merged / "bin/ls")
    assert sorted(os.listdir(merged / "var/log")) == ["new.log"]
    assert read_file(merged / "data/file.txt") == b"payload\n"
    assert os.getxattr(merged / "data/file.txt", "user.lazyd") == b"xattr-value"
    assert os.stat(merged / "data/file.txt").st_nlink == 2
    out = subprocess.run(["chroot", str(merged), "/bin/sh", "-c", "echo hi from $(cat /etc/hello.txt)"],
                         capture_output=True, text=True, check=True).stdout
    assert out == "hi from hello from lazyd\n"


def test_whiteouts_and_opaque_dir_over_a_base_layer(worker_env: WorkerEnv, tmp_path: Path) -> None:
    import tarfile

    from tests.fuse.conftest import _add, rich_tar

    base_tar = tmp_path / "base.tar"
    with tarfile.open(base_tar, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "etc", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "etc/passwd", data=b"root:x:0:0::/:/bin/sh\n")
        _add(tf, "etc/keep", data=b"kept\n")
        _add(tf, "var", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "var/old", data=b"old\n")
        _add(tf, "var/olddir", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "var/olddir/x", data=b"x\n")
    base = make_layer(base_tar, tmp_path / "blobs")
    upper = make_layer(rich_tar(tmp_path / "rich.tar"), tmp_path / "blobs")
    worker_env.start_worker()
    lower = [worker_env.mount(upper, "upper"), worker_env.mount(base, "base")]
    merged = tmp_path / "merged"
    _overlay(lower, merged)
    assert not os.path.lexists(merged / "etc/passwd")
    assert read_file(merged / "etc/keep") == b"kept\n"
    assert read_file(merged / "etc/hostname") == b"lazyd\n"
    assert sorted(os.listdir(merged / "var")) == ["new"]
    assert not os.path.lexists(merged / "var/.wh..wh..opq")
