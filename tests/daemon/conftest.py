"""Fixtures for daemon tests: a real registry, eStargz images, a byte-counting proxy and `lazyd serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lazyd.api.client import Client
from lazyd.api.messages import ApiError
from lazyd.estargz import BuildOptions
from tests.support.estargz_images import EStargzImage, build_layers, push_layers
from tests.support.images import build_busybox, layer_tars
from tests.support.procs import Proc, wait_until
from tests.support.registry import Registry, start_registry
from tests.support.tcpproxy import TCPProxy


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("daemon-registry"))
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def busybox_tars(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The busybox image with deletions (2 layers; the second has a 9 MiB random file)."""
    work = tmp_path_factory.mktemp("busybox")
    build_busybox(work / "layout", "t", with_deletions=True)
    return layer_tars(work / "layout", "t", work / "tars")


@pytest.fixture(scope="session")
def busybox(registry: Registry, busybox_tars: list[Path], tmp_path_factory: pytest.TempPathFactory) -> EStargzImage:
    """busybox eStargz image pushed as busybox-esgz:t, with /bin/busybox prioritized in layer 0."""
    out = tmp_path_factory.mktemp("busybox-esgz")
    layers = build_layers(busybox_tars[:1], out / "0", BuildOptions(prioritized=["bin/busybox"], allow_missing=True))
    layers += build_layers(busybox_tars[1:], out / "1", BuildOptions(chunk_size=256 * 1024))
    return push_layers(registry.host, "busybox-esgz:t", layers)


@pytest.fixture
def proxy(registry: Registry) -> Iterator[TCPProxy]:
    with TCPProxy(registry.port) as p:
        yield p


def via(image_ref: str, proxy: TCPProxy) -> str:
    """The image reference, through the proxy."""
    _, rest = image_ref.split("/", 1)
    return f"{proxy.host}/{rest}"


@dataclass
class DaemonProc:
    """A running `lazyd serve` with its own root and socket."""

    root: Path
    socket: str
    config: Path
    log: Path
    workers: int = 1
    proc: Proc | None = None
    mountpoints: list[Path] = field(default_factory=list)

    def start(self, timeout: float = 30) -> DaemonProc:
        self.proc = Proc([sys.executable, "-m", "lazyd.cli.lazyd", "serve", "--config", str(self.config),
                          "--root", str(self.root), "--socket", self.socket, "--log-level", "debug"], self.log)
        wait_until(lambda: self._ready() or not self.proc.alive(), timeout, "lazyd serve to answer")
        if not self.proc.alive():
            raise RuntimeError(f"lazyd serve exited:\n{self.log.read_text()[-4000:]}")
        return self

    def _ready(self) -> bool:
        try:
            with Client(self.socket, timeout=5, connect_timeout=0.5) as c:
                st = c.status()
                return all(w.state == "ready" for w in st.workers) and len(st.workers) == self.workers
        except ApiError:
            return False

    def client(self) -> Client:
        return Client(self.socket, timeout=120)

    def mountpoint(self, name: str) -> Path:
        mp = self.root.parent / "mnt" / name
        mp.mkdir(parents=True, exist_ok=True)
        self.mountpoints.append(mp)
        return mp

    def shutdown(self) -> None:
        """The clean stop (unmounts)."""
        with self.client() as c:
            c.shutdown()
        assert self.proc is not None
        self.proc.popen.wait(30)
        self.proc.stop()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.stop(signal.SIGKILL)

    def worker_pids(self) -> list[int]:
        pids = []
        for info in (self.root / "workers").glob("*/worker.json"):
            try:
                pids.append(int(json.loads(info.read_text())["pid"]))
            except (OSError, ValueError, KeyError):
                pass
        return pids

    def cleanup(self) -> None:
        """Stop everything this daemon started, whatever state it is in."""
        if self.proc is not None and self.proc.alive():
            try:
                with Client(self.socket, timeout=30, connect_timeout=1) as c:
                    c.shutdown()
                self.proc.popen.wait(30)
            except (ApiError, subprocess.TimeoutExpired):
                pass
            self.proc.stop()
        for pid in self.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc_dir in Path("/proc").iterdir():  # workers whose worker.json is gone
            if not proc_dir.name.isdigit():
                continue
            try:
                cmd = (proc_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if b"lazyd.fuse.worker" in cmd and str(self.root).encode() in cmd:
                try:
                    os.kill(int(proc_dir.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.2)
        for mp in self.mountpoints + [w / "fuse" for w in (self.root / "workers").glob("*")]:
            for _ in range(4):
                if subprocess.run(["umount", "-l", str(mp)], capture_output=True).returncode != 0:
                    break


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[callable]:
    made: list[DaemonProc] = []

    def make(name: str = "d", workers: int = 1, extra: str = "", registry_extra: str = "") -> DaemonProc:
        base = tmp_path / name
        base.mkdir()
        config = base / "config.toml"
        config.write_text(f"workers = {workers}\ncache_size = 1073741824\nfetch_timeout = 10.0\n{extra}\n"
                          f"[registry]\nhosts_dir = \"{base / 'certs.d'}\"\nretries = 0\n{registry_extra}\n")
        d = DaemonProc(root=base / "root", socket=str(base / "run" / "lazyd.sock"), config=config,
                       log=base / "lazyd.log", workers=workers)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.cleanup()


@pytest.fixture
def daemon(daemon_factory: callable) -> DaemonProc:
    return daemon_factory().start()


@pytest.fixture(scope="session")
def debian(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> EStargzImage:
    """The debian+python3 image (2 layers, the first about 50 MB compressed) as eStargz."""
    from tests.support.images import debian_python_layout

    work = tmp_path_factory.mktemp("debian")
    tars = layer_tars(debian_python_layout(), "latest", work / "tars")
    layers = build_layers(tars, work / "esgz")
    return push_layers(registry.host, "debian-esgz:t", layers)
