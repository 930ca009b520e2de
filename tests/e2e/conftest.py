"""End-to-end fixtures: a real registry, ``lazyd serve``, ``lazyd snapshotter`` and containerd 1.6.

Images are built once per session (the debian+python3 one is cached on disk) and pushed
to a session registry. Every test gets its own stack (daemon, snapshotter, containerd,
all state under ``tmp_path``), torn down with its containers, mounts and processes.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.images import add_opaque_layer, cached_estargz, convert_layout, lazyd_builder
from tests.support.containerd import start_containerd
from tests.support.images import build_busybox, debian_python_layout, push
from tests.support.lazyd import Lazyd, start_lazyd, unmount_all_below
from tests.support.procs import Proc, wait_until
from tests.support.registry import Registry, running_registry

SNAPSHOTTER = "lazyd"
HELLO = "hello from python in a lazily pulled image"


@dataclass(frozen=True)
class Images:
    """References pushed to the session registry, and where their layouts are."""

    debian_esgz: str
    busybox_plain: str
    busybox_esgz: str
    debian_esgz_layout: Path
    busybox_esgz_layout: Path
    busybox_layout: Path


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("e2e-registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Images:
    """The debian+python3 image as eStargz, and busybox (with deletions and an opaque dir) plain and as eStargz.

    eStargz layers are made by lazyd's own writer (``lazyd.estargz.build``); tests/rpull uses the reference one.
    """
    work = tmp_path_factory.mktemp("e2e-images")
    debian_src = cached_estargz(debian_python_layout(), "latest", lazyd_builder)
    busybox = work / "busybox"
    build_busybox(busybox, "latest", with_deletions=True)
    add_opaque_layer(busybox, "latest")
    convert_layout(busybox, "latest", work / "busybox-esgz", lazyd_builder)
    return Images(
        debian_esgz=push(debian_src, registry.host, "debian-python:esgz"),
        busybox_plain=push(f"oci:{busybox}:latest", registry.host, "busybox:plain"),
        busybox_esgz=push(f"oci:{work / 'busybox-esgz'}:latest", registry.host, "busybox:esgz"),
        debian_esgz_layout=Path(debian_src.split(":")[1]),
        busybox_esgz_layout=work / "busybox-esgz",
        busybox_layout=busybox,
    )


def _sh(argv: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Stack:
    """``lazyd serve`` + ``lazyd snapshotter`` + containerd, all under ``root``."""

    root: Path
    cri: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # top-level keys of lazyd serve's config file
    lazyd: Lazyd | None = None
    snapshotter: Proc | None = None
    containerd: Any = None

    @property
    def lazyd_socket(self) -> Path:
        return self.root / "lazyd.sock"

    @property
    def snapshotter_socket(self) -> Path:
        return self.root / "snapshotter.sock"

    @property
    def address(self) -> str:
        return self.containerd.address

    def start(self) -> "Stack":
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_lazyd()
        self.start_snapshotter()
        kwargs: dict[str, Any] = {"snapshotter_address": str(self.snapshotter_socket)}
        if self.cri:
            kwargs.update(cri=True, cri_snapshotter=SNAPSHOTTER)
        self.containerd = start_containerd(self.root / "containerd", **kwargs)
        return self

    def start_lazyd(self) -> None:
        config = self.root / "lazyd.toml"
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in self.config.items()))
        self.lazyd = start_lazyd(self.root / "lazyd", self.lazyd_socket, self.root / "lazyd.log", config=config)

    def start_snapshotter(self) -> None:
        self.snapshotter_socket.unlink(missing_ok=True)
        self.snapshotter = Proc(
            ["lazyd", "snapshotter", "--root", str(self.root / "snapshotter"), "--address",
             str(self.snapshotter_socket), "--lazyd-socket", str(self.lazyd_socket)],
            self.root / "snapshotter.log")
        wait_until(lambda: self.snapshotter_socket.exists() or not self.snapshotter.alive(), 30,
                   "lazyd snapshotter socket")
        assert self.snapshotter.alive(), self.snapshotter.log_text()

    # --- commands -----------------------------------------------------------

    def ctr(self, *args: str, namespace: str = "default", check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr(*args, namespace=namespace, check=check, timeout=timeout)

    def lazyctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _sh(["lazyctl", *args, "--socket", str(self.lazyd_socket)], check=check)

    def status(self) -> dict[str, Any]:
        return json.loads(self.lazyctl("status", "--json").stdout)

    def rpull(self, ref: str, *extra: str, namespace: str = "default") -> dict[str, Any]:
        out = _sh(["lazyctl", "rpull", "--plain-http", "--json", "--address", self.address, "--namespace", namespace,
                   "--snapshotter", SNAPSHOTTER, "--socket", str(self.lazyd_socket), *extra, ref]).stdout
        return json.loads(out)

    def run(self, image: str, name: str, *cmd: str, check: bool = True, snapshotter: str = SNAPSHOTTER,
            namespace: str = "default") -> subprocess.CompletedProcess[str]:
        return self.ctr("run", "--rm", "--snapshotter", snapshotter, image, name, *cmd, check=check,
                        namespace=namespace)

    def content_digests(self, namespace: str = "default") -> set[str]:
        out = self.ctr("content", "ls", "-q", namespace=namespace).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    # --- teardown -----------------------------------------------------------

    def close(self) -> None:
        errors: list[str] = []
        if self.containerd is not None:
            self.containerd.stop()  # kills the tasks and removes the containers first
        if self.snapshotter is not None:
            self.snapshotter.stop()
        if self.lazyd is not None and not self.lazyd.close(unmount=self.root):
            errors.append(f"lazyd serve did not exit after shutdown:\n{self.lazyd.log_text()[-4000:]}")
        unmount_all_below(self.root)
        if errors:
            raise AssertionError("; ".join(errors))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lazyd_config(**keys): settings for the test's lazyd serve config file")


def _lazyd_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("lazyd_config")
    return dict(marker.kwargs) if marker else {}


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = Stack(tmp_path, config=_lazyd_config(request))
    try:
        yield s.start()
    finally:
        s.close()


@pytest.fixture
def cri_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = Stack(tmp_path, cri=True, config=_lazyd_config(request))
    try:
        yield s.start()
    finally:
        s.close()
