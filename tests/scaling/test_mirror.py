"""Two lazyd nodes behind one pull-through mirror (Debian ``docker-registry`` in proxy mode).

Each node's hosts.toml lists the mirror (``pull``, ``resolve``) before the upstream. A
counting proxy in front of the upstream records every request it gets, and another one in
front of the mirror what the nodes ask the mirror. The numbers are written up in
docs/scaling.md (run with ``-s`` to see them).

What distribution 2.8's proxy mode does (registry/proxy/proxyblobstore.go), and so what
is asserted: a GET of a blob the mirror does not hold yet is answered with the whole blob
(HTTP 200, whatever the Range), streamed from a whole-blob GET to the upstream; the first
such request also starts a second whole-blob GET that stores the blob. Once stored, the
mirror answers ranges (206) from its copy. So the upstream never sees a range while the
mirror works; it sees each blob once to fill the mirror plus once for each request that
reached the mirror before that copy was stored; and after that, nothing.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.estargz_images import EStargzLayer
from tests.support.procs import wait_until
from tests.support.registry import Registry, start_registry
from tests.support.tcpproxy import TCPProxy
from tests.support.treecheck import check_tree

from .conftest import Node, Upstream
from .upstream import Traffic

BUSYBOX = "bin/busybox"   # in layer 0 (prioritized)
BIG = "data/big.bin"      # 9 MiB of random bytes in layer 1
BIG_SLICE = (4 << 20, 1 << 20)
NodeFactory = Callable[[str, str, str], Node]


def source_bytes(layer: EStargzLayer, name: str) -> bytes:
    """A file's bytes as the layer's source tar holds them."""
    with tarfile.open(layer.tar) as tf:
        f = tf.extractfile(name)
        assert f is not None, f"{name} is not a regular file in {layer.tar}"
        return f.read()


def lazy_pull(node: Node, upstream: Upstream, label: str) -> list[Path]:
    """What a lazy pull asks of lazyd: resolve the image, then mount every layer (TOC digest from the manifest)."""
    mps = []
    with node.client() as c:
        resolved = c.request("resolve", {"ref": upstream.ref})
        assert resolved.manifest_digest == upstream.image.manifest_digest
        for i, layer in enumerate(upstream.image.layers):
            mp = node.mountpoint(f"{label}{i}")
            result = c.mount(upstream.ref, layer.digest, str(mp))
            assert result.toc_digest == layer.toc_digest
            mps.append(mp)
    return mps


def lazy_reads(upstream: Upstream, mps: list[Path]) -> None:
    """A container start's worth of reads through FUSE: one whole file and a 1 MiB slice of another,
    each compared with the source tar."""
    layers = upstream.image.layers
    assert (mps[0] / BUSYBOX).read_bytes() == source_bytes(layers[0], BUSYBOX)
    offset, size = BIG_SLICE
    with open(mps[1] / BIG, "rb") as f:
        f.seek(offset)
        assert f.read(size) == source_bytes(layers[1], BIG)[offset:offset + size]


def registry_totals(node: Node) -> str:
    with node.client() as c:
        t = c.status().totals
    return f"{t.registry_requests} requests, {t.registry_bytes} bytes"


def blob_report(upstream: Upstream, up: Traffic, at_mirror: Traffic) -> str:
    return "\n".join(f"  layer {i} ({layer.size} B): upstream {len(up.whole_blob_gets(layer.digest))} whole GETs, "
                     f"{len(up.range_gets(layer.digest))} range GETs; mirror asked "
                     f"{len(at_mirror.blob_gets(layer.digest))} times"
                     for i, layer in enumerate(upstream.image.layers))


def assert_upstream_filled_mirror_only(upstream: Upstream, up: Traffic, at_mirror: Traffic) -> None:
    """The upstream saw whole-blob GETs only (the mirror's), each blob at most once more than the
    mirror was asked for it (one GET to store it, one per request streamed through before that)."""
    for i, layer in enumerate(upstream.image.layers):
        assert not up.range_gets(layer.digest), f"layer {i}: a node read the upstream itself: {up.summary()}"
        whole, asked = len(up.whole_blob_gets(layer.digest)), len(at_mirror.blob_gets(layer.digest))
        assert 1 <= whole <= 1 + asked, f"layer {i}: {whole} upstream GETs for {asked} asked at the mirror"


def wait_stored(mirror: Registry, upstream: Upstream) -> float:
    """Wait until the mirror holds every blob of the image; returns how long that took."""
    t0 = time.monotonic()
    wait_until(lambda: all(mirror.blob_path(digest).exists() for digest in upstream.blobs), 60,
               "the mirror to store the config and every layer")
    return time.monotonic() - t0


def test_second_node_is_served_by_the_mirror(tmp_path: Path, upstream: Upstream, node_factory: NodeFactory) -> None:
    mirror = start_registry(tmp_path, name="mirror", proxy_remote=f"http://{upstream.host}")
    try:
        with TCPProxy(mirror.port) as mirror_counter:
            upstream.counter.reset()
            node1 = node_factory("node1", upstream.host, mirror_counter.host)
            t0 = time.monotonic()
            lazy_reads(upstream, lazy_pull(node1, upstream, "n1-"))
            elapsed = time.monotonic() - t0
            stored_after = wait_stored(mirror, upstream)
            up1, at_mirror1 = Traffic.of(upstream.counter), Traffic.of(mirror_counter)
            print(f"\nnode 1, cold mirror ({elapsed:.2f} s; mirror had every blob {stored_after:.2f} s later):\n"
                  f"  upstream: {up1.summary()}\n  at the mirror: {at_mirror1.summary()}\n"
                  f"  node 1's registry client: {registry_totals(node1)}\n{blob_report(upstream, up1, at_mirror1)}")
            assert_upstream_filled_mirror_only(upstream, up1, at_mirror1)

            upstream.counter.reset()
            mirror_counter.reset()
            node2 = node_factory("node2", upstream.host, mirror_counter.host)
            t0 = time.monotonic()
            mps2 = lazy_pull(node2, upstream, "n2-")
            lazy_reads(upstream, mps2)
            elapsed = time.monotonic() - t0
            up2, at_mirror2 = Traffic.of(upstream.counter), Traffic.of(mirror_counter)
            print(f"node 2, warm mirror ({elapsed:.2f} s):\n  upstream: {up2.summary()}\n"
                  f"  at the mirror: {at_mirror2.summary()}\n  node 2's registry client: {registry_totals(node2)}")
            # The upstream served node 2 no blob at all: only the mirror's tag checks (and its /v2/ pings).
            assert not [r for r in up2.requests if "/blobs/" in r.path], up2.summary()
            assert up2.bytes_down < 64 * 1024, up2.summary()
            # ... and the mirror served node 2 lazily: ranges, far fewer bytes than the layers.
            for layer in upstream.image.layers:
                assert at_mirror2.blob_gets(layer.digest), f"node 2 did not read {layer.digest} from the mirror"
            assert at_mirror2.bytes_down < sum(layer.size for layer in upstream.image.layers) // 2, at_mirror2.summary()

            for layer, mp in zip(upstream.image.layers, mps2):
                check_tree(mp, layer.tar)
            up2all, at_mirror2all = Traffic.of(upstream.counter), Traffic.of(mirror_counter)
            print(f"node 2 after reading every file:\n  upstream: {up2all.summary()}\n"
                  f"  at the mirror: {at_mirror2all.summary()}\n  node 2's registry client: {registry_totals(node2)}")
            assert not [r for r in up2all.requests if "/blobs/" in r.path], up2all.summary()
    finally:
        mirror.stop()


def test_nodes_starting_together_on_a_cold_mirror(tmp_path: Path, upstream: Upstream,
                                                  node_factory: NodeFactory) -> None:
    """Two nodes pull at once through a mirror that holds nothing yet, with the upstream link slowed
    (5 ms per 64 KiB, about 13 MB/s): requests that reach the mirror while it is still storing a blob
    are each streamed from a GET of their own to the upstream."""
    mirror = start_registry(tmp_path, name="mirror", proxy_remote=f"http://{upstream.host}")
    try:
        with TCPProxy(mirror.port) as mirror_counter:
            nodes = [node_factory(f"node{i}", upstream.host, mirror_counter.host) for i in (1, 2)]
            upstream.counter.reset()
            upstream.counter.delay = 0.005
            t0 = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                for done in [pool.submit(lambda n: lazy_reads(upstream, lazy_pull(n, upstream, "c-")), node)
                             for node in nodes]:
                    done.result()
            elapsed = time.monotonic() - t0
            stored_after = wait_stored(mirror, upstream)
            up, at_mirror = Traffic.of(upstream.counter), Traffic.of(mirror_counter)
            print(f"\ntwo nodes at once, cold mirror, slow upstream ({elapsed:.2f} s; "
                  f"mirror had every blob {stored_after:.2f} s later):\n  upstream: {up.summary()}\n"
                  f"  at the mirror: {at_mirror.summary()}\n{blob_report(upstream, up, at_mirror)}")
            assert_upstream_filled_mirror_only(upstream, up, at_mirror)
    finally:
        upstream.counter.delay = 0.0
        mirror.stop()


def test_mirror_down_falls_back_to_upstream(tmp_path: Path, upstream: Upstream, node_factory: NodeFactory) -> None:
    """The mirror goes away under a node that mounted through it, and a new node pulls while it is away:
    both go on through the upstream (hosts.toml's ``server``), with range requests of their own."""
    mirror = start_registry(tmp_path, name="mirror", proxy_remote=f"http://{upstream.host}")
    try:
        with TCPProxy(mirror.port) as mirror_counter:
            node1 = node_factory("node1", upstream.host, mirror_counter.host)
            mps1 = lazy_pull(node1, upstream, "n1-")
            layers = upstream.image.layers
            assert (mps1[0] / BUSYBOX).read_bytes() == source_bytes(layers[0], BUSYBOX)
            assert mirror_counter.requests(), "node 1 did not go through the mirror"
    finally:
        mirror.stop()  # the mirror and its address are gone: connections are refused
    wait_until(lambda: not mirror.proc.alive(), 10, "the mirror to exit")

    # Node 1 reads what it has not read yet (all of layer 1's files) through the upstream.
    upstream.counter.reset()
    t0 = time.monotonic()
    lazy_reads(upstream, mps1)
    elapsed = time.monotonic() - t0
    up1 = Traffic.of(upstream.counter)
    print(f"\nnode 1 after the mirror died ({elapsed:.2f} s): upstream {up1.summary()}")
    assert up1.range_gets(layers[1].digest), up1.summary()
    assert not up1.whole_blob_gets(layers[1].digest), up1.summary()

    # A new node pulls and reads with the mirror down.
    upstream.counter.reset()
    node2 = node_factory("node2", upstream.host, mirror_counter.host)
    t0 = time.monotonic()
    mps2 = lazy_pull(node2, upstream, "n2-")
    lazy_reads(upstream, mps2)
    elapsed = time.monotonic() - t0
    up2 = Traffic.of(upstream.counter)
    print(f"node 2, mirror down ({elapsed:.2f} s): upstream {up2.summary()}\n"
          f"  node 2's registry client: {registry_totals(node2)}")
    assert up2.manifest_requests(), up2.summary()
    for layer in layers:
        assert up2.range_gets(layer.digest) and not up2.whole_blob_gets(layer.digest), up2.summary()
    assert up2.bytes_down < sum(layer.size for layer in layers) // 2, up2.summary()
    assert elapsed < 10, f"the fallback took {elapsed:.1f} s"
    for layer, mp in zip(layers, mps2):
        check_tree(mp, layer.tar)
    for layer, mp in zip(layers, mps1):
        check_tree(mp, layer.tar)
