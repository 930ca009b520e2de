"""Mounting eStargz layers through `lazyd serve` (real registry, real FUSE workers)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from lazyd.api.messages import ApiError
from lazyd.estargz.inodes import InodeTable
from tests.daemon.conftest import DaemonProc, via
from tests.fuzz.blobs import toc_of as blob_toc, with_toc
from tests.support.treecheck import check_tree
from tests.support.estargz_images import EStargzImage, build_layers, push_layers
from tests.support.layer_fetch import fetch_concurrently, toc_of
from tests.support.registry import Registry, start_registry
from tests.support.tcpproxy import TCPProxy

NO_BACKGROUND = "prefetch = false\nbackground_fetch = false"


def test_busybox_layers_match_source(daemon: DaemonProc, busybox: EStargzImage) -> None:
    with daemon.client() as c:
        for i, layer in enumerate(busybox.layers):
            mp = daemon.mountpoint(f"l{i}")
            r = c.mount(busybox.ref, layer.digest, str(mp))
            assert r.toc_digest == layer.toc_digest and r.layer_size == layer.size
            assert check_tree(mp, layer.tar) > 10
            # The fetcher handed the worker its inode table: the worker parsed no TOC.
            dump = daemon.root / "layers" / layer.digest.replace(":", "-") / "inodes.msgpack"
            assert len(InodeTable.loads(dump.read_bytes(), layer.toc_digest)) > 10
        st = c.status()
        assert [m.state for m in st.mounts] == ["ready", "ready"]
        assert st.mounts[0].layer.prefetch_state == "done"  # layer 0 has a prioritized file
        c.unmount(str(daemon.mountpoints[0]))
        assert not os.path.ismount(daemon.mountpoints[0])
        assert len(c.mounts().mounts) == 1
    assert "unusable" not in "".join(p.read_text() for p in daemon.root.glob("workers/*/worker.log"))


@pytest.mark.slow
def test_debian_python_layers_match_source(daemon: DaemonProc, debian: EStargzImage) -> None:
    with daemon.client() as c:
        for i, layer in enumerate(debian.layers):
            mp = daemon.mountpoint(f"deb{i}")
            c.mount(debian.ref, layer.digest, str(mp))  # TOC digest from the manifest annotation
            assert check_tree(mp, layer.tar) > 100


@pytest.mark.slow
def test_small_file_from_big_layer_fetches_under_1mb(daemon_factory, debian: EStargzImage, proxy: TCPProxy) -> None:
    d = daemon_factory(extra=NO_BACKGROUND).start()
    layer = debian.layers[0]
    assert layer.size >= 50 * 1000 * 1000
    mp = d.mountpoint("big")
    with d.client() as c:
        c.mount(via(debian.ref, proxy), layer.digest, str(mp), layer.toc_digest)
        with tarfile.open(layer.tar) as tar:
            want = tar.extractfile("./etc/os-release" if "./etc/os-release" in tar.getnames() else "etc/os-release")
            want_bytes = want.read()
        assert (mp / "etc/os-release").read_bytes() == want_bytes
        print(f"layer {layer.size} bytes; fetched {proxy.bytes_down} bytes through the proxy "
              f"({len(proxy.range_requests(layer.digest))} range requests) to mount and read etc/os-release")
        assert proxy.bytes_down < 1_000_000, f"{proxy.bytes_down} bytes fetched for one small file"
        st = c.status()
        assert st.mounts[0].layer.demand_bytes > 0


def test_32_threads_same_chunk_one_request(daemon_factory, busybox: EStargzImage, proxy: TCPProxy) -> None:
    d = daemon_factory(extra=NO_BACKGROUND).start()
    layer = busybox.layers[1]
    mp = d.mount_layer(via(busybox.ref, proxy), layer, "dedupe")
    before = len(proxy.range_requests(layer.digest))
    barrier = threading.Barrier(32)
    results: list[bytes] = []

    def read() -> None:
        barrier.wait()
        with open(mp / "data/big.bin", "rb") as f:
            f.seek(300 * 1024)
            results.append(f.read(4096))

    threads = [threading.Thread(target=read) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with tarfile.open(layer.tar) as tar:
        data = tar.extractfile("data/big.bin").read()
    assert results == [data[300 * 1024 : 304 * 1024]] * 32
    assert len(proxy.range_requests(layer.digest)) - before == 1


def test_32_concurrent_fetch_requests_one_registry_request(daemon_factory, busybox: EStargzImage,
                                                          proxy: TCPProxy) -> None:
    """The fetcher's dedupe, driven directly over the API by 32 threads on 32 connections."""
    d = daemon_factory(extra=NO_BACKGROUND).start()
    layer = busybox.layers[1]
    d.mount_layer(via(busybox.ref, proxy), layer, "dedupe2")
    toc = toc_of(layer.blob)
    chunk = toc.file_chunks(toc.lookup("data/big.bin"))[5]
    before = len(proxy.range_requests(layer.digest))
    errors = fetch_concurrently(d.socket, layer.digest, [(chunk.blob_offset, chunk.inner_offset)])
    assert not errors
    assert len(proxy.range_requests(layer.digest)) - before == 1


