"""``lazyctl layer convert`` / ``lazyctl layer inspect`` end to end, as subprocesses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.estargz.trees import reference_verify


def lazyctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["lazyctl", "layer", *args], capture_output=True, timeout=120)


@pytest.mark.usefixtures("reference_tools")
def test_convert_json_then_inspect(tmp_path: Path, every_type_tar: Path) -> None:
    prio = tmp_path / "prio.txt"
    prio.write_text("usr/bin/tool\n\netc/hosts\n")
    out = tmp_path / "out.esgz"
    proc = lazyctl("convert", str(every_type_tar), str(out), "--prioritized", str(prio), "--chunk-size", "5000",
                   "--level", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert set(info) == {"tocDigest", "diffID", "blobDigest", "blobSize", "uncompressedSize"}
    assert info["blobSize"] == out.stat().st_size
    assert reference_verify(out, info["tocDigest"]).returncode == 0

    proc = lazyctl("inspect", str(out), "--toc-digest", info["tocDigest"], "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tocDigest"] == info["tocDigest"] and summary["tocDigestVerified"]
    assert summary["chunksVerified"] == summary["chunks"] > 4 and summary["prefetchEnd"] > 0

    proc = lazyctl("inspect", str(out), "--list")
    assert proc.returncode == 0
    text = proc.stdout.decode()
    assert "usr/bin/tool" in text and "etc/alt -> /etc/hosts" in text and "crw-rw-rw-" in text

    proc = lazyctl("inspect", str(out), "--list", "--json")
    listed = {e["name"]: e for e in json.loads(proc.stdout)["list"]}
    assert listed["dev/sda"]["devMajor"] == 8 and listed["etc/secret"]["xattrs"] == ["security.capability",
                                                                                  "user.comment"]

    proc = lazyctl("inspect", str(out), "--extract", "usr/bin/tool")
    assert proc.returncode == 0 and proc.stdout == (bytes(range(256)) * 79)[:20_000]

    proc = lazyctl("convert", str(every_type_tar), str(tmp_path / "h.esgz"))
    assert proc.returncode == 0 and b"tocDigest" in proc.stdout and b"sha256:" in proc.stdout


def test_failures_exit_nonzero_with_message(tmp_path: Path, every_type_tar: Path) -> None:
    proc = lazyctl("convert", str(tmp_path / "missing.tar"), str(tmp_path / "o"))
    assert proc.returncode == 1 and b"error: layer convert" in proc.stderr and b"No such file" in proc.stderr
    prio = tmp_path / "prio.txt"
    prio.write_text("not/there\n")
    proc = lazyctl("convert", str(every_type_tar), str(tmp_path / "o"), "--prioritized", str(prio))
    assert proc.returncode == 1 and b"prioritized file 'not/there' is not in the layer" in proc.stderr

    out = tmp_path / "out.esgz"
    assert lazyctl("convert", str(every_type_tar), str(out), "--chunk-size", "3000").returncode == 0
    proc = lazyctl("inspect", str(out), "--toc-digest", "sha256:" + "0" * 64)
    assert proc.returncode == 1 and b"expected sha256:000" in proc.stderr

    data = bytearray(out.read_bytes())
    data[600] ^= 0xFF  # inside the first payload members
    bad = tmp_path / "bad.esgz"
    bad.write_bytes(bytes(data))
    proc = lazyctl("inspect", str(bad))
    assert proc.returncode == 1 and b"chunk of" in proc.stderr, proc.stderr
    proc = lazyctl("inspect", str(every_type_tar))
    assert proc.returncode == 1 and b"no eStargz footer" in proc.stderr
    proc = lazyctl("inspect", str(out), "--extract", "etc")
    assert proc.returncode == 1 and b"'etc' is a dir, not a regular file" in proc.stderr


@pytest.mark.usefixtures("reference_tools")
def test_convert_odd_names(tmp_path: Path) -> None:
    """`layer convert` takes a tar with root, absolute, '..' and duplicate names; `layer inspect`
    and the reference read the result as the same cleaned tree."""
    from tests.estargz.trees import odd_names_specs, write_tar

    src = write_tar(tmp_path / "odd.tar", odd_names_specs())
    out = tmp_path / "odd.esgz"
    proc = lazyctl("convert", "--json", str(src), str(out))
    assert proc.returncode == 0, proc.stderr
    digest = json.loads(proc.stdout)["tocDigest"]
    assert reference_verify(out, digest).returncode == 0
    listing = json.loads(lazyctl("inspect", "--json", "--list", str(out)).stdout)["list"]
    assert [e["name"] for e in listing] == [".no.prefetch.landmark", "", "etc", "etc/hosts", "bin", "b", "x", "y",
                                            "dup", "link", "bin/link2", "bin/sym", "deep/dir/f"]
    assert lazyctl("inspect", "--extract", "../../x", str(out)).stdout == b"x\n"
    assert lazyctl("inspect", "--extract", "/bin/link2", str(out)).stdout == b"x\n"
    assert lazyctl("inspect", "--extract", "dup", str(out)).stdout == b"second\n"
