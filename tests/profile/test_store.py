"""The local profile store (lazyd.profile.store): bounds, atomic writes, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazyd.profile import store as store_mod
from lazyd.profile.records import Record, dumps
from lazyd.profile.store import MAX_PROFILE_BYTES, ProfileStore, ProfileStoreError, validate

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def records(n: int = 3, digest: str | None = DIGEST) -> bytes:
    return dumps([Record(f"usr/lib/f{i}", digest, i % 2) for i in range(n)]).encode()


def test_put_get_load_list_delete(tmp_path: Path) -> None:
    s = ProfileStore(tmp_path / "profiles")
    assert s.get(DIGEST) is None and s.load(DIGEST) is None and not s.has_any()
    got = s.put(DIGEST, records(5))
    assert [r.path for r in got] == [f"usr/lib/f{i}" for i in range(5)]
    assert s.get(DIGEST) == records(5)
    assert (tmp_path / "profiles" / f"{'a' * 64}.jsonl").read_bytes() == records(5)
    assert s.load(DIGEST) == got and s.has_any()
    (info,) = s.summaries()
    assert (info.manifest_digest, info.records, info.layers, info.size) == (DIGEST, 5, 2, len(records(5)))
    s.put(DIGEST, records(2))  # replaces
    assert s.get(DIGEST) == records(2)
    assert s.delete(DIGEST) and not s.delete(DIGEST)
    assert s.get(DIGEST) is None and s.summaries() == []


def test_records_without_manifest_digest_are_accepted(tmp_path: Path) -> None:
    s = ProfileStore(tmp_path)
    assert len(s.put(DIGEST, records(3, digest=None))) == 3


@pytest.mark.parametrize(("data", "why"), [
    (b"", "holds no records"),
    (b"\n\n", "holds no records"),
    (b"{not json}\n", "not JSON"),
    (b'{"path": "a", "layerIndex": 0}\n\xff\xfe\n', "not UTF-8"),
    (b'["a"]\n', "expected a JSON object"),
    (b'{"path": "a"}\n', "has no layerIndex"),
    (b'{"path": "a", "layerIndex": -1}\n', "layerIndex"),
    (b'{"path": "a", "layerIndex": 0, "manifestDigest": "md5:x"}\n', "not a sha256 digest"),
    (b'{"path": "", "layerIndex": 0}\n', "non-empty string"),
    (('{"path": "a", "layerIndex": 0, "manifestDigest": "%s"}\n' % OTHER).encode(), "another manifest"),
])
def test_bad_profiles_are_refused_and_nothing_is_written(tmp_path: Path, data: bytes, why: str) -> None:
    s = ProfileStore(tmp_path / "p")
    with pytest.raises(ProfileStoreError, match=why):
        s.put(DIGEST, data)
    assert not (tmp_path / "p").exists() or list((tmp_path / "p").iterdir()) == []


@pytest.mark.parametrize("digest", ["sha256:" + "A" * 64, "sha256:abc", "sha512:" + "a" * 128, "sha256:../../etc",
                                    "sha256:" + "a" * 64 + "/x", ""])
def test_bad_digests_are_refused(tmp_path: Path, digest: str) -> None:
    s = ProfileStore(tmp_path)
    with pytest.raises(ProfileStoreError, match="is not sha256"):
        s.put(digest, records())
    with pytest.raises(ProfileStoreError, match="is not sha256"):
        s.get(digest)
    assert list(tmp_path.iterdir()) == []


def test_size_bound(tmp_path: Path) -> None:
    line = b'{"path":"usr/lib/python3.11/some/module/name/x.py","layerIndex":1}\n'
    big = line * (MAX_PROFILE_BYTES // len(line) + 1)
    assert len(big) > MAX_PROFILE_BYTES
    s = ProfileStore(tmp_path)
    with pytest.raises(ProfileStoreError, match=f"more than the {MAX_PROFILE_BYTES}"):
        s.put(DIGEST, big)
    just = line * (MAX_PROFILE_BYTES // len(line))
    assert len(s.put(DIGEST, just)) == MAX_PROFILE_BYTES // len(line)
    # A file grown past the bound behind lazyd's back is refused on read.
    (tmp_path / f"{'a' * 64}.jsonl").write_bytes(big)
    with pytest.raises(ProfileStoreError, match="more than"):
        s.get(DIGEST)
    assert s.summaries() == []  # logged and left out


def test_count_bound_removes_the_oldest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "MAX_PROFILES", 3)
    s = ProfileStore(tmp_path)
    digests = [f"sha256:{c * 64}" for c in "1234"]
    for i, d in enumerate(digests):
        s.put(d, records(1, digest=None))
        os.utime(s.path(d), (1000 + i, 1000 + i))
    s.put(digests[3], records(2, digest=None))  # replacing one removes nothing
    s.put("sha256:" + "5" * 64, records(1, digest=None))
    kept = sorted(i.manifest_digest for i in s.summaries())
    assert len(kept) == 3 and digests[0] not in kept and digests[1] not in kept


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = ProfileStore(tmp_path)
    s.put(DIGEST, records(2))

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", broken_replace)
    with pytest.raises(ProfileStoreError, match="No space left on device"):
        s.put(DIGEST, records(7))
    monkeypatch.undo()
    assert s.get(DIGEST) == records(2)  # the old profile, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{'a' * 64}.jsonl"]  # no temporary file left


def test_validate_names_the_source() -> None:
    with pytest.raises(ProfileStoreError, match="registry blob x line 1: not JSON"):
        validate(DIGEST, b"nope\n", "registry blob x")
