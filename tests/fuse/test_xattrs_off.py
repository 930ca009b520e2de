"""``--xattrs auto``: a worker whose layers have no extended attributes answers the kernel's first
GETXATTR with ENOSYS, so the kernel answers every later one itself (EOPNOTSUPP); it then refuses a
layer that has some.  LISTXATTR is still answered (an empty list, as on a normal pull's files).  A layer with extended attributes mounted first keeps
them served."""

from __future__ import annotations

import errno
import os

import pytest

from tests.fuse.conftest import BuiltLayer, ControlError, WorkerEnv, make_layer, rich_tar


@pytest.fixture(scope="module")
def rich_layer(tmp_path_factory: pytest.TempPathFactory) -> BuiltLayer:
    tmp = tmp_path_factory.mktemp("layer")
    return make_layer(rich_tar(tmp / "rich.tar"), tmp / "blobs")


def _errno(call, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def test_auto_worker_turns_xattrs_off_and_refuses_layers_with_them(
        worker_env: WorkerEnv, small_files: tuple[BuiltLayer, dict[str, bytes]],
        rich_layer: BuiltLayer) -> None:
    layer, contents = small_files
    worker_env.worker_args = ("--xattrs", "auto")
    worker_env.start_worker()
    mnt = worker_env.mount(layer, "plain")
    assert worker_env.control("worker.status")["xattrs"] is True  # undecided: could still take one
    # The first request reaches the worker, which answers ENOSYS; the kernel reports "not supported".
    assert _errno(os.getxattr, mnt / "d/f0000", "user.x") == errno.EOPNOTSUPP
    assert _errno(os.getxattr, mnt / "d/f0001", "trusted.overlay.metacopy") == errno.EOPNOTSUPP
    assert os.listxattr(mnt / "d/f0002") == []
    assert (mnt / "d/f0003").read_bytes() == contents["d/f0003"]
    assert worker_env.control("worker.status")["xattrs"] is False
    with pytest.raises(ControlError) as refused:
        worker_env.mount(rich_layer, "rich")
    assert refused.value.code == "failed_precondition" and "extended attributes" in str(refused.value)
    assert not os.path.ismount(worker_env.tmp / "mnt" / "rich")


def test_auto_worker_with_a_layer_that_has_xattrs_serves_them(
        worker_env: WorkerEnv, small_files: tuple[BuiltLayer, dict[str, bytes]],
        rich_layer: BuiltLayer) -> None:
    worker_env.worker_args = ("--xattrs", "auto")
    worker_env.start_worker()
    rich = worker_env.mount(rich_layer, "rich")
    plain = worker_env.mount(small_files[0], "plain")
    assert os.getxattr(rich / "data/xattr.txt", "user.two") == b"second value"
    assert _errno(os.getxattr, plain / "d/f0000", "user.x") == errno.ENODATA  # asked and answered
    assert worker_env.control("worker.status")["xattrs"] is True


def test_default_worker_answers_every_xattr_request(
        worker_env: WorkerEnv, small_files: tuple[BuiltLayer, dict[str, bytes]]) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(small_files[0], "plain")
    for _ in range(2):
        assert _errno(os.getxattr, mnt / "d/f0000", "user.x") == errno.ENODATA
    assert os.listxattr(mnt / "d/f0000") == []