def test_clean_restart_refetches_nothing(daemon_factory, busybox: EStargzImage, proxy: TCPProxy) -> None:
    d = daemon_factory(extra=NO_BACKGROUND).start()
    layer = busybox.layers[1]
    ref = via(busybox.ref, proxy)
    mp = d.mount_layer(ref, layer, "restart")
    check_tree(mp, layer.tar)
    assert proxy.range_requests(layer.digest)
    d.shutdown()
    assert not os.path.ismount(mp), "the clean stop must unmount"
    assert not d.worker_pids(), "the clean stop must stop the workers"
    proxy.reset()
    d.start()
    with d.client() as c:
        c.mount(ref, layer.digest, str(mp), layer.toc_digest)
    check_tree(mp, layer.tar)
    assert proxy.range_requests(layer.digest) == []
    assert proxy.bytes_down == 0


def test_corrupted_chunk_gives_eio_for_that_file_only(daemon_factory, registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    files = {f"d/f{i}.bin": hashlib.sha256(str(i).encode()).digest() * 2048 for i in range(4)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    tar_path = tmp_path / "layer.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src / "d", arcname="d")
    (layer,) = build_layers([tar_path], tmp_path / "esgz")
    image = push_layers(registry.host, "corrupt:t", [layer])
    toc = toc_of(layer.blob)
    victim = toc.file_chunks(toc.lookup("d/f2.bin"))[0]
    blob = registry.blob_path(layer.digest)
    raw = bytearray(blob.read_bytes())
    pos = (victim.blob_offset + victim.blob_end) // 2
    raw[pos] ^= 0xFF
    blob.write_bytes(bytes(raw))

    d = daemon_factory(extra=NO_BACKGROUND).start()
    mp = d.mountpoint("corrupt")
    with d.client() as c:
        c.mount(image.ref, layer.digest, str(mp), layer.toc_digest)
        with pytest.raises(OSError) as exc:
            (mp / "d/f2.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        for name, data in files.items():
            if name != "d/f2.bin":
                assert (mp / name).read_bytes() == data
        st = c.status()
        (m,) = st.mounts
        assert m.layer.verify_errors >= 1 and st.totals.verify_errors >= 1
        assert m.error and "f2.bin" in m.error
        assert m.state == "ready"


def test_mount_and_check_use_what_lazyd_already_knows(daemon_factory, busybox: EStargzImage,
                                                      tmp_path: Path) -> None:
    """After ``resolve``, a mount of the digest-pinned ref asks the registry for neither the
    manifest nor the blob size; ``check`` right after needs no ping. Once a request to the
    registry fails, ``check`` asks again and reports it unreachable."""
    reg = start_registry(tmp_path, name="short-lived")
    try:
        image = push_layers(reg.host, "bb:known", busybox.layers)
        d = daemon_factory(extra=NO_BACKGROUND).start()
        layer = image.layers[0]
        mp = d.mountpoint("known")
        with TCPProxy(reg.port) as proxy, d.client() as c:
            resolved = c.request("resolve", {"ref": via(image.ref, proxy)})
            proxy.reset()
            c.mount(resolved.ref, layer.digest, str(mp))  # TOC digest from the remembered manifest
            seen = [(r.method, r.path.rsplit("/", 2)[-2]) for r in proxy.requests()]
            assert seen and all(s == ("GET", "blobs") for s in seen), seen  # footer/TOC ranges only
            proxy.reset()
            check = c.check(str(mp))
            assert check.served and check.registry_reachable and proxy.requests() == []
            reg.stop()
            never_read = max((p for p in mp.rglob("*") if p.is_file() and not p.is_symlink()),
                             key=lambda p: p.stat().st_size)  # far from the TOC: not read by the mount
            with pytest.raises(OSError) as exc:
                never_read.read_bytes()
            assert exc.value.errno == errno.EIO
            check = c.check(str(mp))
            assert not check.registry_reachable and check.error and "unreachable" in check.error
    finally:
        reg.stop()


def test_a_toc_the_fetcher_rejects_undoes_the_workers_mount(daemon_factory, registry: Registry,
                                                            busybox: EStargzImage, tmp_path: Path) -> None:
    """The worker mounts from the saved TOC while the fetcher parses it. A TOC whose digest
    matches but whose last chunk starts at the TOC's own offset is accepted by the worker
    (which is not told the TOC offset) and refused by the fetcher: the mount fails with the
    fetcher's error (its TOC read once), nothing stays mounted or recorded, and the next mount works."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(b"%d\n" % i * 1000)
    tar_path = tmp_path / "layer.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(3):
            tar.add(src / f"f{i}", arcname=f"f{i}")
    (good,) = build_layers([tar_path], tmp_path / "esgz")
    toc_offset, doc = blob_toc(good.blob.read_bytes())
    last = [e for e in doc["entries"] if e["type"] in ("reg", "chunk") and e.get("offset")][-1]
    last["offset"] = toc_offset
    toc_json = json.dumps(doc).encode()
    bad_blob = tmp_path / "bad.esgz"
    bad_blob.write_bytes(with_toc(good.blob.read_bytes(), toc_json))
    data = bad_blob.read_bytes()
    bad = dataclasses.replace(good, blob=bad_blob, digest="sha256:" + hashlib.sha256(data).hexdigest(),
                              size=len(data), toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest())
    image = push_layers(registry.host, "late-refusal:t", [bad])

    d = daemon_factory(extra=NO_BACKGROUND).start()
    mp = d.mountpoint("late")
    with d.client() as c, TCPProxy(registry.port) as proxy:
        with pytest.raises(ApiError) as exc:
            c.mount(via(image.ref, proxy), bad.digest, str(mp), bad.toc_digest)
        assert exc.value.code == "not_estargz", exc.value
        assert f"is not before the TOC at {toc_offset}" in exc.value.message
        gets = [r for r in proxy.requests() if r.method == "GET" and r.path.endswith(bad.digest)]
        assert len(gets) == 1, gets  # one tail read: the refused TOC is not fetched again
        assert not os.path.ismount(mp) and not any(mp.iterdir())
        assert c.status().mounts == [] and not list((d.root / "mounts").glob("*.json"))
        worker_log = "".join(p.read_text() for p in d.root.glob("workers/*/worker.log"))
        assert " mounted " in worker_log and "unmounted " in worker_log  # it mounted, then it was undone
        layer = busybox.layers[0]
        c.mount(busybox.ref, layer.digest, str(mp), layer.toc_digest)
        assert (mp / "bin/busybox").stat().st_size > 0
