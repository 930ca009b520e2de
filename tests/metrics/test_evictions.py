"""Evictions under a small ``cache_size``: counted in ``lazyd_cache_evictions_total`` and logged."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.support.procs import wait_until
from tests.support.registry import Registry
from tests.support.small_cache import build_image, random_text

from .conftest import DEMAND_ONLY, MetricsFactory
from .scrape import scrape

CHUNK = 512 * 1024
FILES = {f"f{i}.txt": 6 * 1024 * 1024 for i in range(4)}


def test_evictions_counted_and_logged(metrics_daemon: MetricsFactory, registry: Registry, tmp_path: Path) -> None:
    rnd = random.Random(7)
    files = {name: random_text(rnd, size) for name, size in FILES.items()}
    image, _ = build_image(registry.host, "metrics-evict:t", files, tmp_path / "image", chunk_size=CHUNK)
    chunks = sum(-(-size // CHUNK) for size in FILES.values())  # 48 chunks of 512 KiB: 24 MiB
    md = metrics_daemon(extra=f'{DEMAND_ONLY}\nlog_format = "json"', cache_size=16 * 1024 * 1024)
    d = md.daemon
    (layer,) = image.layers
    mp = d.mount_layer(image.ref, layer, "l")
    for name, data in files.items():
        assert (mp / name).read_bytes() == data
    s = scrape(md.address)
    evicted, kept = s.value("lazyd_cache_evictions_total"), s.value("lazyd_cache_chunks")
    print(f"{chunks} chunks read through a 16 MiB cache: {evicted:.0f} evicted, {kept:.0f} kept, "
          f"{s.value('lazyd_cache_bytes'):.0f} bytes on disk")
    # Every chunk was stored at least once: those not in the store now were evicted.
    assert evicted >= chunks - kept > 0
    assert s.value("lazyd_cache_bytes") <= 16 * 1024 * 1024

    def logged() -> int:
        recs = [json.loads(line) for line in d.log.read_text().splitlines()]
        return sum(int(r["chunks"]) for r in recs if r.get("event") == "eviction")

    # The fetcher reports evictions in one line every few seconds (COUNTERS_SAVE_INTERVAL).
    wait_until(lambda: logged() >= evicted, 15, "the evictions to be logged")
    assert logged() == evicted == scrape(md.address).value("lazyd_cache_evictions_total")
