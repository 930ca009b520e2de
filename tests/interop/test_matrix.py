"""Producer x consumer: every eStargz image mounts lazily, with zero fallbacks, under lazyd and the reference.

Rows are images made by real producers from plain source images: a debootstrap base written
by ``umoci insert ROOTFS /`` (root entry ``/``) plus python3, busybox with whiteouts and an
opaque directory, and a hand-made layer with ``./``, ``/``, absolute, ``a/../b`` and
``../../x`` names. Columns are lazyd (``lazyctl rpull``) and the reference
containerd-stargz-grpc (``ctr-remote images rpull``). A cell passes when every layer was
mounted lazily, nothing fell back, a container runs, and the root filesystem equals what
containerd's overlayfs snapshotter unpacks from the source image, file by file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import stat
import time
from pathlib import Path

import pytest

from tests.e2e.images import ODD_NAMES, layer_names, manifest_of

from .conftest import Matrix
from .consumers import LazydConsumer, StargzConsumer
from .oci import TOC_DIGEST, raw_toc, read_image
from .trees import tree_differences

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IMAGES = [
    ("lazyctl convert", "debian"),
    ("ctr-remote convert", "debian"),
    ("lazyctl convert", "busybox"),
    ("lazyctl convert --prioritized", "busybox"),
    ("ctr-remote convert", "busybox"),
    ("ctr-remote optimize", "busybox-parents"),
    ("estargz-build -chunk-size 4096", "busybox"),
    ("estargz-build -mode writer", "odd-names"),
]
CONSUMERS = ("lazyd", "stargz")
IDS = [re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") + "@" + s for p, s in IMAGES]


def _layer_count(layout: Path) -> int:
    """The layer count of ``layout:latest`` from its manifest, checked against its config's diff IDs."""
    _, manifest = manifest_of(layout, "latest")
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]), layout
    return len(manifest["layers"])


def test_source_images_have_the_intended_layers(matrix: Matrix) -> None:
    """Guard for the rows: each source has the layers, whiteouts, opaque dir and names it is meant to."""
    src = matrix.sources
    for name in ("busybox", "busybox-parents"):
        assert _layer_count(src[name].layout) == 3, name
        base, deleting, opaque = layer_names(src[name].layout, "latest")
        assert {"bin/.wh.vi", "etc/.wh.group", "var/log/.wh.sub"} <= set(deleting), (name, deleting)
        assert "var/log/.wh..wh..opq" in opaque, (name, opaque)
    # umoci may leave unchanged parents out of upper layers; the -parents variant has all of them.
    for names in layer_names(src["busybox-parents"].layout, "latest"):
        clean = ["/".join(p for p in n.split("/") if p not in ("", ".")) for n in names]
        assert all(c.rpartition("/")[0] in {"", *clean} for c in clean), names

    assert _layer_count(src["debian"].layout) == 2
    _, manifest = manifest_of(src["debian"].layout, "latest")
    digest = manifest["layers"][0]["digest"].split(":")[1]
    with gzip.open(src["debian"].layout / "blobs/sha256" / digest, "rb") as f:
        first_name = f.read(100).rstrip(b"\0")
    assert first_name == b"/", f"the umoci insert layer starts with {first_name!r}, not the root entry '/'"

    assert _layer_count(src["odd-names"].layout) == 2
    top = layer_names(src["odd-names"].layout, "latest")[1]
    assert top == [n.rstrip("/") if n != "/" else "" for n in ODD_NAMES], top


@pytest.mark.parametrize(("producer", "source"), IMAGES, ids=IDS)
def test_produced_image_is_estargz(matrix: Matrix, producer: str, source: str) -> None:
    """Guard for the rows: every layer is eStargz with a matching TOC digest, with the feature the row is about."""
    image = matrix.produced(producer, source)
    assert len(image.layers) == len(read_image(matrix.sources[source].ref).layers)
    tocs = []
    for layer in image.layers:
        body = raw_toc(image.ref, layer)
        assert layer["annotations"][TOC_DIGEST] == "sha256:" + hashlib.sha256(body).hexdigest(), layer
        tocs.append(json.loads(body)["entries"])
    names = [[e["name"] for e in entries] for entries in tocs]
    if (producer, source) == ("ctr-remote convert", "debian"):
        assert "/" in names[0], names[0][:5]  # the entry that made lazyd fall back
    if producer == "estargz-build -mode writer":
        assert set(ODD_NAMES) <= set(names[-1]), names[-1]
    if producer == "estargz-build -chunk-size 4096":
        assert any(e.get("chunkSize") == 4096 for entries in tocs for e in entries)
    if producer in ("lazyctl convert --prioritized", "ctr-remote optimize"):
        assert any(".prefetch.landmark" in n for n in names), "no prioritized files"
    if producer == "lazyctl convert --prioritized":
        base = names[0]
        assert base.index("bin/busybox") < base.index(".prefetch.landmark"), base[:5]


