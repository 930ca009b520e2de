"""TOC JSON decoding (lazyd.estargz.entries): the msgspec fast path accepts exactly what the
field-by-field checks accept, and every rejection names the entry and field at fault."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyd.estargz import TOC, TOCError
from lazyd.estargz.entries import _check_raw_entry
from tests.support.tocs import D, toc_json


@pytest.mark.parametrize("doc, message", [
    (b"[1, 2]", "TOC JSON is a list, not an object"),
    (b'{"version": 1}', "TOC JSON has no 'entries' list"),
    (b'{"version": "1", "entries": []}', "TOC version must be an integer, got '1'"),
    (b'{"version": 1.0, "entries": []}', "TOC version must be an integer, got 1.0"),
    (b'{"entries": [[1]]}', "entry 0 is a list, not an object"),
    (toc_json({"name": "a", "type": "dir", "mode": True}), r"entry 0 'a': mode must be an integer, got True"),
    (toc_json({"name": "a", "type": "dir", "uid": 1.5}), r"entry 0 'a': uid must be an integer, got 1.5"),
    (toc_json({"name": "a", "type": "dir", "gid": -2}), r"entry 0 'a': gid is negative \(-2\)"),
    (toc_json({"name": 7, "type": "dir"}), "entry 0 \\(unnamed\\): name must be a string, got 7"),
    (toc_json({"name": "a", "type": "dir", "userName": None}), "entry 0 'a': userName must be a string, got None"),
    (toc_json({"name": "a", "type": "dir", "xattrs": []}), "entry 0 'a': xattrs must be an object"),
    (toc_json({"name": "a", "type": "dir", "xattrs": {"user.x": 1}}), "xattr 'user.x' must be a base64 string"),
    (toc_json({"name": "a", "type": "dir"}, {"name": "b", "type": "reg", "digest": "sha256:AB"}),
     "entry 1 'b': digest 'sha256:AB' is not sha256:<64 hex>"),
    (toc_json({"name": "a", "type": "symlink", "linkName": ""}), "entry 0 'a': symlink is missing field 'linkName'"),
    (toc_json({"name": "./x", "type": "dir", "modtime": "noon"}), "entry 0 './x': modtime 'noon' is not RFC 3339"),
    (b'{"entries": [' * 5000, "TOC is not JSON|nested too deeply"),
    (b'{"entries": []', "TOC is not JSON"),
    (b'{"entries": ["\xff"]}', "TOC is not JSON"),
])
def test_rejections_name_what_is_wrong(doc: bytes, message: str) -> None:
    with pytest.raises(TOCError, match=message):
        TOC.parse(doc)


def test_first_bad_entry_is_reported_whichever_check_finds_it() -> None:
    """Entry 1 lacks a name (found after decoding), entry 2 has a bad type (found while
    decoding): the error is still about entry 1, as a field-by-field check finds it."""
    with pytest.raises(TOCError, match="entry 1 \\(unnamed\\): missing field 'name'"):
        TOC.parse(toc_json({"name": "a", "type": "dir"}, {"type": "dir"}, {"name": "c", "type": "sock"}))


def test_derived_fields_cannot_be_set_by_a_toc() -> None:
    t = TOC.parse(toc_json(
        {"name": "d", "type": "dir", "lazyd:implied": True, "lazyd:numLink": 99, "lazyd:modtime": 5.0,
         "lazyd:children": {"evil": {"name": "/etc/shadow", "type": "reg"}}},
        {"name": "f", "type": "reg", "lazyd:chunks": [], "lazyd:implied": True, "future": {"any": ["thing"]}},
        {"name": "g", "type": "dir", "xattrs": None, "modtime": "2023-11-14T22:13:20Z"},
    ))
    d, f, g = (t.lookup(n) for n in "dfg")
    assert d is not None and not d.implied and d.num_link == 2 and d.children == {} and d.modtime == 0.0
    assert f is not None and not f.implied and f.chunks == () and f.children is None
    assert g is not None and g.xattrs == {} and g.modtime == 1_700_000_000.0
    assert t.names() == ["", "d", "f", "g"]


_KEYS = ["name", "type", "size", "mode", "uid", "gid", "offset", "devMajor", "devMinor", "chunkOffset",
         "chunkSize", "innerOffset", "modtime", "linkName", "userName", "groupName", "digest", "chunkDigest",
         "xattrs", "other"]
_VALUES = st.one_of(
    st.integers(min_value=-3, max_value=1 << 70), st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["", "a", "./a/", "/", "../x", "a\x00b", "dir", "reg", "symlink", "hardlink", "chunk", "fifo",
                     D, "sha256:00", "2023-11-14T22:13:20Z", "yesterday", "MQ==", "!!"]),
    st.dictionaries(st.sampled_from(["user.a", "user.b"]), st.sampled_from(["MQ==", "!!", 3]), max_size=2),
    st.lists(st.integers(), max_size=2),
)
_ENTRY = st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(_ENTRY, _VALUES))
def test_fast_path_agrees_with_field_checks(raw: Any) -> None:
    """One entry: the decoder rejects it with the field checks' message, or both accept it
    (and then parsing fails only on layout or tree rules, never on a field)."""
    doc = toc_json({"name": "", "type": "dir"}, raw)
    try:
        _check_raw_entry(1, raw)
    except TOCError as exc:
        with pytest.raises(TOCError) as got:
            TOC.parse(doc)
        assert str(got.value) == str(exc)
        return
    try:
        TOC.parse(doc)
    except TOCError as exc:
        assert "does not validate" not in str(exc), (raw, exc)
        assert "must be" not in str(exc) and "is negative" not in str(exc), (raw, exc)
