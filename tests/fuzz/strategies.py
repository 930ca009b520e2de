"""Hypothesis strategies shared by the fuzz tests: msgpack values, JSON documents, byte mutations."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

# Scalars msgpack can carry (raw=False: str and bytes are distinct).
msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(INT64_MIN, UINT64_MAX),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, UINT64_MAX, INT64_MIN]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=64),
    st.sampled_from(["", "/", "/..", "/tmp", "../../etc/x", "sha256:" + "a" * 64, "\x00", "demand", "evict",
                     "stats", "worker.mount", "status"]),
    st.integers(4090, 4100).map(lambda n: "/" + "a" * n),  # around the 4096-character field limit
    st.binary(max_size=64),
)

# Any value msgpack.unpackb(raw=False, strict_map_key=True) can return.
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=16), st.binary(max_size=8)), inner, max_size=6),
    ),
    max_leaves=24,
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=32),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=20,
)


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, max_edits: int = 4) -> bytes:
    """``seed`` with a few byte flips, overwrites, insertions, deletions or a truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, max_edits))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, ord("0"), ord("f"), ord("z")]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "dup" and data:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


def deep(value: Any, depth: int, as_map: bool = False) -> Any:
    """``value`` wrapped in ``depth`` one-item arrays (or maps keyed "k")."""
    for _ in range(depth):
        value = {"k": value} if as_map else [value]
    return value
