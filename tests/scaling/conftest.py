"""Fixtures for the scaling tests: an upstream registry behind a counting proxy, an eStargz image
in it, and a factory of lazyd "nodes" (daemons with their own root, socket and hosts.toml)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazyd.api.client import Client
from tests.support.estargz_images import EStargzImage, busybox_layers, push_layers
from tests.support.images import build_busybox, layer_tars
from tests.support.lazyd import Lazyd, start_lazyd
from tests.support.registry import Registry, running_registry
from tests.support.tcpproxy import TCPProxy

IMAGE = "busybox-esgz:t"


@dataclass
class Upstream:
    """The upstream registry, the counting proxy in front of it, and the image as the nodes name it."""

    registry: Registry
    counter: TCPProxy
    image: EStargzImage

    @property
    def host(self) -> str:
        """``host:port`` of the upstream as nodes and the mirror see it (through the counter)."""
        return self.counter.host

    @property
    def ref(self) -> str:
        return f"{self.host}/{IMAGE}"

    @property
    def blobs(self) -> list[str]:
        """Digests of every blob a pull reads: the config, then the layers."""
        manifest = json.loads(self.registry.blob_path(self.image.manifest_digest).read_bytes())
        return [manifest["config"]["digest"], *(layer.digest for layer in self.image.layers)]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """busybox (2 layers: busybox + applets; whiteouts and a 9 MiB random file) as eStargz, pushed
    straight to the upstream registry (not through the counter, so the counter sees only pulls)."""
    work = tmp_path_factory.mktemp("scaling-upstream")
    build_busybox(work / "layout", "t", with_deletions=True)
    tars = layer_tars(work / "layout", "t", work / "tars")
    layers = busybox_layers(tars, work / "esgz")
    with running_registry(work, name="upstream") as reg:
        image = push_layers(reg.host, IMAGE, layers)
        with TCPProxy(reg.port) as counter:
            yield Upstream(reg, counter, image)


@dataclass
class Node:
    """One lazyd node: a ``lazyd serve`` with its own root, socket and hosts directory."""

    name: str
    base: Path
    lazyd: Lazyd

    def client(self) -> Client:
        return self.lazyd.client(timeout=120)

    def mountpoint(self, label: str) -> Path:
        mp = self.base / "mnt" / label
        mp.mkdir(parents=True, exist_ok=True)
        return mp


def hosts_toml(upstream_host: str, mirror_host: str) -> str:
    """containerd-style hosts.toml: the mirror first (pull and resolve), then the upstream."""
    return (f'server = "http://{upstream_host}"\n\n'
            f'[host."http://{mirror_host}"]\n'
            f'  capabilities = ["pull", "resolve"]\n')


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[[str, str, str], Node]]:
    """``make(name, upstream_host, mirror_host)`` starts a node whose hosts.toml sends pulls to the mirror."""
    made: list[Node] = []

    def make(name: str, upstream_host: str, mirror_host: str) -> Node:
        base = tmp_path / name
        hosts_dir = base / "certs.d"
        (hosts_dir / upstream_host).mkdir(parents=True)
        (hosts_dir / upstream_host / "hosts.toml").write_text(hosts_toml(upstream_host, mirror_host))
        config = base / "config.toml"
        # No background fetch: what a node fetches is what its reads asked for. No retries on
        # the upstream, so a failure shows at once instead of after a backoff.
        config.write_text("workers = 1\ncache_size = 1073741824\nfetch_timeout = 30.0\nbackground_fetch = false\n"
                          f'[registry]\nhosts_dir = "{hosts_dir}"\nretries = 0\n')
        node = Node(name, base, start_lazyd(base / "root", base / "run" / "lazyd.sock", base / "lazyd.log",
                                            config=config, args=("--log-level", "debug"), workers=1))
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.lazyd.close(unmount=node.base)
