"""A worker mount serves exactly the source tar's tree, bytes and metadata."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time

import pytest

from tests.fuse.conftest import BuiltLayer, WorkerEnv, make_layer, read_file, rich_tar
from tests.support.treecheck import check_tree


@pytest.fixture(scope="module")
def rich_layer(tmp_path_factory: pytest.TempPathFactory) -> BuiltLayer:
    tmp = tmp_path_factory.mktemp("layer")
    return make_layer(rich_tar(tmp / "rich.tar"), tmp / "blobs")


def test_tree_bytes_and_metadata_match_tar(worker_env: WorkerEnv, rich_layer: BuiltLayer) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(rich_layer, "rich")
    checked = check_tree(mnt, rich_layer.tar)
    assert checked > 300
    # The layer is also visible under the worker's FUSE root with the same inodes.
    assert os.stat(worker_env.state / "fuse" / "rich" / "bin/tool").st_ino == os.stat(mnt / "bin/tool").st_ino
    st = os.statvfs(mnt)
    assert st.f_files > 300 and st.f_bfree == 0


def test_inode_numbers_are_stable_and_distinct_across_layers(worker_env: WorkerEnv, rich_layer: BuiltLayer) -> None:
    worker_env.start_worker()
    a = worker_env.mount(rich_layer, "a")
    b = worker_env.mount(rich_layer, "b")
    ino_a = {p: os.lstat(a / p).st_ino for p in ("bin", "bin/tool", "many/f0001", "deep/implied")}
    ino_b = {p: os.lstat(b / p).st_ino for p in ino_a}
    assert not set(ino_a.values()) & set(ino_b.values())
    assert {p: i & 0xFFFFFFFF for p, i in ino_a.items()} == {p: i & 0xFFFFFFFF for p, i in ino_b.items()}
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
    assert {p: os.lstat(a / p).st_ino for p in ino_a} == ino_a


def test_read_only_everywhere(worker_env: WorkerEnv, rich_layer: BuiltLayer) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(rich_layer, "ro")
    for action in (
        lambda: open(mnt / "etc/hostname", "w"),
        lambda: open(mnt / "etc/newfile", "w"),
        lambda: os.mkdir(mnt / "newdir"),
        lambda: os.unlink(mnt / "etc/hostname"),
        lambda: os.chmod(mnt / "etc/hostname", 0o777),
        lambda: os.setxattr(mnt / "etc/hostname", "user.x", b"1"),
        lambda: os.symlink("x", mnt / "lnk"),
        lambda: os.rename(mnt / "etc/hostname", mnt / "etc/h2"),
    ):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno in (errno.EROFS, errno.EPERM)
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "no/such/file")
    assert read_file(mnt / "etc/hostname") == b"lazyd\n"


def test_second_read_comes_from_page_cache(worker_env: WorkerEnv, rich_layer: BuiltLayer) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(rich_layer, "pc")
    first = read_file(mnt / "data/big.bin")
    after_first = _settled(worker_env, "pc")
    assert after_first["reads"] > 0 and after_first["bytes_read"] == len(first)
    assert after_first["cache_misses"] >= 2  # two 4 MiB chunks fetched on demand
    fetches = worker_env.fetcher.stats.requests
    for _ in range(3):
        assert read_file(mnt / "data/big.bin") == first
    after = worker_env.mount_status("pc")
    # Three more passes over 5 MiB reach the worker for at most a few pages: the kernel may
    # drop clean page-cache pages at any time, and here it drops a handful (single 4-8 KiB
    # reads) in about one run of ten. Without the page cache every pass would repeat all
    # of the first pass's 128 KiB reads.
    assert after["bytes_read"] - after_first["bytes_read"] <= 64 * 1024, (after_first, after)
    assert after["reads"] - after_first["reads"] <= 16 and after["cache_misses"] == after_first["cache_misses"]
    assert worker_env.fetcher.stats.requests == fetches


def _settled(env: WorkerEnv, mount_id: str) -> dict:
    """The mount's status once its read count has stopped moving for 0.2 s."""
    last = env.mount_status(mount_id)
    for _ in range(50):
        time.sleep(0.2)
        now = env.mount_status(mount_id)
        if now["reads"] == last["reads"]:
            return now
        last = now
    raise AssertionError(f"reads of {mount_id} never settled: {last}")


def test_kernel_opens_files_without_asking_the_worker(worker_env: WorkerEnv, rich_layer: BuiltLayer) -> None:
    """With lazyd's llfuse build the first OPEN is answered ENOSYS (kernel no_open):
    later opens send no OPEN/RELEASE, reads get the inode, and the page cache stays."""
    worker_env.start_worker()
    mnt = worker_env.mount(rich_layer, "noopen")
    assert worker_env.control("worker.status")["no_open"] is True, (
        "llfuse lacks lazyd's readino patch: run contrib/llfuse/build.sh")
    names = sorted((mnt / "many").iterdir())[:200]
    first = {p.name: read_file(p) for p in names}
    assert first["f0003"] == b"small file 3\n" * 4
    after_first = _settled(worker_env, "noopen")  # async readahead may still be on its way
    assert after_first["opens"] == 1  # only the one that switched the kernel to no_open
    assert after_first["reads"] >= len(names)
    for _ in range(3):
        assert {p.name: read_file(p) for p in names} == first
    after = worker_env.mount_status("noopen")
    assert after["opens"] == 1  # the kernel opened every file itself
    # Reads stay in the page cache, but for the odd page the kernel dropped (see the test above).
    assert after["reads"] - after_first["reads"] <= 16, (after_first, after)
    # Files in other layers of the same worker are still told apart by inode.
    other = worker_env.mount(rich_layer, "noopen2")
    assert read_file(other / "many/f0005") == first["f0005"]
    assert read_file(other / "etc/hostname") == b"lazyd\n"


def test_concurrent_misses_on_one_chunk_make_one_fetch(worker_env: WorkerEnv, rich_layer: BuiltLayer) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(rich_layer, "sf")
    worker_env.fetcher.delay = 0.5
    results: list[bytes] = []
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            with open(mnt / "data/big.bin", "rb", buffering=0) as f:
                f.seek(i * 256 * 1024)  # distinct pages, all inside the first 4 MiB chunk
                results.append(f.read(4096))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 16
    assert worker_env.fetcher.stats.requests == 1
    assert worker_env.fetcher.stats.chunks == 1
