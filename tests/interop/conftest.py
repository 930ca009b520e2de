"""Fixtures of the producer x consumer matrix; everything is shared per session.

One registry; one plain containerd (the "workshop") where ``ctr-remote`` converts and where
each source image is pulled onto overlayfs to give the expected root filesystem; one lazyd
stack and one reference stack as consumers. Source images are built once, produced images
are made on first use, so a single cell can run alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.images import add_layer, add_opaque_layer, odd_names_tar, with_parent_dirs
from tests.support.containerd import start_containerd
from tests.support.images import build_busybox, debian_python_insert_layout, push
from tests.support.registry import Registry, running_registry

from .consumers import LazydConsumer, StargzConsumer
from .oci import Image, read_image
from .producers import PRODUCERS, Source, Workshop, cached_produce
from .trees import Entry, chain_id, snapshot_tree

BUSYBOX_CMD = ("/bin/sh", "-c", "cat /etc/hello.txt /var/log/fresh.log")
BUSYBOX_OUT = "hello from lazyd\nfresh\n"
CACHED_SOURCES = ("debian",)  # its conversions take minutes on two cores; see producers.cached_produce


@pytest.fixture(scope="session")
def interop_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("interop-registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def workshop(interop_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workshop]:
    root = tmp_path_factory.mktemp("interop-workshop")
    cd = start_containerd(root / "containerd")
    try:
        yield Workshop(cd, interop_registry.host, root)
    finally:
        cd.stop()


def _sources(host: str, work: Path) -> dict[str, Source]:
    busybox = work / "busybox"
    build_busybox(busybox, "latest", with_deletions=True)
    add_opaque_layer(busybox, "latest")
    parents = work / "busybox-parents"
    with_parent_dirs(busybox, "latest", parents)
    odd = work / "odd-names"
    build_busybox(odd, "latest")
    add_layer(odd, "latest", odd_names_tar(), "interop: hand-made tar with odd names")
    debian = debian_python_insert_layout()
    made = [
        ("busybox", busybox, BUSYBOX_CMD, BUSYBOX_OUT),
        ("busybox-parents", parents, BUSYBOX_CMD, BUSYBOX_OUT),
        ("odd-names", odd, ("/bin/sh", "-c", "cat /x /b /abs/file /dot/f /c/d /lnk"),
         "content of ../../x\ncontent of a/../b\ncontent of /abs/file\ncontent of ./dot/f\ncontent of c//d\n"
         "content of /abs/file\n"),
        ("debian", debian, ("/usr/bin/python3", "-c", "print('hello from python')"), "hello from python\n"),
    ]
    return {name: Source(name, layout, "latest", push(f"oci:{layout}:latest", host, f"src-{name}:plain"), cmd, out)
            for name, layout, cmd, out in made}


@dataclass
class Matrix:
    """Sources, produced images and expected trees, made on first use; and the results table."""

    shop: Workshop
    sources: dict[str, Source]
    _expected: dict[str, dict[str, Entry]] = field(default_factory=dict)
    _produced: dict[tuple[str, str], Image] = field(default_factory=dict)
    results: list[dict[str, object]] = field(default_factory=list)

    def expected(self, source: str) -> dict[str, Entry]:
        """The source image's root filesystem as containerd's overlayfs snapshotter unpacks it."""
        if source not in self._expected:
            src = self.sources[source]
            ns = f"expected-{source}"
            self.shop.containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", src.ref,
                                     namespace=ns, timeout=600)
            chain = chain_id(read_image(src.ref).diff_ids)
            self._expected[source] = snapshot_tree(self.shop.containerd.address, ns, "overlayfs", chain,
                                                   self.shop.work / f"view-{source}")
        return self._expected[source]

    def produced(self, producer: str, source: str) -> Image:
        """The eStargz image ``producer`` makes from ``source`` (pushed to the registry)."""
        key = (producer, source)
        if key not in self._produced:
            tag = re.sub(r"[^a-z0-9]+", "-", producer.lower()).strip("-")
            dst = f"{self.shop.registry_host}/{source}:{tag}"
            t0 = time.monotonic()
            src = self.sources[source]
            cached = False
            if source in CACHED_SOURCES:
                cached = cached_produce(self.shop, producer, src, dst, read_image(src.ref).digest)
            else:
                PRODUCERS[producer](self.shop, src, dst)
            image = read_image(dst)
            self._produced[key] = image
            self.results.append({"kind": "produce", "producer": producer, "source": source, "cached": cached,
                                 "seconds": time.monotonic() - t0})
        return self._produced[key]


_MATRIX: list[Matrix] = []


@pytest.fixture(scope="session")
def matrix(workshop: Workshop, tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    m = Matrix(workshop, _sources(workshop.registry_host, tmp_path_factory.mktemp("interop-sources")))
    _MATRIX.append(m)
    return m


@pytest.fixture(scope="session")
def lazyd_consumer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LazydConsumer]:
    consumer = LazydConsumer(tmp_path_factory.mktemp("interop-lazyd"))
    try:
        yield consumer.start()
    finally:
        consumer.close()


@pytest.fixture(scope="session")
def stargz_consumer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StargzConsumer]:
    consumer = StargzConsumer(tmp_path_factory.mktemp("interop-stargz"))
    try:
        yield consumer.start()
    finally:
        consumer.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the matrix (producer x consumer: lazy layers / fallbacks / tree equal) after the run."""
    cells = [r for m in _MATRIX for r in m.results if r["kind"] == "cell"]
    if not cells:
        return
    tr = terminalreporter
    tr.section("interop matrix")
    tr.write_line(f"{'producer (source)':48} {'consumer':8} {'lazy':>6} {'fallbacks':>9} {'tree equal':>10} {'secs':>6}")
    for r in cells:
        tree = {True: "yes", False: "NO", None: "-"}[r["tree_equal"]]  # type: ignore[index]
        tr.write_line(f"{str(r['producer']) + ' (' + str(r['source']) + ')':48} {r['consumer']!s:8} "
                      f"{str(r['lazy']) + '/' + str(r['layers']):>6} {r['fallbacks']!s:>9} {tree:>10} "
                      f"{r['seconds']:6.1f}")
    for r in (r for m in _MATRIX for r in m.results if r["kind"] == "produce"):
        how = "pushed from the cache" if r["cached"] else "produced"
        tr.write_line(f"{how} {r['producer']} ({r['source']}) in {r['seconds']:.1f} s")
