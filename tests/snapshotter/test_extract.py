"""Promotion extraction: a lazily mounted layer (real lazyd FUSE worker) copied to a plain directory.

The layer is mounted lazily, every chunk is brought into the cache by reading the
whole tree, the fetcher is then stopped (so the extraction provably reads from the
cache), and ``extract_layer`` copies the mount.  The copy is compared entry by entry
with the FUSE view and with ``tar -x`` of the source tar, used as an overlayfs
lowerdir, killed with SIGKILL at several points, run out of disk space and stopped.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lazyd.snapshotter.extract import (ExtractAborted, ExtractError, ExtractStats, _check_name, cleanup_partial,
                                       extract_layer, tmp_path_for)
from tests.fuse.conftest import WorkerEnv, _add, make_layer, worker_env_in

CAP_NET_BIND = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")  # v2, cap_net_bind_service
DEEP = 120


def layer_tar(path: Path) -> Path:
    """Every entry kind the extractor must reproduce; no implied directories (tar -x would invent them)."""
    rnd = __import__("random").Random(15)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "etc", tarfile.DIRTYPE, mode=0o755, mtime=1_500_000_000)
        _add(tf, "etc/hostname", data=b"lazyd\n", mode=0o644, mtime=1_500_000_001)
        _add(tf, "etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42, mtime=1_500_000_002)
        _add(tf, "etc/.wh.passwd", data=b"", mode=0o600)
        _add(tf, "bin", tarfile.DIRTYPE, mode=0o755, mtime=86_400)
        _add(tf, "bin/tool", data=rnd.randbytes(300_000), mode=0o4755, uid=0, gid=0, mtime=1_234_567_890)
        _add(tf, "bin/sgid", data=b"#!/bin/sh\n", mode=0o2711, gid=5, mtime=4_102_444_800)  # year 2100
        _add(tf, "bin/alias", tarfile.LNKTYPE, linkname="bin/tool")
        _add(tf, "bin/ping", data=b"\x7fELF pretend\n", mode=0o755,
             xattrs={"security.capability": CAP_NET_BIND.decode("latin-1")})
        _add(tf, "bin/sh", tarfile.SYMTYPE, linkname="tool", mode=0o777, mtime=1_400_000_000)
        _add(tf, "bin/abs", tarfile.SYMTYPE, linkname="/etc/hostname", mode=0o777, uid=7, gid=8)
        _add(tf, "bin/dangling", tarfile.SYMTYPE, linkname="../nowhere/at/all", mode=0o777)
        _add(tf, "data", tarfile.DIRTYPE, mode=0o1777, uid=1000, gid=1001, mtime=1_300_000_000)
        _add(tf, "data/empty", data=b"", mode=0o600, uid=1000, gid=1001, mtime=1_600_000_000.25)  # type: ignore[arg-type]
        _add(tf, "data/old", data=b"before the epoch\n", mode=0o644, mtime=-86_400 * 365)
        _add(tf, "data/big.bin", data=rnd.randbytes(9 * 1024 * 1024 + 12345), mode=0o644)
        _add(tf, "data/xattr.txt", data=b"with xattrs\n", xattrs={"user.one": "1", "user.two": "second value"})
        _add(tf, "data/fifo", tarfile.FIFOTYPE, mode=0o620, uid=3, gid=4)
        _add(tf, "data/sub", tarfile.DIRTYPE, mode=0o2750, uid=1, gid=2, xattrs={"user.dir": "on a dir"})
        _add(tf, "data/sub/also-tool", tarfile.LNKTYPE, linkname="bin/tool")
        _add(tf, "data/sub/odd", tarfile.DIRTYPE, mode=0o500, mtime=1)
        _add(tf, "data/sub/odd/file", data=b"in a read-only dir\n", mode=0o400, mtime=2)
        _add(tf, "dev", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
        _add(tf, "dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(8, 0))
        _add(tf, "dev/big", tarfile.CHRTYPE, mode=0o600, dev=(259, 70000))
        _add(tf, "var", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "var/.wh..wh..opq", data=b"", mode=0o600)
        _add(tf, "var/new", data=b"only this\n")
        _add(tf, "many", tarfile.DIRTYPE, mode=0o755)
        for i in range(400):
            _add(tf, f"many/f{i:04d}", data=f"small file {i}\n".encode() * (i % 7 + 1), mtime=1_600_000_000 + i)
        name = ""
        for i in range(DEEP):
            name = f"{name}/d{i % 10}" if name else "deep"
            _add(tf, name, tarfile.DIRTYPE, mode=0o755, mtime=1_000_000 + i)
        _add(tf, f"{name}/bottom", data=b"100+ levels down\n")
    return path


# -- tree snapshots --------------------------------------------------------------------------


def snapshot(root: Path) -> tuple[dict[str, tuple[Any, ...]], list[list[str]]]:
    """Every entry below ``root`` (not following symlinks): its metadata and content, and hardlink groups."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        for e in os.scandir(root / rel if rel else root):
            path = f"{rel}/{e.name}" if rel else e.name
            st = os.lstat(e.path)
            xattrs = tuple(sorted((k, os.getxattr(e.path, k, follow_symlinks=False))
                                  for k in os.listxattr(e.path, follow_symlinks=False)))
            content: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(e.path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(e.path)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            out[path] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size,
                         st.st_mtime_ns, st.st_rdev, st.st_nlink if not stat.S_ISDIR(st.st_mode) else None,
                         content, xattrs)
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
    return out, sorted(sorted(g) for g in inodes.values())


