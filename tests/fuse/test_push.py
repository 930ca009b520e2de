"""The pyfuse3 binding's push: a listed directory's stored small files reach the page cache
before their READ, with exactly the tar's bytes; nothing is pushed that is not stored."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lazyd.cache.store import ChunkKey, ChunkStore
from tests.fuse.conftest import FILES, BuiltLayer, worker_env_in
from tests.support.procs import wait_until

def _read_all(mnt: Path, contents: dict[str, bytes]) -> None:
    for name in sorted(os.listdir(mnt / "d")):
        assert (mnt / "d" / name).read_bytes() == contents[f"d/{name}"], name


@pytest.mark.parametrize("backend", ["pyfuse3", "llfuse"])
def test_listed_stored_files_are_pushed_and_need_no_read(
        tmp_path: Path, small_files: tuple[BuiltLayer, dict[str, bytes]], backend: str) -> None:
    layer, contents = small_files
    with worker_env_in(tmp_path, backend) as env:
        env.start_worker()
        _read_all(env.mount(layer, "fill"), contents)  # every chunk now in the store
        mnt = env.mount(layer, "again")  # new inodes: nothing of them in the page cache
        assert len(os.listdir(mnt / "d")) == FILES + 2
        assert (mnt / "d/f0000").read_bytes() == contents["d/f0000"]
        if backend == "pyfuse3":
            # The pusher runs beside the READ: wait for it, then no file needs a READ.
            wait_until(lambda: env.mount_status("again")["pushed_files"] >= FILES - 1, 10, "the push")
        _read_all(mnt, contents)
        st = env.mount_status("again")
    if backend == "pyfuse3":
        # f0000, the big file (two READs of 128 KiB, never pushed), and nothing else.
        assert st["pushed_files"] == FILES - 1, st
        assert st["reads"] <= 3, st
        assert st["pushed_bytes"] == sum(len(v) for k, v in contents.items() if k not in ("d/big", "d/f0000"))
    else:
        assert st["pushed_files"] == 0 and st["reads"] >= FILES, st


def test_files_not_in_the_store_are_not_pushed_and_read_right(
        tmp_path: Path, small_files: tuple[BuiltLayer, dict[str, bytes]]) -> None:
    layer, contents = small_files
    with worker_env_in(tmp_path, "pyfuse3") as env:
        env.start_worker()
        mnt = env.mount(layer, "cold")
        names = sorted(os.listdir(mnt / "d"))
        first = "f0000"
        assert (mnt / "d" / first).read_bytes() == contents[f"d/{first}"]
        time.sleep(0.5)  # let a (wrong) push happen if it would
        st = env.mount_status("cold")
        stored = sum(1 for n in names if n not in ("big", "empty", first) and _stored(env.store, layer, n))
        assert st["pushed_files"] == stored, (st, stored)  # only what the fetch of the first read stored
        _read_all(mnt, contents)
        assert env.mount_status("cold")["reads"] >= FILES - stored


def _stored(store: ChunkStore, layer: BuiltLayer, name: str) -> bool:
    entry = next(e for e in layer.local.toc.entries if e.name == f"d/{name}" and e.type == "reg")
    return store.peek(ChunkKey(layer.digest, entry.offset, entry.inner_offset)) is not None


def test_peek_many_returns_only_stored_chunks(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "cache", 1 << 30)
    try:
        keys = [ChunkKey("sha256:" + "a" * 64, off, 0) for off in range(0, 1200 * 10, 10)]
        store.put_many([(k, bytes([i % 251]) * (i + 1)) for i, k in enumerate(keys) if i % 3])
        got = store.peek_many(keys + [ChunkKey("sha256:" + "b" * 64, 0, 0)])
        assert set(got) == {k for i, k in enumerate(keys) if i % 3}
        assert all(got[k] == bytes([i % 251]) * (i + 1) for i, k in enumerate(keys) if i % 3)
    finally:
        store.close()
