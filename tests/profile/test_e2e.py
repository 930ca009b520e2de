"""A prefetch profile on an unchanged eStargz image, end to end: recorded with
``lazyctl profile record`` (containerd + runc on traced lazy mounts), pushed with ``lazyctl
profile push``, then on a fresh lazyd root with ``profiles = "registry"``: ``lazyctl rpull``
fetches the profiled chunks before it returns and ``ctr run`` of the workload makes no
on-demand fetch (counters and the proxy's range log say so)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from lazyd.profile.records import loads
from tests.e2e.conftest import Images, Stack, images, registry  # noqa: F401 (fixtures)
from tests.e2e.images import manifest_of
from tests.e2e.rangeproxy import RangeLogProxy
from tests.support.registry import Registry

WORKLOAD = ["python3", "-c", "import json"]


def _lazyctl(stack: Stack, *args: str) -> str:
    proc = subprocess.run(["lazyctl", *args, "--socket", str(stack.lazyd_socket)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"lazyctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_pushed_profile_prefetches_before_the_container_starts_and_nothing_is_fetched_on_demand(
        tmp_path: Path, images: Images, registry: Registry) -> None:  # noqa: F811
    ref = images.debian_esgz
    mdigest, manifest = manifest_of(images.debian_esgz_layout, "latest")
    layers = [layer["digest"] for layer in manifest["layers"]]
    recorder = Stack(tmp_path / "a", config={"profiles": "local"})
    try:
        recorder.start()
        recorded = json.loads(_lazyctl(recorder, "profile", "record", ref, "--plain-http", "--address",
                                       recorder.address, "--args", json.dumps(WORKLOAD), "--record-out",
                                       str(tmp_path / "record.jsonl"), "--json"))
        assert recorded["manifest_digest"] == mdigest and recorded["exit_code"] == 0
        records = loads((tmp_path / "record.jsonl").read_text())
        assert any(r.path.endswith("json/__init__.py") or "json/__pycache__/__init__" in r.path for r in records)
        pushed = json.loads(_lazyctl(recorder, "profile", "push", ref, "--plain-http", "--json"))
        assert pushed["method"] == "referrers-tag" and pushed["subject"] == mdigest
    finally:
        recorder.close()

    fresh = Stack(tmp_path / "b", config={"profiles": "registry", "prefetch_wait": True, "background_fetch": False,
                                          "prefetch_timeout": 60.0})
    try:
        fresh.start()
        with RangeLogProxy(registry.host) as proxy:
            pulled_ref = f"{proxy.host}/{ref.split('/', 1)[1]}"
            result = fresh.rpull(pulled_ref)
            assert [layer["mode"] for layer in result["layers"]] == ["lazy", "lazy"], result
            st = fresh.status()
            used = {m["layer_digest"]: m for m in st["mounts"]}
            profiled_layers = {r.layer_index for r in records}
            for i in profiled_layers:
                m = used[layers[i]]
                assert (m["profile"], m["profile_source"]) == (mdigest, "registry"), m
                assert m["profile_files"] > 0 and m["profile_bytes"] > 0, m
            assert st["totals"]["prefetch_bytes"] >= sum(used[layers[i]]["profile_bytes"] for i in profiled_layers)
            assert st["totals"]["demand_bytes"] == 0
            sizes = {layer["digest"]: layer["size"] for layer in manifest["layers"]}
            for i in profiled_layers:  # one (multi-range) request per layer, besides the footer/TOC read
                gets = [f for f in proxy.blob_fetches(layers[i])
                        if f.ranges is not None and f.ranges[-1][1] != sizes[layers[i]] - 1]
                assert len(gets) == 1, gets
            before = {d: len(proxy.blob_fetches(d)) for d in layers}
            run = fresh.ctr("run", "--rm", "--snapshotter", "lazyd", pulled_ref, "profiled", *WORKLOAD)
            assert run.returncode == 0, run.stderr
            after = fresh.status()
            assert after["totals"]["demand_bytes"] == 0, after["totals"]
            assert {d: len(proxy.blob_fetches(d)) for d in layers} == before, "range requests during the run"
    finally:
        fresh.close()
