"""Fixtures for daemon tests: a real registry, eStargz images, a byte-counting proxy and `lazyd serve`."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lazyd.api.client import Client
from tests.support.estargz_images import EStargzImage, EStargzLayer, build_layers, busybox_layers, push_layers
from tests.support.images import build_busybox, layer_tars
from tests.support.lazyd import Lazyd, start_lazyd, worker_json_pids
from tests.support.procs import Proc
from tests.support.registry import Registry, running_registry
from tests.support.tcpproxy import TCPProxy


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("daemon-registry")) as reg:
        yield reg


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
    return push_layers(registry.host, "busybox-esgz:t", busybox_layers(busybox_tars, out))


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
    """A `lazyd serve` with its own root and socket, (re)started with ``start()``."""

    root: Path
    socket: str
    config: Path
    log: Path
    workers: int = 1
    lazyd: Lazyd | None = None
    mountpoints: list[Path] = field(default_factory=list)

    @property
    def proc(self) -> Proc | None:
        return self.lazyd.proc if self.lazyd is not None else None

    def start(self, timeout: float = 30) -> DaemonProc:
        """Start the daemon and wait until all its workers are ready."""
        self.lazyd = start_lazyd(self.root, Path(self.socket), self.log, config=self.config,
                                 args=("--log-level", "debug"), workers=self.workers, timeout=timeout)
        return self

    def client(self) -> Client:
        return Client(self.socket, timeout=120)

    def mountpoint(self, name: str) -> Path:
        mp = self.root.parent / "mnt" / name
        mp.mkdir(parents=True, exist_ok=True)
        self.mountpoints.append(mp)
        return mp

    def mount_layer(self, ref: str, layer: EStargzLayer, name: str) -> Path:
        """Mount ``layer`` of the image ``ref`` (with its TOC digest) at a new mountpoint ``name``; returns it."""
        mp = self.mountpoint(name)
        with self.client() as c:
            c.mount(ref, layer.digest, str(mp), layer.toc_digest)
        return mp

    def mount_layers(self, image: EStargzImage, prefix: str) -> list[Path]:
        """Mount every layer of ``image`` at a new mountpoint ``<prefix><index>``."""
        mps = []
        with self.client() as c:
            for i, layer in enumerate(image.layers):
                mp = self.mountpoint(f"{prefix}{i}")
                c.mount(image.ref, layer.digest, str(mp), layer.toc_digest)
                mps.append(mp)
        return mps

    def shutdown(self) -> None:
        """The clean stop (unmounts)."""
        assert self.lazyd is not None
        assert self.lazyd.shutdown(), f"lazyd serve did not exit after shutdown:\n{self.lazyd.log_text()[-4000:]}"

    def kill9(self) -> None:
        assert self.lazyd is not None
        self.lazyd.stop(signal.SIGKILL)

    def worker_pids(self) -> list[int]:
        return worker_json_pids(self.root)

    def cleanup(self) -> None:
        """Stop everything this daemon started, whatever state it is in."""
        if self.lazyd is not None:
            self.lazyd.close(unmount=self.root.parent)  # the mountpoints are in there too


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