def _namespace(producer: str, source: str, consumer: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{producer}-{source}-{consumer}".lower()).strip("-")


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize(("producer", "source"), IMAGES, ids=IDS)
def test_cell(matrix: Matrix, producer: str, source: str, consumer: str, request: pytest.FixtureRequest,
              tmp_path: Path) -> None:
    image = matrix.produced(producer, source)
    src = matrix.sources[source]
    expected = matrix.expected(source)
    puller: LazydConsumer | StargzConsumer = request.getfixturevalue(f"{consumer}_consumer")
    ns = _namespace(producer, source, consumer)
    t0 = time.monotonic()
    row = {"kind": "cell", "producer": producer, "source": source, "consumer": consumer, "layers": len(image.layers),
           "lazy": 0, "fallbacks": "?", "tree_equal": None, "seconds": 0.0}
    matrix.results.append(row)
    report = puller.pull(image, ns)
    row.update(lazy=report.lazy, fallbacks=len(report.fallbacks))
    differences = tree_differences(expected, puller.tree(image, ns, tmp_path / "view"))
    row.update(tree_equal=not differences, seconds=time.monotonic() - t0)
    assert not report.fallbacks, report.fallbacks
    assert report.lazy == report.layers
    assert not differences, f"{len(differences)} differences, first: {differences[:5]}"
    assert puller.run(image.ref, ns, f"{consumer}-run", list(src.cmd)) == src.output
    row["seconds"] = time.monotonic() - t0


def test_expected_trees_are_what_the_sources_say(matrix: Matrix) -> None:
    """Guard for the comparison: overlayfs applied the whiteouts, the opaque dir and the odd names."""
    busybox = matrix.expected("busybox")
    assert "etc/group" not in busybox and "bin/vi" not in busybox and "bin/sh" in busybox
    assert [p for p in busybox if p.startswith("var/log/")] == ["var/log/fresh.log"]
    assert busybox["data/hardlink.txt"][4] == (8, 2) and busybox["data/hardlink.txt"][5] == busybox["data/file.txt"][5]
    assert ("user.lazyd", b"xattr-value") in busybox["data/file.txt"][8]
    odd = matrix.expected("odd-names")
    for name, clean in ODD_NAMES.items():
        if clean:
            assert clean in odd, (name, clean)
    assert stat.S_ISLNK(odd["lnk"][0]) and odd["lnk"][6] == "/abs/file"
    assert "usr/bin/python3" in matrix.expected("debian")


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("source", ["busybox", "odd-names"])
def test_plain_source_is_counted_as_fallback(matrix: Matrix, source: str, consumer: str,
                                             request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Control: the plain (gzip) source is not eStargz, so every layer must be reported as a fallback.

    This is what makes "zero fallbacks" in the cells above mean something for both consumers;
    the tree pulled the non-lazy way must still equal overlayfs's.
    """
    src = matrix.sources[source]
    image = read_image(src.ref)
    puller: LazydConsumer | StargzConsumer = request.getfixturevalue(f"{consumer}_consumer")
    ns = _namespace("plain", source, consumer)
    report = puller.pull(image, ns)
    assert report.lazy == 0 and len(report.fallbacks) >= 1, report
    if consumer == "lazyd":
        assert len(report.fallbacks) == len(image.layers), report
    differences = tree_differences(matrix.expected(source), puller.tree(image, ns, tmp_path / "view"))
    assert not differences, f"{len(differences)} differences, first: {differences[:5]}"
    assert puller.run(image.ref, ns, f"{consumer}-plain", list(src.cmd)) == src.output