def assert_same_tree(got: Path, want: Path) -> int:
    g, g_links = snapshot(got)
    w, w_links = snapshot(want)
    assert sorted(g) == sorted(w), f"extra {sorted(set(g) - set(w))[:5]}, missing {sorted(set(w) - set(g))[:5]}"
    for path in w:
        assert g[path] == w[path], f"{path}: {g[path]} != {w[path]}"
    root_g, root_w = os.lstat(got), os.lstat(want)
    assert (root_g.st_mode, root_g.st_uid, root_g.st_gid, root_g.st_mtime_ns) == \
           (root_w.st_mode, root_w.st_uid, root_w.st_gid, root_w.st_mtime_ns)
    assert g_links == w_links
    return len(w)


# -- fixtures ------------------------------------------------------------------------------


class Mounted:
    """A lazily mounted layer whose chunks are all in the cache; the fetcher is stopped afterwards."""

    def __init__(self, env: WorkerEnv, tar: Path, mnt: Path) -> None:
        self.env, self.tar, self.mnt = env, tar, mnt


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    tmp = tmp_path_factory.mktemp("extract")
    with worker_env_in(tmp) as env:
        tar = layer_tar(tmp / "layer.tar")
        layer = make_layer(tar, tmp / "blobs", chunk_size=1 << 20)
        env.start_worker()
        mnt = env.mount(layer, "promote")
        before = env.mount_status("promote")
        assert before["cache_misses"] == 0, before  # nothing read yet: the mount is lazy
        snapshot(mnt)  # reads every file: every chunk is now cached and verified
        status = env.mount_status("promote")
        assert status["fetch_errors"] == 0 and status["cache_misses"] > 0, status
        env.fetcher.stop()  # from here on, reads can only be served from the cache
        yield Mounted(env, tar, mnt)


