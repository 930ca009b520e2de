"""Footer and TOC of a layer in one range GET (the pull step's critical path), against a real registry.

The layer table reads ``tail_size(blob_size)`` bytes from the end of the blob first; only a
TOC that does not fit costs a second GET, of the TOC bytes still missing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lazyd.api.messages import ANNOTATION_TOC_DIGEST
from lazyd.estargz import TOC
from lazyd.fetcher import layers as layers_mod
from lazyd.fetcher.layers import MAX_TAIL_SIZE, TAIL_SIZE, Layer, LayerTable, tail_size
from lazyd.registry import Reference, RegistryClient, RegistryConfig

from .conftest import Images

pytestmark = pytest.mark.timeout(120)


def test_tail_size_bounds() -> None:
    assert tail_size(1000) == 1000  # a tiny blob is read whole
    assert tail_size(1 << 20) == TAIL_SIZE
    assert tail_size(51_254_519) == 51_254_519 // 128  # the debian layer: its 349 KB TOC fits
    assert tail_size(10 << 30) == MAX_TAIL_SIZE


def _open_all(ref_text: str, root: Path) -> tuple[list[Layer], list[str]]:
    """Open every eStargz layer of the image with a fresh layer table; (layers, TOC digests)."""

    async def go() -> tuple[list[Layer], list[str]]:
        ref = Reference.parse(ref_text)
        async with RegistryClient(RegistryConfig(plain_http=[ref.registry])) as client:
            image = await client.resolve(ref)
            table = LayerTable(root, client)
            table.remember(image)
            descs = [d for d in image.layers if d.annotations.get(ANNOTATION_TOC_DIGEST)]
            opened = [await table.open(image.ref, d.digest, d.annotations[ANNOTATION_TOC_DIGEST], 60.0)
                      for d in descs]
            return opened, [d.annotations[ANNOTATION_TOC_DIGEST] for d in descs]

    return asyncio.run(go())


def test_footer_and_toc_in_one_get(images: Images, tmp_path: Path) -> None:
    opened, digests = _open_all(images.esgz, tmp_path)
    assert opened
    for layer, digest in zip(opened, digests):
        assert layer.meta.toc_digest == digest
        assert layer.counters.registry_requests == 1, layer.digest  # no HEAD, one range GET
        assert TOC.parse(layer.toc_path.read_bytes(), digest, layer.meta.toc_offset).entries


def test_toc_bigger_than_the_tail_costs_one_more_get_of_its_head(images: Images, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers_mod, "TAIL_SIZE", 256)
    monkeypatch.setattr(layers_mod, "MAX_TAIL_SIZE", 256)
    opened, digests = _open_all(images.esgz, tmp_path)
    for layer, digest in zip(opened, digests):
        assert layer.meta.blob_size - layer.meta.toc_offset > 256  # the TOC did not fit in the tail
        assert layer.counters.registry_requests == 2, layer.digest
        # verified against the TOC digest while opening, and whole on disk
        assert TOC.parse(layer.toc_path.read_bytes(), digest, layer.meta.toc_offset).entries
