"""Hypothesis strategies for TOC JSON documents and TOC members (gzip of a tar of the JSON)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from typing import Any

from hypothesis import strategies as st

from lazyd.estargz.entries import ENTRY_TYPES
from tests.fuzz.strategies import json_values

DIGEST = "sha256:" + "ab" * 32
_COMPONENTS = ["a", "b", "etc", "..", ".", "", ".wh.x", ".wh..wh..opq", ".prefetch.landmark", ".no.prefetch.landmark",
               "x\u00e9", " "]


@st.composite
def names(draw: st.DrawFn) -> str:
    """Entry names as hostile layers spell them: absolute, '..', '.', empty components, repeats."""
    lead = draw(st.sampled_from(["", "/", "./", "../", "../../"]))
    parts = draw(st.lists(st.sampled_from(_COMPONENTS), max_size=6))
    trail = draw(st.sampled_from(["", "/"]))
    return lead + "/".join(parts) + trail


_INTS = st.one_of(st.integers(0, 5000), st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**44, 2**44 + 1, 2**62, 2**63,
                                                          2**64, 2**64 + 1]))
_MODTIMES = st.sampled_from(["2023-11-14T22:13:20Z", "1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z",
                             "9999-12-31T23:59:59Z", "2262-04-12T00:00:00Z", "1677-09-20T00:00:00Z",
                             "2023-11-14T22:13:20.123456789+05:30", "2023-11-14", "noon", ""])
_FIELDS: dict[str, Any] = {
    "name": names(),
    "type": st.one_of(st.sampled_from(sorted(ENTRY_TYPES)), st.sampled_from(["sock", "", "REG"])),
    "size": _INTS, "mode": _INTS, "uid": _INTS, "gid": _INTS, "offset": _INTS, "devMajor": _INTS,
    "devMinor": _INTS, "chunkOffset": _INTS, "chunkSize": _INTS, "innerOffset": _INTS,
    "modtime": _MODTIMES,
    "linkName": names(),
    "userName": st.sampled_from(["", "root", "u\u00e9"]), "groupName": st.sampled_from(["", "wheel"]),
    "digest": st.sampled_from([DIGEST, "", "sha256:00", "md5:" + "a" * 32]),
    "chunkDigest": st.sampled_from([DIGEST, "", "sha256:zz"]),
    "xattrs": st.one_of(st.none(), st.dictionaries(st.sampled_from(["user.a", "security.capability", ""]),
                                                   st.sampled_from(["MQ==", "", "!!"]), max_size=2)),
}


@st.composite
def entries(draw: st.DrawFn) -> dict[str, Any]:
    """One entry: the fields a TOC uses with plausible or hostile values, sometimes any JSON value."""
    keys = draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=10, unique=True))
    entry: dict[str, Any] = {"type": draw(_FIELDS["type"]), "name": draw(_FIELDS["name"])}
    for key in keys:
        entry[key] = draw(st.one_of(_FIELDS[key], json_values) if draw(st.integers(0, 9)) == 0 else _FIELDS[key])
    if draw(st.integers(0, 9)) == 0:
        entry[draw(st.text(max_size=8))] = draw(json_values)
    return entry


@st.composite
def toc_documents(draw: st.DrawFn) -> bytes:
    doc: dict[str, Any] = {"version": draw(st.sampled_from([1, 0, 2, -1, 2**64]))}
    doc["entries"] = draw(st.lists(entries(), max_size=12))
    return json.dumps(doc).encode()


def tar_of(name: str, data: bytes, fmt: int = tarfile.USTAR_FORMAT, kind: bytes = tarfile.REGTYPE,
           pax: dict[str, str] | None = None) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt) as tf:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        if pax:
            info.pax_headers = pax
        tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return bio.getvalue()


def member_of(toc_json: bytes) -> bytes:
    """The TOC member a writer appends: gzip of a tar holding ``stargz.index.json``."""
    return gzip.compress(tar_of("stargz.index.json", toc_json), mtime=0)


_VALID_MODTIMES = st.sampled_from(["2023-11-14T22:13:20Z", "1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
                                   "0001-01-01T00:00:00Z", "2023-11-14T22:13:20.5-07:00"])




@st.composite
def non_root_names(draw: st.DrawFn) -> str:
    """Like ``names`` but never the layer root: the last component is a real name."""
    last = draw(st.sampled_from(["a", "b", "etc", "x\u00e9", ".wh.x", ".prefetch.landmark", ".no.prefetch.landmark"]))
    return draw(names()).rstrip("/") + "/" + last + draw(st.sampled_from(["", "/"]))


_NON_ROOT_NAMES = non_root_names()
_VALID_XATTRS = st.dictionaries(st.sampled_from(["user.a", "security.capability"]), st.sampled_from(["MQ==", ""]),
                                max_size=2)


@st.composite
def plausible_documents(draw: st.DrawFn) -> bytes:
    """TOCs that mostly follow the rules (payload offsets increase, chunks cover their file,
    hardlinks name earlier entries) so the tree and chunk table get built, with hostile names,
    ids, times and link targets; a few entries may still break a rule."""
    out: list[dict[str, Any]] = []
    offset = draw(st.integers(0, 100))
    seen: list[str] = []
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["dir", "reg", "reg", "symlink", "hardlink", "char", "block", "fifo"]))
        e: dict[str, Any] = {"name": draw(_NON_ROOT_NAMES if draw(st.integers(0, 9)) else names()), "type": kind}
        for key in draw(st.lists(st.sampled_from(["mode", "uid", "gid", "modtime", "userName", "xattrs"]),
                                 max_size=3, unique=True)):
            e[key] = draw(_VALID_MODTIMES if key == "modtime" else _VALID_XATTRS if key == "xattrs" else _FIELDS[key])
        if kind in ("symlink", "hardlink"):
            e["linkName"] = draw(st.sampled_from(seen) if seen and draw(st.booleans()) else _NON_ROOT_NAMES)
        if kind in ("char", "block"):
            e["devMajor"], e["devMinor"] = draw(_INTS), draw(_INTS)
        chunk_entries: list[dict[str, Any]] = []
        if kind == "reg":
            size = draw(st.sampled_from([0, 0, 1, 100, 5000, 2**30, 3 * 2**30]))
            e["size"] = size
            if size:
                offset += draw(st.integers(1, 50))
                e.update(offset=offset, digest=DIGEST, chunkDigest=DIGEST)
                pieces = max(-(-size // 2**30), draw(st.integers(1, 3)) if size > 2 else 1)
                step = size // pieces
                if pieces > 1:
                    e["chunkSize"] = step
                for i in range(1, pieces):
                    offset += draw(st.integers(0, 50))  # 0: the next chunk shares the member (innerOffset)
                    c = {"type": "chunk", "name": e["name"], "offset": offset, "chunkOffset": i * step,
                         "chunkDigest": DIGEST, "innerOffset": draw(st.integers(0, 3)) * 512}
                    if i < pieces - 1:
                        c["chunkSize"] = step
                    chunk_entries.append(c)
        out.append(e)
        out.extend(chunk_entries)
        seen.append(e["name"])
    if out and draw(st.integers(0, 3)) == 0:  # one broken rule
        victim = draw(st.sampled_from(out))
        key = draw(st.sampled_from(sorted(_FIELDS)))
        victim[key] = draw(_FIELDS[key])
    return json.dumps({"version": 1, "entries": out}).encode()