@pytest.fixture(scope="module")
def tar_tree(mounted: Mounted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An independent reference: GNU tar's extraction of the uncompressed layer."""
    out = tmp_path_factory.mktemp("tarx") / "root"
    out.mkdir()
    subprocess.run(["tar", "-x", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--same-permissions",
                    "-f", str(mounted.tar), "-C", str(out)], check=True, capture_output=True)
    return out


# -- tests ---------------------------------------------------------------------------------


def test_extract_equals_the_fuse_view(mounted: Mounted, tmp_path: Path) -> None:
    dest = tmp_path / "layer"
    stats = extract_layer(mounted.mnt, dest)
    n = assert_same_tree(dest, mounted.mnt)
    assert n > 400 + DEEP
    assert not os.path.lexists(tmp_path_for(dest))
    assert stats.files == 400 + 12 and stats.hardlinks == 2 and stats.symlinks == 3
    assert stats.devices == 4 + 1  # null, sda, big, fifo + the passwd whiteout
    assert stats.dirs == 1 + 8 + DEEP  # root, etc bin data sub odd dev var many, the deep chain
    assert stats.bytes == sum(m.size for m in tarfile.open(mounted.tar) if m.isreg())
    assert stats.bytes <= stats.peak_disk_bytes < stats.bytes + (4 << 20)
    assert stats.seconds > 0
    # The things most likely to go wrong, spelt out.
    assert stat.S_IMODE(os.lstat(dest / "bin/tool").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(dest / "bin/sgid").st_mode) == 0o2711
    assert stat.S_IMODE(os.lstat(dest / "data").st_mode) == 0o1777
    assert os.getxattr(dest / "bin/ping", "security.capability") == CAP_NET_BIND
    assert os.getxattr(dest / "var", "trusted.overlay.opaque") == b"y"
    wh = os.lstat(dest / "etc/passwd")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.lstat(dest / "bin/alias").st_ino == os.lstat(dest / "data/sub/also-tool").st_ino \
        == os.lstat(dest / "bin/tool").st_ino
    assert os.lstat(dest / "dev/big").st_rdev == os.makedev(259, 70000)
    assert os.readlink(dest / "bin/dangling") == "../nowhere/at/all"


def test_extract_equals_tar_extraction(mounted: Mounted, tar_tree: Path, tmp_path: Path) -> None:
    """Against an independent source: all but the overlayfs forms (whiteouts, opaque marker) match tar -x."""
    dest = tmp_path / "layer"
    extract_layer(mounted.mnt, dest)
    got, got_links = snapshot(dest)
    want, want_links = snapshot(tar_tree)
    overlay_forms = {"etc/passwd"}
    assert set(got) - overlay_forms == {p for p in want if not p.rpartition("/")[2].startswith(".wh.")}
    for path, entry in want.items():
        if path.rpartition("/")[2].startswith(".wh."):
            continue
        mine = got[path]
        if path == "var":  # the opaque marker is an xattr here, a .wh..wh..opq file in the tar
            mine = mine[:-1] + (tuple(x for x in mine[-1] if x[0] != "trusted.overlay.opaque"),)
        # eStargz TOC modtimes are whole seconds (so is the FUSE view): tar's fraction is dropped.
        entry = entry[:5] + (entry[5] // 1_000_000_000 * 1_000_000_000,) + entry[6:]
        assert mine == entry, f"{path}: {mine} != {entry}"
    assert got_links == want_links


def _overlay(lower: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(map(str, lower)), str(target)],
                   check=True, capture_output=True)


def test_extracted_layer_works_as_overlay_lowerdir(mounted: Mounted, tmp_path: Path) -> None:
    base = tmp_path / "base"
    for d in ("etc", "var/olddir", "bin"):
        (base / d).mkdir(parents=True)
    (base / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (base / "etc/keep").write_text("kept\n")
    (base / "var/old").write_text("old\n")
    (base / "var/olddir/x").write_text("x\n")
    (base / "bin/base-only").write_text("base\n")
    dest = tmp_path / "layer"
    extract_layer(mounted.mnt, dest)
    merged = tmp_path / "merged"
    _overlay([dest, base], merged)
    try:
        assert not os.path.lexists(merged / "etc/passwd")  # the whiteout hides the lower file
        assert (merged / "etc/keep").read_text() == "kept\n"
        assert (merged / "etc/hostname").read_text() == "lazyd\n"
        assert sorted(os.listdir(merged / "var")) == ["new"]  # the opaque dir hides the lower contents
        assert (merged / "bin/base-only").read_text() == "base\n"  # bin is not opaque: merged
        assert os.stat(merged / "bin/tool").st_nlink == 3
        assert os.readlink(merged / "bin/sh") == "tool"
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_dest_must_not_exist_and_partial_is_cleaned(mounted: Mounted, tmp_path: Path) -> None:
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ExtractError, match="already exists"):
        extract_layer(mounted.mnt, dest)
    assert os.listdir(dest) == []
    dest.rmdir()
    assert cleanup_partial(dest) is False
    leftover = tmp_path_for(dest)
    (leftover / "junk/deeper").mkdir(parents=True)
    (leftover / "junk/deeper/file").write_text("from a crashed attempt")
    extract_layer(mounted.mnt, dest)  # starts clean
    assert_same_tree(dest, mounted.mnt)
    assert not os.path.lexists(leftover)
    (leftover / "x").mkdir(parents=True)
    assert cleanup_partial(dest) is True and not os.path.lexists(leftover)


def test_should_stop_aborts_and_leaves_nothing(mounted: Mounted, tmp_path: Path) -> None:
    for after in (1, 30, 300):
        calls = 0

        def stop() -> bool:
            nonlocal calls
            calls += 1
            return calls >= after

        dest = tmp_path / f"layer{after}"
        with pytest.raises(ExtractAborted):
            extract_layer(mounted.mnt, dest, should_stop=stop)
        assert calls == after
        assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_enospc_raises_and_leaves_nothing(mounted: Mounted, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(ExtractError, match=r"No space left on device \(ENOSPC\)") as info:
            extract_layer(mounted.mnt, small / "layer")
        assert "data/big.bin" in str(info.value)
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from lazyd.snapshotter.extract import extract_layer
    src, dest, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    calls = 0
    def should_stop():
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return False
    extract_layer(src, dest, should_stop=should_stop)
    print(calls)
""")


def _child(src: Path, dest: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dest), str(kill_at)],
                          capture_output=True, text=True, timeout=300)


def test_sigkill_at_any_point_leaves_no_dest(mounted: Mounted, tmp_path: Path) -> None:
    dest = tmp_path / "layer"
    counted = _child(mounted.mnt, tmp_path / "counting", 0)
    assert counted.returncode == 0, counted.stderr
    total = int(counted.stdout)  # should_stop calls in a whole run; the last one is right before the rename
    assert total > 400
    for kill_at in (1, 2, 50, total // 2, total - 2, total - 1, total):
        proc = _child(mounted.mnt, dest, kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr)
        assert not os.path.lexists(dest), f"killed at call {kill_at}/{total}: {dest} exists"
        assert os.path.isdir(tmp_path_for(dest)), kill_at  # the partial work, for the next attempt to remove
        stats = extract_layer(mounted.mnt, dest)
        assert isinstance(stats, ExtractStats)
        assert_same_tree(dest, mounted.mnt)
        assert not os.path.lexists(tmp_path_for(dest))
        subprocess.run(["rm", "-rf", str(dest)], check=True)


def test_uncached_chunks_fail_instead_of_copying_holes(mounted: Mounted, tmp_path: Path) -> None:
    """A layer whose chunks are not cached (and no fetcher answers) fails with the path and errno text."""
    tar = tmp_path / "other.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "a", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "a/file", data=b"never fetched\n" * 1000)
    mnt = mounted.env.mount(make_layer(tar, tmp_path / "blobs"), "uncached")
    dest = tmp_path / "layer"
    with pytest.raises(ExtractError, match=r"extracting a/file: .*\(E[A-Z]+\)") as info:
        extract_layer(mnt, dest)
    assert "(EIO)" in str(info.value), info.value  # the worker's answer when a chunk cannot be fetched
    assert not os.path.lexists(dest) and not os.path.lexists(tmp_path_for(dest))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/"])
def test_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(ExtractError, match="refusing entry name"):
        _check_name(name, "some/dir")
    _check_name("..." if name else "x", "some/dir")  # ordinary odd names pass


def test_sigkill_after_a_delay_leaves_nothing_or_everything(mounted: Mounted, tmp_path: Path) -> None:
    """Kills at wall-clock points once the work directory appears (inside syscalls, not at should_stop)."""
    import time

    dest = tmp_path / "layer"
    seen_partial = 0
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(mounted.mnt), str(dest), "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.lexists(tmp_path_for(dest)) and not os.path.lexists(dest):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if os.path.lexists(dest):  # it finished before the kill: then it is complete
            assert_same_tree(dest, mounted.mnt)
        else:
            seen_partial += 1
            extract_layer(mounted.mnt, dest)
            assert_same_tree(dest, mounted.mnt)
        assert not os.path.lexists(tmp_path_for(dest))
        subprocess.run(["rm", "-rf", str(dest)], check=True)
    assert seen_partial >= 3  # most kills landed in the middle of an extraction
