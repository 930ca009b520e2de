"""Caps on the TOC member: its compressed size, the JSON it inflates to, and what follows the JSON.

A TOC bomb (a ~1 MB gzip member inflating to 1 GiB) must be refused without the process
growing anywhere near the bomb's size: the decode runs in a fresh interpreter and its peak
RSS (``VmHWM``: ``ru_maxrss`` would count the parent's pages the child shared before exec)
is checked.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyd.estargz import TOC, TOCDigestMismatch, TOCError, TruncatedBlobError, decode_toc_member, footer_bytes
from lazyd.estargz import toc as toc_module
from lazyd.estargz.toc import MAX_TOC_JSON_SIZE, TOC_TAR_SLACK

GIB = 1 << 30
PEAK_LIMIT_MIB = 256


def _tar_header(size: int, name: str = "stargz.index.json", fmt: int = tarfile.USTAR_FORMAT,
                pax: dict[str, str] | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 1_600_000_000
    if pax:
        info.pax_headers = pax
    return info.tobuf(format=fmt, encoding="utf-8", errors="surrogateescape")


def _member(parts: Iterator[bytes]) -> bytes:
    """One gzip member of the concatenated ``parts`` (streamed: nothing big is held)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(p) for p in parts]
    out.append(c.flush())
    return b"".join(out)


def _zeros(n: int) -> Iterator[bytes]:
    block = bytes(1 << 20)
    while n > 0:
        yield block[: min(n, len(block))]
        n -= len(block)


def _toc_member(json_bytes: bytes, **header: object) -> bytes:
    pad = -len(json_bytes) % 512
    return gzip.compress(_tar_header(len(json_bytes), **header) + json_bytes + bytes(pad + 1024))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def honest_bomb() -> bytes:
    """A tar header announcing 1 GiB of JSON, then 1 GiB of zeros: about 1 MB compressed."""
    return _member(iter([_tar_header(GIB), *_zeros(GIB)]))


@pytest.fixture(scope="module")
def lying_bomb() -> bytes:
    """A tar header announcing the largest JSON accepted, then 1 GiB of zeros."""
    return _member(iter([_tar_header(MAX_TOC_JSON_SIZE), *_zeros(GIB)]))


def _decode_in_child(tmp_path: Path, member: bytes, expected_digest: str | None = None) -> tuple[str, float]:
    """Decode ``member`` (+ a footer) in a fresh interpreter: (outcome, peak RSS in MiB)."""
    path = tmp_path / "member.bin"
    path.write_bytes(member + footer_bytes(0))
    script = (
        "import sys\n"
        "from lazyd.estargz import decode_toc_member, EStargzError\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "try:\n"
        "    out = 'ok %d' % len(decode_toc_member(data, sys.argv[2] or None))\n"
        "except EStargzError as exc:\n"
        "    out = '%s: %s' % (type(exc).__name__, exc)\n"
        "print(out)\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(path), expected_digest or ""], capture_output=True,
                       text=True, timeout=300, check=True)
    outcome, peak = r.stdout.strip().splitlines()
    return outcome, float(peak)


def test_honest_bomb_is_refused_at_its_header(tmp_path: Path, honest_bomb: bytes) -> None:
    assert len(honest_bomb) < 2 << 20
    outcome, peak = _decode_in_child(tmp_path, honest_bomb)
    assert outcome == f"TOCError: TOC JSON of {GIB} bytes is larger than {MAX_TOC_JSON_SIZE}"
    assert peak < 64, f"peak RSS {peak:.0f} MiB refusing a bomb whose header tells its size"


def test_lying_bomb_is_refused_under_the_rss_bound(tmp_path: Path, lying_bomb: bytes) -> None:
    """The header lies (the member goes on far past the JSON it announces): refused once the
    tar's slack is exceeded, having inflated at most the JSON cap."""
    outcome, peak = _decode_in_child(tmp_path, lying_bomb)
    assert outcome == (f"TOCError: TOC member goes on for more than {TOC_TAR_SLACK} bytes after the "
                       f"{MAX_TOC_JSON_SIZE}-byte JSON")
    assert peak < PEAK_LIMIT_MIB, f"peak RSS {peak:.0f} MiB refusing a TOC bomb"


