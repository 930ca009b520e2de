"""Fuzz the footer parser (lazyd.estargz.footer): arbitrary tails, mutated real footers, any offset."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lazyd.estargz import FOOTER_SIZE, LEGACY_FOOTER_SIZE, FooterError, footer_bytes, read_footer
from tests.fuzz.conftest import FUZZ, CaseCounter, guarded
from tests.fuzz.strategies import mutated

MAX_BYTES = 256 * 1024  # a footer parse of <= 1 KiB input; zlib's inflate state is ~40 KiB


def legacy_footer(toc_offset: int) -> bytes:
    """The 47-byte legacy stargz footer (no 'SG' subfield header)."""
    return (b"\x1f\x8b\x08\x04" + b"\x00" * 4 + b"\x00\xff" + b"\x16\x00" + b"%016xSTARGZ" % toc_offset
            + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)


def check(tail: bytes, blob_size: int) -> None:
    out = guarded(lambda: read_footer(tail, blob_size), (FooterError,), max_bytes=MAX_BYTES)
    if out.error is None:
        footer = out.result
        assert footer.size in (FOOTER_SIZE, LEGACY_FOOTER_SIZE)
        assert 0 <= footer.toc_offset < blob_size - footer.size
        assert len(tail) >= footer.size
    else:
        assert str(out.error), "a FooterError must say what was wrong"


@FUZZ
@given(tail=st.binary(max_size=1024), blob_size=st.integers(-(2**64), 2**70))
def test_read_footer_arbitrary_bytes(cases: CaseCounter, tail: bytes, blob_size: int) -> None:
    cases.hit()
    check(tail, blob_size)


@FUZZ
@given(data=st.data(), toc_offset=st.integers(0, 2**64 - 1), legacy=st.booleans(),
       prefix=st.binary(max_size=64), extra=st.integers(0, 2**64))
def test_read_footer_mutated(cases: CaseCounter, data: st.DataObject, toc_offset: int, legacy: bool, prefix: bytes,
                             extra: int) -> None:
    cases.hit()
    seed = prefix + (legacy_footer(toc_offset) if legacy else footer_bytes(toc_offset))
    tail = data.draw(mutated(seed))
    check(tail, data.draw(st.sampled_from([len(tail), len(tail) + extra, toc_offset + extra, extra])))


@FUZZ
@given(toc_offset=st.integers(-(2**65), 2**65))
def test_footer_bytes_round_trip(cases: CaseCounter, toc_offset: int) -> None:
    """Any offset the footer can hold round-trips; any other is refused, never written malformed."""
    cases.hit()
    if not 0 <= toc_offset < 2**64:
        try:
            footer_bytes(toc_offset)
        except ValueError as exc:
            assert str(toc_offset) in str(exc)
            return
        raise AssertionError(f"footer_bytes({toc_offset}) wrote a footer")
    f = footer_bytes(toc_offset)
    assert len(f) == FOOTER_SIZE
    blob_size = toc_offset + FOOTER_SIZE + 1
    assert read_footer(f, blob_size).toc_offset == toc_offset
    assert read_footer(legacy_footer(toc_offset), blob_size).toc_offset == toc_offset
