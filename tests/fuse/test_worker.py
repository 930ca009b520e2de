"""Worker process behaviour: control ops, errors, fetcher loss, shutdown, stale mounts."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest

from lazyd import mounttable as mounts
from lazyd.estargz import TOC
from lazyd.estargz.inodes import InodeTable, InodeTableError
from tests.fuse.conftest import (
    FETCH_TIMEOUT,
    BuiltLayer,
    ControlError,
    WorkerEnv,
    make_layer,
    read_file,
    rich_tar,
    wait_gone,
    worker_info,
)
from tests.support.procs import wait_until
from tests.support.treecheck import check_tree


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> BuiltLayer:
    tmp = tmp_path_factory.mktemp("layer")
    return make_layer(rich_tar(tmp / "rich.tar"), tmp / "blobs")


def test_worker_json_socket_mode_and_status(worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    proc = worker_env.start_worker()
    info = worker_info(worker_env)
    assert info["pid"] == proc.pid and info["worker_id"] == 0
    assert info["control_socket"] == str(worker_env.control_sock)
    assert info["fuse_root"] == str(worker_env.state / "fuse")
    assert stat.S_IMODE(os.stat(worker_env.control_sock).st_mode) == 0o600
    assert mounts.is_mounted(str(worker_env.state / "fuse"))
    mnt = worker_env.mount(layer, "m1")
    status = worker_env.control("worker.status")
    assert status["pid"] == proc.pid and status["fetcher_connected"] is True
    (m,) = status["mounts"]
    assert m == {"mount_id": "m1", "mountpoint": str(mnt), "layer_digest": layer.digest,
                 "toc_digest": layer.toc_digest, "blob_size": layer.blob.stat().st_size, "reads": 0,
                 "bytes_read": 0, "cache_hits": 0, "cache_misses": 0, "fetch_errors": 0, "last_error": None,
                 "opens": 0, "pushed_files": 0, "pushed_bytes": 0}
    assert status["fuse_binding"].startswith(f"{worker_env.backend} ") and status["fuse_binding"].endswith("+lazyd.readino")
    assert read_file(mnt / "etc/hostname") == b"lazyd\n"
    m = worker_env.mount_status("m1")
    assert (m["reads"], m["bytes_read"], m["cache_misses"]) == (1, 6, 1)
    assert read_file(mnt / "etc/shadow")
    assert worker_env.mount_status("m1")["cache_misses"] == 2


def test_control_errors(worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(layer, "m1")
    with pytest.raises(ControlError) as exc:
        worker_env.mount(layer, "m1", worker_env.tmp / "other")
    assert exc.value.code == "already_exists"
    with pytest.raises(ControlError) as exc:
        worker_env.mount(layer, "m2", mnt)
    assert exc.value.code == "already_exists"
    base = {"mount_id": "m3", "mountpoint": str(worker_env.tmp / "m3"), "layer_digest": layer.digest,
            "toc_digest": layer.toc_digest, "toc_path": str(layer.toc_path), "blob_size": 1}
    for bad in ({**base, "blob_size": "1"}, {k: v for k, v in base.items() if k != "toc_path"},
                {**base, "mount_id": "../x"}, {**base, "mountpoint": "relative"},
                {**base, "toc_digest": "sha256:" + "0" * 64}, {**base, "toc_path": str(worker_env.tmp / "nope")}):
        with pytest.raises(ControlError) as exc:
            worker_env.control("worker.mount", bad)
        assert exc.value.code == "invalid_request", bad
    with pytest.raises(ControlError) as exc:
        worker_env.control("worker.unmount", {"mount_id": "nope"})
    assert exc.value.code == "not_found"
    with pytest.raises(ControlError) as exc:
        worker_env.control("worker.frobnicate", {})
    assert exc.value.code == "unknown_op"
    busy = worker_env.tmp / "busy"
    busy.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(busy)], check=True)
    with pytest.raises(ControlError) as exc:
        worker_env.mount(layer, "m4", busy)  # someone else's mount is never covered
    assert exc.value.code == "already_exists"
    assert [m["mount_id"] for m in worker_env.control("worker.status")["mounts"]] == ["m1"]


def test_mount_uses_the_saved_inode_table_and_else_builds_and_saves_it(
        worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    """worker.mount loads ``inodes_path`` (InodeTable.dumps) when it belongs to the TOC;
    a damaged dump or one of another TOC is ignored with a warning, a missing one silently,
    and the table is built from the TOC and saved there, so the next mount loads it."""
    toc = TOC.parse(layer.toc_path.read_bytes(), layer.toc_digest)
    expected = InodeTable.from_toc(toc).dumps(layer.toc_digest)
    good = worker_env.tmp / "good.msgpack"
    good.write_bytes(expected)
    other = worker_env.tmp / "other.msgpack"
    other.write_bytes(InodeTable.from_toc(toc).dumps("sha256:" + "0" * 64))
    damaged = worker_env.tmp / "damaged.msgpack"
    damaged.write_bytes(expected[:-100])
    missing = worker_env.tmp / "nope"
    proc = worker_env.start_worker()
    for name, dump in (("good", good), ("other", other), ("damaged", damaged), ("missing", missing)):
        mnt = worker_env.mount(layer, name, inodes_path=dump)
        assert check_tree(mnt, layer.tar) > 300
        warned = f"inode table {dump} unusable" in proc.log_text()
        assert warned == (name in ("other", "damaged")), name
        assert dump.read_bytes() == expected, name  # kept as it was, or saved by the worker
    assert "not version 1 of" in proc.log_text()  # the other TOC's dump is named as such
    assert not list(worker_env.tmp.glob("*.tmp")), "a temporary dump was left behind"
    worker_env.mount(layer, "again", inodes_path=missing)
    assert proc.log_text().count(f"inode table {missing}") == 0


def test_inode_table_dump_round_trips_and_damage_is_refused(layer: BuiltLayer) -> None:
    table = InodeTable.from_toc(TOC.parse(layer.toc_path.read_bytes(), layer.toc_digest))
    dump = table.dumps(layer.toc_digest)
    again = InodeTable.loads(dump, layer.toc_digest)
    assert len(again) == len(table) and again.children(1) == table.children(1)
    assert [again.raw_attr(i) for i in range(1, len(table) + 1)] == [table.raw_attr(i) for i in range(1, len(table) + 1)]
    doc = msgpack.unpackb(dump, strict_map_key=False)
    damaged = []
    for where, value in ((4, {1: {b"x": len(table) + 1}}), (4, {1: {b"x": "2"}}), (5, {0: b"t"}),
                         (6, {1: {b"user.x": "not bytes"}}), (2, doc[2][:-1]), (7, "big")):
        bad = list(doc)
        bad[where] = value
        damaged.append(msgpack.packb(bad))
    for data in (*damaged, dump[:-1], b"", b"\x93\x01"):
        with pytest.raises(InodeTableError):
            InodeTable.loads(data, layer.toc_digest)


def test_unmount_removes_bind_and_layer(worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(layer, "m1")
    assert mounts.is_mounted(str(mnt))
    assert worker_env.control("worker.unmount", {"mount_id": "m1"}) == {}
    assert not mounts.is_mounted(str(mnt))
    # The kernel forgets the cached entry asynchronously (llfuse.invalidate_entry).
    wait_until(lambda: not (worker_env.state / "fuse" / "m1").exists(), 5, "the layer directory to go")
    assert worker_env.control("worker.status")["mounts"] == []
    worker_env.mount(layer, "m1")  # the id and mountpoint can be used again
    assert read_file(mnt / "etc/hostname") == b"lazyd\n"


def test_corrupt_chunk_gives_eio_for_that_file_only(worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(layer, "bad")
    other = worker_env.mount(layer, "good")
    (tool,) = layer.local.toc.file_chunks(layer.local.toc.lookup("bin/tool"))
    worker_env.fetcher.corrupt.add((layer.digest, tool.blob_offset))
    with pytest.raises(OSError) as exc:
        read_file(mnt / "bin/tool")
    assert exc.value.errno == errno.EIO
    m = worker_env.mount_status("bad")
    assert m["fetch_errors"] >= 1 and "digest_mismatch" in m["last_error"]
    assert read_file(mnt / "etc/hostname") == b"lazyd\n"
    assert read_file(other / "etc/shadow").startswith(b"root")
    with pytest.raises(OSError):
        read_file(other / "bin/tool")  # the same chunk is bad for every mount of that layer
    assert worker_env.control("worker.status")["fetcher_connected"]
    worker_env.fetcher.corrupt.clear()  # a later good fetch works without remount
    assert len(read_file(mnt / "bin/tool")) == 300_000


def test_fetcher_death_cached_reads_work_uncached_fail_fast_then_recover(
        worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(layer, "m")
    cached = read_file(mnt / "etc/hostname")
    worker_env.fetcher.stop()
    time.sleep(0.2)
    assert worker_env.control("worker.status")["fetcher_connected"] is False
    Path("/proc/sys/vm/drop_caches").write_text("1")  # page cache gone: the chunk store still has it
    assert read_file(mnt / "etc/hostname") == cached
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        read_file(mnt / "etc/shadow")
    took = time.monotonic() - t0
    assert exc.value.errno == errno.EIO
    assert FETCH_TIMEOUT - 0.5 <= took <= FETCH_TIMEOUT + 3, took
    assert "unavailable" in worker_env.mount_status("m")["last_error"]
    # A read waiting while the fetcher comes back succeeds without remount.
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(read_file(mnt / "many/f0007")))
    t.start()
    time.sleep(0.3)
    worker_env.fetcher.start()
    t.join(10)
    assert result == [b"small file 7\n"]
    assert read_file(mnt / "etc/shadow").startswith(b"root")
    assert worker_env.control("worker.status")["fetcher_connected"] is True


def test_shutdown_unmounts_everything_and_exits(worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    proc = worker_env.start_worker()
    a = worker_env.mount(layer, "a")
    b = worker_env.mount(layer, "b")
    with open(a / "etc/hostname", "rb"):  # an open file must not keep the worker alive
        assert worker_env.control("worker.shutdown") == {}
    wait_gone(proc)
    assert proc.popen.returncode == 0, proc.log_text()
    for p in (a, b, worker_env.state / "fuse"):
        assert not mounts.is_mounted(str(p)), p
    assert not (worker_env.state / "worker.json").exists()
    assert not worker_env.control_sock.exists()


def test_sigterm_unmounts_everything(worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    proc = worker_env.start_worker()
    a = worker_env.mount(layer, "a")
    proc.popen.send_signal(signal.SIGTERM)
    wait_gone(proc)
    assert not mounts.is_mounted(str(a)) and not mounts.is_mounted(str(worker_env.state / "fuse"))


def test_stale_dead_mounts_are_cleaned(worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    proc = worker_env.start_worker()
    mnt = worker_env.mount(layer, "m")
    assert read_file(mnt / "etc/hostname") == b"lazyd\n"
    proc.popen.send_signal(signal.SIGKILL)
    wait_gone(proc)
    assert mounts.is_dead(str(mnt)) and mounts.is_dead(str(worker_env.state / "fuse"))
    with pytest.raises(OSError) as exc:
        os.listdir(mnt / "etc")
    assert exc.value.errno == errno.ENOTCONN
    # A successor cleans the dead FUSE root at start and the dead bind at mount time.
    worker_env.start_worker()
    assert not mounts.is_dead(str(worker_env.state / "fuse"))
    worker_env.mount(layer, "m", mnt)
    assert read_file(mnt / "etc/hostname") == b"lazyd\n"
    assert worker_env.fetcher.stats.requests == 1  # the chunk store kept the chunk across workers
    assert mounts.mount_points().count(str(mnt)) == 1


def test_cached_reads_proceed_while_a_fetch_waits(worker_env: WorkerEnv, layer: BuiltLayer) -> None:
    worker_env.start_worker()
    mnt = worker_env.mount(layer, "m")
    assert read_file(mnt / "etc/hostname") == b"lazyd\n"
    Path("/proc/sys/vm/drop_caches").write_text("1")
    worker_env.fetcher.delay = 1.5
    slow: list[bytes] = []
    t = threading.Thread(target=lambda: slow.append(read_file(mnt / "etc/shadow")))
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert read_file(mnt / "etc/hostname") == b"lazyd\n"  # from the chunk store, not the page cache
    assert time.monotonic() - t0 < 0.5
    assert worker_env.control("worker.status")["mounts"][0]["mount_id"] == "m"  # control socket answers too
    t.join(10)
    assert slow and slow[0].startswith(b"root")


def test_malformed_control_messages_get_error_replies(worker_env: WorkerEnv) -> None:
    import socket

    from lazyd.api import wire

    proc = worker_env.start_worker()
    for request in ({"id": 1, "op": 5, "args": {}}, {"id": 2, "op": "worker.mount", "args": [1, 2]},
                    {"id": 3, "op": "worker.unmount", "args": {"mount_id": "x", "extra": 1}}):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(worker_env.control_sock))
            wire.send_frame(s, request)
            reply = wire.recv_frame(s)
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_request", reply
    with socket.socket(socket.AF_UNIX) as s:  # not msgpack at all, and an oversized length prefix
        s.connect(str(worker_env.control_sock))
        s.sendall(b"\x00\x00\x00\x03\xc1\xc1\xc1")
        assert wire.recv_frame(s)["error"]["code"] == "invalid_request"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(worker_env.control_sock))
        s.sendall(b"\xff\xff\xff\xff")
        assert wire.recv_frame(s)["error"]["code"] == "invalid_request"
    assert proc.alive() and worker_env.control("worker.status")["mounts"] == []