def test_bomb_is_refused_keeping_nothing_when_the_digest_is_known(tmp_path: Path, lying_bomb: bytes) -> None:
    """With the expected digest (as the fetcher always has) the first pass keeps no byte."""
    outcome, peak = _decode_in_child(tmp_path, lying_bomb, "sha256:" + "0" * 64)
    assert outcome.startswith("TOCError: TOC member goes on for more than")
    assert peak < 64, f"peak RSS {peak:.0f} MiB refusing a TOC bomb of known digest"
    body = b'{"version":1,"entries":[]}' + b" " * (8 << 20)
    outcome, peak = _decode_in_child(tmp_path, _toc_member(body), "sha256:" + "0" * 64)
    assert outcome == f"TOCDigestMismatch: TOC digest is sha256:{hashlib.sha256(body).hexdigest()}, " \
                      f"expected sha256:{'0' * 64}"
    assert peak < 40, f"peak RSS {peak:.0f} MiB refusing an 8 MiB JSON of the wrong digest"


def test_member_larger_than_the_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    json_bytes = json.dumps({"version": 1, "entries": [{"name": f"f{i}", "type": "dir"} for i in range(5000)]})
    member = _toc_member(json_bytes.encode())
    assert decode_toc_member(member) == json_bytes.encode()
    monkeypatch.setattr(toc_module, "MAX_TOC_MEMBER_SIZE", len(member) // 2)
    with pytest.raises(TOCError, match=f"TOC member is larger than {len(member) // 2} bytes"):
        decode_toc_member(member + footer_bytes(0))
    # A member cut short (but within the cap) is still a truncated blob.
    with pytest.raises(TruncatedBlobError, match="TOC member is truncated"):
        decode_toc_member(member[: len(member) // 4])


def test_json_past_the_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"version":1,"entries":[]}' + b" " * 5000
    monkeypatch.setattr(toc_module, "MAX_TOC_JSON_SIZE", 4096)
    with pytest.raises(TOCError, match=f"TOC JSON of {len(body)} bytes is larger than 4096"):
        decode_toc_member(_toc_member(body))


def test_garbage_after_the_json_is_refused() -> None:
    body = b'{"version":1,"entries":[]}'
    member = _member(iter([_tar_header(len(body)), body, bytes(TOC_TAR_SLACK + (1 << 20))]))
    with pytest.raises(TOCError, match="goes on for more than"):
        decode_toc_member(member)
    # Up to the slack it is only tar padding.
    assert decode_toc_member(_member(iter([_tar_header(len(body)), body, bytes(100_000)]))) == body


def test_digest_is_checked_while_inflating() -> None:
    body = b'{"version":1,"entries":[{"name":"a","type":"dir"}]}'
    member = _toc_member(body)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert decode_toc_member(member, digest) == body
    with pytest.raises(TOCDigestMismatch, match=f"expected sha256:{'1' * 64}"):
        decode_toc_member(member, "sha256:" + "1" * 64)


def test_pax_and_gnu_wrappers_still_decode() -> None:
    body = b'{"version":1,"entries":[]}'
    assert decode_toc_member(_toc_member(body, fmt=tarfile.PAX_FORMAT, pax={"comment": "x" * 3000})) == body
    assert decode_toc_member(_toc_member(body, fmt=tarfile.GNU_FORMAT)) == body


def test_big_real_toc_loads(tmp_path: Path) -> None:
    """A 100,000-file TOC (about 36 MB of JSON, two digests per file) decodes and parses."""
    entries: list[dict[str, object]] = [{"name": "usr/", "type": "dir", "mode": 0o755}]
    offset = 100
    for i in range(100_000):
        digest = "sha256:" + hashlib.sha256(b"%d" % i).hexdigest()
        entries.append({"name": f"usr/lib/python3/dist-packages/pkg{i % 100:03d}/module_{i:06d}.py", "type": "reg",
                        "size": 1000, "mode": 0o644, "modtime": "2024-01-01T00:00:00Z", "offset": offset,
                        "digest": digest, "chunkDigest": digest})
        offset += 700
    body = json.dumps({"version": 1, "entries": entries}).encode()
    del entries
    assert len(body) > 30_000_000
    member = _toc_member(body)
    got = decode_toc_member(member + footer_bytes(offset), "sha256:" + hashlib.sha256(body).hexdigest())
    assert got == body
    toc = TOC.parse(got, None, offset)
    assert len(toc.chunks) == 100_000
    assert toc.lookup("usr/lib/python3/dist-packages/pkg007/module_000007.py") is not None
    outcome, peak = _decode_in_child(tmp_path, member)
    assert outcome == f"ok {len(body)}"
    # The JSON, its pieces while they are joined, and the interpreter.
    assert peak < 2.5 * len(body) / 2**20 + 40, f"peak RSS {peak:.0f} MiB decoding {len(body) / 2**20:.0f} MiB"
