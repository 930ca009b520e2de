"""Property test: random trees written by our writer read back exactly (bytes and metadata)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytest

from lazyd.estargz import BuildOptions, build
from tests.estargz.trees import Spec, check_blob_against_tar, reference_verify, write_tar

_names = st.text(alphabet=st.sampled_from("abcXYZ019-_.éü文 "), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh."))


@st.composite
def trees(draw: st.DrawFn) -> list[Spec]:
    dirs = draw(st.lists(_names, max_size=4, unique=True))
    specs = [Spec(d + "/", "dir", mode=draw(st.sampled_from([0o755, 0o700, 0o1777]))) for d in dirs]
    used = set(dirs)
    files: list[str] = []
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.sampled_from(["", *[d + "/" for d in dirs]]))
        name = parent + draw(_names)
        if name in used:
            continue
        used.add(name)
        kind = draw(st.sampled_from(["reg", "reg", "reg", "symlink", "hardlink", "fifo", "char"]))
        if kind == "hardlink" and not files:
            kind = "reg"
        spec = Spec(name, kind, uid=draw(st.integers(0, 70000)), gid=draw(st.integers(0, 3)),
                    mode=draw(st.integers(0, 0o7777)), mtime=draw(st.integers(1, 2**33)))
        if kind == "reg":
            size = draw(st.sampled_from([0, 1, 511, 512, 1000, 2500]))
            spec.data = draw(st.binary(min_size=size, max_size=size)) if size < 600 else bytes(
                (i * 7 + size) % 251 for i in range(size))
            if draw(st.booleans()):
                spec.xattrs = {"user." + draw(_names): draw(st.text(max_size=8))}
            files.append(name)
        elif kind == "symlink":
            spec.link = draw(_names)
        elif kind == "hardlink":
            spec.link = draw(st.sampled_from(files))
        elif kind == "char":
            spec.dev = (draw(st.integers(0, 255)), draw(st.integers(0, 255)))
        specs.append(spec)
    return specs


@pytest.mark.usefixtures("reference_tools")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=trees(), chunk_size=st.sampled_from([512, 1000, 4 << 20]),
       prioritize=st.booleans())
def test_write_read_roundtrip(specs: list[Spec], chunk_size: int, prioritize: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = write_tar(Path(tmp) / "in.tar", specs)
        prio = [s.name for s in specs if s.kind == "reg"][:2] if prioritize else []
        blob = Path(tmp) / "out.esgz"
        result = build(src, blob, BuildOptions(chunk_size=chunk_size, level=1, prioritized=prio))
        check_blob_against_tar(blob, src, result.toc_digest)
        proc = reference_verify(blob, result.toc_digest)
        assert proc.returncode == 0, proc.stderr
