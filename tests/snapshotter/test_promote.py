"""Promotion pieces that need no containerd: mountinfo parsing, the ``promote`` settings, the
``local`` layout, and start-up recovery of a crashed extraction."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyd import mounttable
from lazyd.api.messages import ApiError, LayerStateArgs, PromoteArgs
from lazyd.configfile import ConfigError
from lazyd.snapshotter.config import SnapshotterConfig, load_config
from lazyd.snapshotter.metadata import Kind
from lazyd.snapshotter.overlay import Layout
from lazyd.snapshotter.promote import overlay_lowerdirs, overlay_users, uses_dir
from lazyd.snapshotter.snapshotter import Snapshotter

ROOT = "/var/lib/lazyd/snapshotter/snapshots"

# Real /proc/self/mountinfo shapes: containerd's absolute lowerdirs, the relative form it uses
# after chdir into the snapshots directory when the options are long, a comma escaped in a
# path, the new-API "lowerdir+" form, and non-overlay lines that merely mention the path.
MOUNTINFO = f"""\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
530 22 0:61 / /run/containerd/t/a/rootfs rw,relatime - overlay overlay rw,lowerdir={ROOT}/12/fs:{ROOT}/11/local,upperdir={ROOT}/14/fs,workdir={ROOT}/14/work,index=off
531 22 0:62 / /run/containerd/t/b/rootfs rw,relatime - overlay overlay rw,lowerdir=21/fs:20/fs:3/local,upperdir=/x/23/fs,workdir=/x/23/work
532 22 0:63 / /run/containerd/t/c/rootfs rw,relatime - overlay overlay rw,lowerdir=/odd\\054dir/snapshots/7/fs,upperdir=/u,workdir=/w
533 22 0:64 / /run/containerd/t/d/rootfs rw,relatime - overlay overlay rw,lowerdir+=/new/snapshots/8/fs,lowerdir+=/new/snapshots/9/fs,upperdir=/u,workdir=/w
534 22 0:65 /mount1 {ROOT}/30/fs ro,nosuid,nodev,relatime - fuse.lazyd lazyd ro,user_id=0,group_id=0
"""


def test_overlay_lowerdirs_parses_absolute_relative_escaped_and_new_api_forms() -> None:
    assert overlay_lowerdirs(MOUNTINFO) == [
        [f"{ROOT}/12/fs", f"{ROOT}/11/local"],
        ["21/fs", "20/fs", "3/local"],
        ["/odd,dir/snapshots/7/fs"],
        ["/new/snapshots/8/fs", "/new/snapshots/9/fs"],
    ]


@pytest.mark.parametrize(("entry", "sid", "used"), [
    (f"{ROOT}/12/fs", 12, True),      # absolute, this root
    ("12/fs", 12, True),              # relative (containerd chdir'd into the snapshots dir)
    ("/other/root/snapshots/12/fs", 12, True),  # another root's 12: a false match only delays a release
    ("112/fs", 12, False),            # a different id that ends in the same digits
    (f"{ROOT}/12/fsx", 12, False),
    (f"{ROOT}/12/local", 12, False),  # the promoted directory is not lazyd's mount
    (f"{ROOT}/12", 12, False),
    ("2/fs", 12, False),
])
def test_uses_dir(entry: str, sid: int, used: bool) -> None:
    assert uses_dir(entry, Path(ROOT) / str(sid) / "fs") is used


def test_overlay_users_only_counts_lowerdirs() -> None:
    fs = {sid: Path(ROOT) / str(sid) / "fs" for sid in (3, 11, 12, 14, 20, 21, 30)}
    used = overlay_users(fs.values(), MOUNTINFO)
    # 14 is an upperdir, 30 only a FUSE mountpoint, 3 and 11 are promoted (local) lowers.
    assert used == {fs[12], fs[20], fs[21]}


def test_promote_settings_are_validated(tmp_path: Path) -> None:
    c = SnapshotterConfig()
    assert (c.promote, c.promote_interval, c.promote_retry) == ("after_fetch", 2.0, 60.0)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[snapshotter]\npromote = "manual"\npromote_interval = 0.5\n')
    assert load_config(cfg).promote == "manual" and load_config(cfg).promote_interval == 0.5
    for bad, needle in (('promote = "sometimes"', "snapshotter.promote"),
                        ("promote_interval = 0", "snapshotter.promote_interval"),
                        ("promote_retry = -1", "snapshotter.promote_retry"),
                        ("promote = true", "snapshotter.promote")):
        cfg.write_text(f"[snapshotter]\n{bad}\n")
        with pytest.raises(ConfigError, match=needle):
            load_config(cfg)


def test_promote_messages_are_validated() -> None:
    with pytest.raises(ApiError, match="exactly one"):
        PromoteArgs.from_args({})
    with pytest.raises(ApiError, match="exactly one"):
        PromoteArgs.from_args({"ref": "r/x:1", "layer_digest": "sha256:" + "a" * 64})
    with pytest.raises(ApiError, match="layer_digest"):
        PromoteArgs.from_args({"layer_digest": "nope"})
    with pytest.raises(ApiError, match="state"):
        LayerStateArgs.from_args({"mode": "after_fetch", "layers": [{"layer_digest": "sha256:" + "a" * 64,
                                                                     "state": "half"}]})
    with pytest.raises(ApiError, match="mode"):
        LayerStateArgs.from_args({"mode": "always", "layers": []})


def test_layout_lower_is_local_once_promoted(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.create_dirs(1, Kind.ACTIVE, [])
    layout.create_dirs(2, Kind.ACTIVE, [1])
    layout.create_dirs(3, Kind.ACTIVE, [2, 1])
    opts = layout.mounts(3, Kind.ACTIVE, [2, 1])[0].options
    assert f"lowerdir={layout.upper(2)}:{layout.upper(1)}" in opts
    (layout.local(1)).mkdir()  # promoted: the directory decides
    opts = layout.mounts(3, Kind.ACTIVE, [2, 1])[0].options
    assert f"lowerdir={layout.upper(2)}:{layout.local(1)}" in opts
    assert layout.mounts(4, Kind.VIEW, [1])[0].source == str(layout.local(1))
    (layout.dir(1) / "local.tmp").mkdir()  # an unfinished extraction is not a promotion
    assert layout.lower(2) == layout.upper(2)


def test_restore_removes_an_unfinished_extraction_and_skips_promoted_layers(tmp_path: Path) -> None:
    """A remote snapshot with ``local.tmp`` (kill -9 mid-extraction) and a promoted one: start-up
    removes the first's ``local.tmp``, keeps the second's ``local`` and mounts neither through lazyd
    (there is no lazyd here: a re-mount attempt of the promoted one would be logged and counted)."""
    sn = Snapshotter(SnapshotterConfig(root=tmp_path / "root", lazyd_socket=tmp_path / "absent.sock",
                                       connect_timeout=0.1))
    try:
        labels = {"containerd.io/snapshot/remote": "remote snapshot", "containerd.io/snapshot/lazyd.ref": "r/x:1",
                  "containerd.io/snapshot/lazyd.layer-digest": "sha256:" + "b" * 64}
        ids = []
        for name in ("lazy", "promoted"):
            sn.prepare(f"k-{name}", "", {})
            ids.append(sn.store.stat(sn.commit(name, f"k-{name}", labels).name).id)
        half, done = sn.layout.local(ids[0]).with_name("local.tmp"), sn.layout.local(ids[1])
        (half / "usr").mkdir(parents=True)
        (done / "usr").mkdir(parents=True)
        (done / "usr" / "f").write_bytes(b"x" * 10000)
        # A crash between the rename and the swap: lazyd's bind is still at the promoted layer's fs.
        stand_in = tmp_path / "fuse-stand-in"
        stand_in.mkdir()
        mounttable.bind_readonly(str(stand_in), str(sn.layout.upper(ids[1])))
        assert sn.restore() == 0
        assert not mounttable.is_mounted(str(sn.layout.upper(ids[1]))), "the old bind was not detached"
        assert not half.exists() and not sn.layout.promoted(ids[0])
        assert sn.layout.promoted(ids[1]) and (done / "usr" / "f").exists()
        assert sn.promoter.pending_release() == {ids[1]}  # lazyd's mount of it goes once lazyd answers
        size, inodes = sn.usage("promoted")
        assert size >= 10000 and inodes == 3  # local, usr, f: the real disk use of the local tree
        sn.remove("promoted")
        assert not sn.layout.dir(ids[1]).exists() and sn.promoter.pending_release() == set()
    finally:
        sn.close()
        mounttable.unmount_below(tmp_path)
