"""Optimized images and access records move between lazyd and the reference (stargz-snapshotter 0.12).

* an image made by ``ctr-remote image optimize`` runs under lazyd with its prefetch region fetched;
* an image made by ``lazyctl image optimize`` runs under ``containerd-stargz-grpc``, which
  prefetches its region (seen as one range GET from offset 0 past the landmark at the registry);
* ``ctr-remote``'s ``--record-out`` works with ``lazyctl image optimize --prioritized-only``, and
  lazyd's record with ``ctr-remote image convert --estargz-record-in``.

The reference's optimize needs every parent directory in each layer, so it works on a copy of the
umoci image whose upper layer carries them (tests.e2e.images.with_parent_dirs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lazyd.estargz import PREFETCH_LANDMARK, open_file
from lazyd.profile import records as rec
from tests.e2e.conftest import Stack
from tests.e2e.images import with_parent_dirs
from tests.e2e.rangeproxy import RangeLogProxy
from tests.interop.consumers import StargzConsumer
from tests.support.images import layer_tars, push
from tests.support.registry import Registry

from .conftest import PY_CMD, OptImages, Optimized, lazyctl
from .test_optimize import layer_counters, layer_files, manifest, prioritized_files


@dataclass(frozen=True)
class Reference:
    parents: str            # the debian image whose layers carry their parent directories
    parents_files: list[set[str]]
    optimized: str          # ctr-remote image optimize of it
    record: Path            # its --record-out
    seconds: float


@pytest.fixture(scope="module")
def reference(opt_stack: Stack, opt_images: OptImages, opt_registry: Registry,
              tmp_path_factory: pytest.TempPathFactory) -> Reference:
    work = tmp_path_factory.mktemp("opt-reference")
    parents = push(with_parent_dirs(opt_images.layout, "latest", work / "parents"), opt_registry.host,
                   "debian-python:parents")
    files = layer_files(layer_tars(work / "parents", "latest", work / "tars"))
    dst = f"{opt_registry.host}/debian-python:ctr-remote-optimized"
    record = work / "ctr-remote-record.jsonl"
    cd = opt_stack.containerd
    cd.ctr("images", "pull", "--plain-http", parents, namespace="ctr-remote", timeout=600)
    started = time.monotonic()
    cd.ctr_remote("image", "optimize", "--oci", "--period", "10", "--entrypoint", json.dumps(PY_CMD[:1]),
                  "--args", json.dumps(PY_CMD[1:]), "--record-out", str(record), parents, dst,
                  namespace="ctr-remote", timeout=900)
    took = time.monotonic() - started
    cd.ctr("images", "push", "--plain-http", dst, namespace="ctr-remote", timeout=600)
    return Reference(parents, files, dst, record, took)


def landmark_offset(registry: Registry, layer_digest: str) -> int | None:
    with open_file(registry.blob_path(layer_digest)) as reader:
        for e in reader.toc.entries:
            if e.name == PREFETCH_LANDMARK:
                return e.offset
    return None


def test_ctr_remote_optimized_image_prefetches_under_lazyd(reference: Reference, opt_registry: Registry,
                                                           tmp_path: Path) -> None:
    layers = [layer["digest"] for layer in manifest(opt_registry, reference.optimized)["layers"]]
    landmarks = {d: landmark_offset(opt_registry, d) for d in layers}
    assert any(landmarks.values()), "ctr-remote put no prefetch landmark in any layer"
    s = Stack(tmp_path, config={"prefetch_wait": True, "background_fetch": False})
    try:
        s.start()
        pulled = s.rpull(reference.optimized)
        assert all(layer["mode"] == "lazy" for layer in pulled["layers"]), pulled
        out = s.run(reference.optimized, "ref-opt", PY_CMD[0], PY_CMD[1], PY_CMD[2] + "; print('ran')")
        assert out.stdout.strip() == "ran"
        counters = layer_counters(s.status(), layers)
    finally:
        s.close()
    print(f"\nctr-remote optimize took {reference.seconds:.1f}s; under lazyd: "
          + ", ".join(f"layer {i}: prefetch {counters[d]['prefetch_bytes']} demand {counters[d]['demand_bytes']}"
                      for i, d in enumerate(layers)))
    for d in layers:
        c = counters[d]
        if landmarks[d]:
            assert c["prefetch_state"] == "done" and c["prefetch_bytes"] >= landmarks[d] // 2, (d, c, landmarks[d])
        else:
            assert c["prefetch_bytes"] == 0, c


def _lists(registry: Registry, ref: str) -> list[list[str]]:
    return [prioritized_files(registry, layer["digest"])[0] for layer in manifest(registry, ref)["layers"]]


def test_ctr_remote_record_works_with_prioritized_only(reference: Reference, opt_registry: Registry) -> None:
    records = rec.load(reference.record)
    assert records, "ctr-remote recorded nothing"
    dst = f"{opt_registry.host}/debian-python:from-ctr-remote-record"
    summary = json.loads(lazyctl("image", "optimize", "--plain-http", "--json", "--prioritized-only",
                                 str(reference.record), reference.parents, dst).stdout)
    assert summary["profile"]["records_from"] == str(reference.record)
    wanted = rec.by_layer(records, summary["source_manifest"])
    got = _lists(opt_registry, dst)
    for i, files in enumerate(got):
        expected = [p for p in wanted.get(i, []) if p in reference.parents_files[i]]
        assert files == expected, f"layer {i}"
    assert sum(map(len, got)) > 50


def test_lazyctl_record_works_with_ctr_remote_record_in(reference: Reference, optimized: Optimized,
                                                        opt_stack: Stack, opt_registry: Registry) -> None:
    records = rec.load(optimized.record)
    dst = f"{opt_registry.host}/debian-python:from-lazyd-record"
    cd = opt_stack.containerd
    cd.ctr_remote("image", "convert", "--estargz", "--oci", "--estargz-record-in", str(optimized.record),
                  reference.parents, dst, namespace="ctr-remote", timeout=900)
    cd.ctr("images", "push", "--plain-http", dst, namespace="ctr-remote", timeout=600)
    # The reference applies the whole list to every layer, in record order, skipping absent files.
    paths = [r.path for r in records]
    got = _lists(opt_registry, dst)
    for i, files in enumerate(got):
        assert files == [p for p in dict.fromkeys(paths) if p in reference.parents_files[i]], f"layer {i}"
    ours = rec.by_layer(records)
    assert all(set(ours[i]) <= set(got[i]) for i in ours)


def test_lazyctl_optimized_image_prefetches_under_the_reference(optimized: Optimized, opt_registry: Registry,
                                                                tmp_path: Path) -> None:
    with RangeLogProxy(opt_registry.host) as proxy:
        ref = f"{proxy.host}/{optimized.ref.split('/', 1)[1]}"
        consumer = StargzConsumer(tmp_path / "stargz").start()
        try:
            cd = consumer.containerd
            cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "stargz", ref, timeout=600)
            out = cd.ctr("run", "--rm", "--snapshotter", "stargz", ref, "lazyd-opt", PY_CMD[0], PY_CMD[1],
                         PY_CMD[2] + "; print('ran')").stdout
            log = consumer.proc.log_text() if consumer.proc else ""
        finally:
            consumer.close()
        layers = [layer["digest"] for layer in manifest(opt_registry, optimized.ref)["layers"]]
        fetched: dict[str, Any] = {d: proxy.blob_fetches(d) for d in layers}
    assert out.strip() == "ran"
    for d in layers:
        end = landmark_offset(opt_registry, d)
        assert end, f"layer {d} has no prefetch landmark"
        ranges = [r for f in fetched[d] for r in (f.ranges or ())]
        prefetch = [r for r in ranges if r[0] == 0 and r[1] >= end - 1]
        assert prefetch, f"the reference made no prefetch request [0, {end}) for {d}: {ranges}\n{log[-2000:]}"
    print("\nreference on lazyctl's image: " + ", ".join(f"{len(fetched[d])} GETs for layer {i}"
                                                        for i, d in enumerate(layers)))
