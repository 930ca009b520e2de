"""Fixtures for the FUSE worker tests: eStargz blobs, a local fetcher, worker processes."""

from __future__ import annotations

import hashlib
import io
import json
import random
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lazyd.api import wire
from lazyd.cache.store import ChunkStore
from lazyd import mounttable as mounts
from tests.fuse.fetcher import LocalFetcher, LocalLayer
from tests.support.tars import write_tar
from tests.support.procs import Proc, wait_until

FETCH_TIMEOUT = 2.0


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def control(sock_path: Path, op: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """One request on a worker's control socket; raises ControlError on an error reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        wire.send_frame(s, {"id": 1, "op": op, "args": args or {}})
        reply = wire.recv_frame(s)
    if not reply["ok"]:
        raise ControlError(reply["error"]["code"], reply["error"]["message"])
    return reply["result"]


def build_blob(tar_path: Path, out: Path, chunk_size: int | None = None) -> tuple[Path, str]:
    """Convert a layer tar to an eStargz blob with lazyd.estargz; returns (blob, blob digest)."""
    from lazyd.estargz import BuildOptions, build

    opts = BuildOptions() if chunk_size is None else BuildOptions(chunk_size=chunk_size)
    result = build(tar_path, out, opts)
    return out, result.blob_digest


@dataclass
class BuiltLayer:
    tar: Path
    blob: Path
    digest: str
    local: LocalLayer
    toc_path: Path

    @property
    def toc_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.local.toc_json).hexdigest()


def make_layer(tar_path: Path, workdir: Path, chunk_size: int | None = None) -> BuiltLayer:
    workdir.mkdir(parents=True, exist_ok=True)
    blob, digest = build_blob(tar_path, workdir / (tar_path.stem + ".estargz"), chunk_size)
    local = LocalLayer.load(blob, digest)
    toc_path = workdir / (tar_path.stem + ".toc.json")
    toc_path.write_bytes(local.toc_json)
    return BuiltLayer(tar_path, blob, digest, local, toc_path)


# -- source tars -----------------------------------------------------------------


def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
         uid: int = 0, gid: int = 0, mtime: int = 1_600_000_000, linkname: str = "", dev: tuple[int, int] = (0, 0),
         xattrs: dict[str, str] | None = None) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    ti.mtime = mtime
    ti.linkname = linkname
    ti.devmajor, ti.devminor = dev
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    if kind == tarfile.REGTYPE:
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        tf.addfile(ti)


def rich_tar(path: Path) -> Path:
    """A layer with every entry kind, odd modes/owners/times, hardlinks, xattrs, implied dirs."""
    rnd = __import__("random").Random(4)
    big = rnd.randbytes(5 * 1024 * 1024 + 777)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "etc", tarfile.DIRTYPE, mode=0o755, mtime=1_500_000_000)
        _add(tf, "etc/hostname", data=b"lazyd\n", mode=0o644, mtime=1_500_000_001)
        _add(tf, "etc/shadow", data=b"root:*:1::::::\n", mode=0o640, uid=0, gid=42, mtime=1_500_000_002)
        _add(tf, "bin", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "bin/tool", data=rnd.randbytes(300_000), mode=0o4755, mtime=1_234_567_890)
        _add(tf, "bin/alias", tarfile.LNKTYPE, linkname="bin/tool")
        _add(tf, "bin/alias2", tarfile.LNKTYPE, linkname="bin/tool")
        _add(tf, "bin/sh", tarfile.SYMTYPE, linkname="tool", mode=0o777, mtime=1_400_000_000)
        _add(tf, "bin/abs", tarfile.SYMTYPE, linkname="/etc/hostname", mode=0o777)
        _add(tf, "data", tarfile.DIRTYPE, mode=0o1777, uid=1000, gid=1001, mtime=1_300_000_000)
        _add(tf, "data/empty", data=b"", mode=0o600, uid=1000, gid=1001)
        _add(tf, "data/big.bin", data=big, mode=0o644)
        _add(tf, "data/xattr.txt", data=b"with xattrs\n", xattrs={"user.one": "1", "user.two": "second value"})
        _add(tf, "data/fifo", tarfile.FIFOTYPE, mode=0o600)
        _add(tf, "dev", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
        _add(tf, "dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(8, 0))
        _add(tf, "deep/implied/dirs/file.txt", data=b"parents are implied\n", mode=0o444)
        _add(tf, "gone.wh.x", data=b"not a whiteout, just a name\n")
        _add(tf, "etc/.wh.passwd", data=b"", mode=0o600)
        _add(tf, "var", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "var/.wh..wh..opq", data=b"", mode=0o600)
        _add(tf, "var/new", data=b"only this\n")
        _add(tf, "many", tarfile.DIRTYPE, mode=0o755)
        for i in range(300):
            _add(tf, f"many/f{i:04d}", data=f"small file {i}\n".encode() * (i % 7 + 1))
    return path


# -- a layer of small files and no extended attributes ----------------------------------

FILES = 300


@pytest.fixture(scope="session")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuiltLayer, dict[str, bytes]]:
    """A layer with ``FILES`` small random files in ``d/``, one empty file, and one of 200 KiB."""
    tmp = tmp_path_factory.mktemp("push")
    rnd = random.Random(5)
    contents = {f"d/f{i:04d}": rnd.randbytes(rnd.randrange(1, 3000)) for i in range(FILES)}
    contents["d/empty"] = b""
    contents["d/big"] = rnd.randbytes(200 * 1024)
    return make_layer(write_tar(tmp / "small.tar", ["d"], contents, pax=True), tmp / "blobs"), contents


# -- a running worker --------------------------------------------------------------


@dataclass
class WorkerEnv:
    tmp: Path
    state: Path
    store: ChunkStore
    fetcher: LocalFetcher
    proc: Proc | None = None
    backend: str = "llfuse"
    worker_args: tuple[str, ...] = ()

    @property
    def control_sock(self) -> Path:
        return self.state / "control.sock"

    def start_worker(self) -> Proc:
        argv = [sys.executable, "-m", "lazyd.fuse.worker", "--worker-id", "0", "--state-dir", str(self.state),
                "--fetcher-socket", str(self.fetcher.socket_path), "--cache-dir", str(self.store.directory),
                "--cache-size", str(1 << 30), "--fetch-timeout", str(FETCH_TIMEOUT), "--log-level", "debug",
                "--fuse-backend", self.backend, *self.worker_args]
        self.proc = Proc(argv, self.tmp / "worker.log")
        proc = self.proc

        def ready() -> bool:
            try:
                return json.loads((self.state / "worker.json").read_text())["pid"] == proc.pid
            except (OSError, ValueError):
                return not proc.alive()

        wait_until(ready, 20, "worker.json of the new worker")
        assert self.proc.alive(), self.proc.log_text()
        return self.proc

    def control(self, op: str, args: dict[str, Any] | None = None) -> Any:
        return control(self.control_sock, op, args)

    def mount(self, layer: BuiltLayer, mount_id: str, mountpoint: Path | None = None,
              inodes_path: Path | None = None) -> Path:
        self.fetcher.add(layer.local)
        mountpoint = mountpoint or self.tmp / "mnt" / mount_id
        self.control("worker.mount", {
            "mount_id": mount_id, "mountpoint": str(mountpoint), "layer_digest": layer.digest,
            "toc_digest": layer.toc_digest, "toc_path": str(layer.toc_path), "blob_size": layer.blob.stat().st_size,
            **({"inodes_path": str(inodes_path)} if inodes_path else {}),
        })
        return mountpoint

    def mount_status(self, mount_id: str) -> dict[str, Any]:
        return next(m for m in self.control("worker.status")["mounts"] if m["mount_id"] == mount_id)


def cleanup_mounts_under(root: Path) -> None:
    """Lazily unmount everything mounted below ``root`` (deepest first)."""
    prefix = str(root.resolve()) + "/"
    for point in sorted((p for p in mounts.mount_points() if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    """A fresh 1 GiB chunk store under ``tmp_path``."""
    s = ChunkStore(tmp_path / "cache", 1 << 30)
    try:
        yield s
    finally:
        s.close()


@contextmanager
def worker_env_in(tmp: Path, backend: str = "llfuse") -> Iterator[WorkerEnv]:
    """A chunk store and a running local fetcher under ``tmp``, for a worker started with ``start_worker``;
    on leaving, the worker is shut down, everything below ``tmp`` unmounted, fetcher and store closed."""
    store = ChunkStore(tmp / "cache", 1 << 30)
    fetcher = LocalFetcher(tmp / "fetcher.sock", store)
    fetcher.start()
    env = WorkerEnv(tmp, tmp / "worker", store, fetcher, backend=backend)
    try:
        yield env
    finally:
        if env.proc is not None and env.proc.alive():
            try:
                control(env.control_sock, "worker.shutdown", timeout=10)
            except Exception:
                pass
            env.proc.stop(timeout=10)
        cleanup_mounts_under(tmp)
        fetcher.stop()
        store.close()


@pytest.fixture(params=["llfuse", "pyfuse3"])
def worker_env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WorkerEnv]:
    """A worker environment; the tests that use it run once with each FUSE binding."""
    with worker_env_in(tmp_path, request.param) as env:
        yield env


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def wait_gone(proc: Proc, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proc.alive(), "worker did not exit"


def worker_info(env: WorkerEnv) -> dict[str, Any]:
    return json.loads((env.state / "worker.json").read_text())
