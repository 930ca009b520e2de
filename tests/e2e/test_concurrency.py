"""Eight containers of one lazily pulled image started at once: all succeed, every chunk is fetched once.

The registry is reached through a proxy that records the byte ranges of every blob GET,
so "fetched once" is checked from outside lazyd: no payload byte of any layer (below its
TOC) is downloaded twice.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.images import manifest_of
from tests.e2e.rangeproxy import RangeLogProxy
from tests.support.registry import Registry

from .conftest import SNAPSHOTTER, Images, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

N = 8
PROBE = 512
CODE = "import json, email.parser, http.client, decimal; print('container', {n}, decimal.Decimal(1) / 8)"


def toc_offset(blob: Path) -> int:
    """The TOC offset from an eStargz footer (``%016x`` followed by ``STARGZ`` in the last gzip member)."""
    with open(blob, "rb") as f:
        f.seek(-51, 2)
        tail = f.read()
    m = re.search(rb"([0-9a-f]{16})STARGZ", tail)
    assert m, f"{blob} has no eStargz footer"
    return int(m.group(1), 16)


def test_eight_containers_at_once_fetch_each_chunk_once(stack: Stack, images: Images, registry: Registry) -> None:
    _, manifest = manifest_of(images.debian_esgz_layout, "latest")
    blobs = {layer["digest"]: images.debian_esgz_layout / "blobs/sha256" / layer["digest"].split(":")[1]
             for layer in manifest["layers"]}
    with RangeLogProxy(registry.host) as proxy:
        proxy.sizes.update({d: p.stat().st_size for d, p in blobs.items()})
        ref = f"{proxy.host}/{images.debian_esgz.split('/', 1)[1]}"
        result = stack.rpull(ref)
        assert [layer["mode"] for layer in result["layers"]] == ["lazy", "lazy"], result
        procs = [subprocess.Popen(["ctr", "-a", stack.address, "run", "--rm", "--snapshotter", SNAPSHOTTER, ref,
                                   f"c{n}", "python3", "-c", CODE.format(n=n)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(N)]
        outputs = [p.communicate(timeout=240) for p in procs]
        for n, (p, (out, err)) in enumerate(zip(procs, outputs)):
            assert p.returncode == 0, f"container {n} failed: {out}{err}"
            assert out == f"container {n} 0.125\n"

        payload_bytes = 0
        for digest, blob in blobs.items():
            end = toc_offset(blob)
            size = blob.stat().st_size
            spans: list[tuple[int, int]] = []
            for fetch in proxy.blob_fetches(digest):
                for start, stop in fetch.ranges if fetch.ranges is not None else ((0, size - 1),):
                    if start == 0 and stop < PROBE:
                        continue  # a range-support probe (the reference client sends bytes=0-1), not a chunk
                    if start < end:
                        spans.append((start, min(stop, end - 1)))
            spans.sort()
            for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
                assert s2 > e1, f"layer {digest}: bytes {s2}-{min(e1, e2)} were fetched more than once"
            payload_bytes += sum(e - s + 1 for s, e in spans)
    assert payload_bytes > 0, "no layer payload came through the registry: the test proved nothing"
