"""The fallback check the interop matrix and the benchmarks use (``consumers.lazyd_fallbacks``)."""

from __future__ import annotations

from tests.interop.consumers import lazyd_fallbacks

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64
PULLED = {"layers": [{"digest": A, "mode": "lazy"}, {"digest": B, "mode": "lazy"}]}


def _status(mounted: list[str], local: list[tuple[str, str]] = (), fallbacks: list[str] = ()) -> dict:
    return {"mounts": [{"layer_digest": d} for d in mounted],
            "local_layers": [{"layer_digest": d, "state": s} for d, s in local],
            "fallbacks": [{"layer_digest": d, "reason": "not_estargz"} for d in fallbacks]}


def test_every_layer_mounted_is_no_fallback() -> None:
    assert lazyd_fallbacks([A, B], PULLED, _status([A, B]), set()) == []


def test_a_layer_promoted_and_released_is_no_fallback() -> None:
    # Fetched in full during a long run, extracted, its FUSE mount released after the container exited.
    assert lazyd_fallbacks([A, B], PULLED, _status([B], local=[(A, "local")]), set()) == []


def test_missing_mounts_downloads_and_recorded_fallbacks_are_named() -> None:
    assert lazyd_fallbacks([A, B], PULLED, _status([B], local=[(A, "promoting")]), set()) == [
        f"{A[:19]}: no lazyd mount"]
    out = lazyd_fallbacks([A, B], {"layers": [{"digest": A, "mode": "lazy"},
                                              {"digest": B, "mode": "pull", "reason": "no TOC"}]},
                          _status([A], fallbacks=[B]), {B})
    assert out == [f"{B[:19]}: rpull mode pull (no TOC); lazyd recorded a fallback: not_estargz; no lazyd mount; "
                   "blob downloaded into containerd"]
