"""Each Snapshots RPC over gRPC against a real ``lazyd snapshotter``: results, mounts and error codes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from lazyd.proto.containerd.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from tests.snapshotter.conftest import SnapshotterProc

SN = "lazyd"


def code_of(fn, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value.code()


def prepare(stub: SnapshotsStub, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list:
    return list(stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key=key, parent=parent,
                                                       labels=labels or {})).mounts)


def commit(stub: SnapshotsStub, name: str, key: str, labels: dict[str, str] | None = None) -> None:
    stub.Commit(pb.CommitSnapshotRequest(snapshotter=SN, name=name, key=key, labels=labels or {}))


def stat(stub: SnapshotsStub, key: str) -> pb.Info:
    return stub.Stat(pb.StatSnapshotRequest(snapshotter=SN, key=key)).info


def walk(stub: SnapshotsStub, *filters: str) -> list[str]:
    return sorted(i.name for r in stub.List(pb.ListSnapshotsRequest(snapshotter=SN, filters=list(filters)))
                  for i in r.info)


def upper(mounts: list) -> Path:
    """The directory an active snapshot writes to (bind source or upperdir=)."""
    (m,) = mounts
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir="))[len("upperdir="):])


def layer(stub: SnapshotsStub, name: str, parent: str, files: dict[str, str]) -> None:
    """Prepare, write ``files``, commit as ``name``."""
    key = f"default/1/extract-{name}"
    mounts = prepare(stub, key, parent)
    for rel, text in files.items():
        (upper(mounts) / rel).write_text(text)
    commit(stub, name, key)


def test_prepare_without_parent_is_rw_bind(stub: SnapshotsStub, snapshotter: SnapshotterProc) -> None:
    (m,) = prepare(stub, "default/1/extract-a")
    assert m.type == "bind" and list(m.options) == ["rw", "rbind"]
    assert Path(m.source).is_dir() and Path(m.source).parent.parent == snapshotter.root / "snapshots"
    info = stat(stub, "default/1/extract-a")
    assert info.kind == pb.ACTIVE and info.parent == "" and info.created_at.seconds > 0


def test_overlay_lowerdir_order_and_view_binds(stub: SnapshotsStub) -> None:
    layer(stub, "default/l1", "", {"a": "1"})
    layer(stub, "default/l2", "default/l1", {"b": "2"})
    layer(stub, "default/l3", "default/l2", {"c": "3"})
    (m,) = prepare(stub, "default/c1", "default/l3")
    assert m.type == "overlay" and m.source == "overlay"
    opts = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in m.options if "=" in o}
    lowers = [Path(p) for p in opts["lowerdir"].split(":")]
    assert [sorted(os.listdir(p)) for p in lowers] == [["c"], ["b"], ["a"]]  # nearest parent first
    assert Path(opts["upperdir"]).name == "fs" and Path(opts["workdir"]).name == "work"
    assert Path(opts["upperdir"]).parent == Path(opts["workdir"]).parent
    # A view of a single committed layer is a read-only bind of that layer.
    (v,) = list(stub.View(pb.ViewSnapshotRequest(snapshotter=SN, key="default/v1", parent="default/l1")).mounts)
    assert v.type == "bind" and list(v.options) == ["ro", "rbind"] and sorted(os.listdir(v.source)) == ["a"]
    # A view of several layers is an overlay with only lowerdirs.
    (v2,) = list(stub.View(pb.ViewSnapshotRequest(snapshotter=SN, key="default/v2", parent="default/l3")).mounts)
    assert v2.type == "overlay" and not any(o.startswith(("upperdir=", "workdir=")) for o in v2.options)
    assert stat(stub, "default/v2").kind == pb.VIEW
    # Mounts returns the same as Prepare/View did.
    assert list(stub.Mounts(pb.MountsRequest(snapshotter=SN, key="default/c1")).mounts) == [m]
    assert list(stub.Mounts(pb.MountsRequest(snapshotter=SN, key="default/v2")).mounts) == [v2]


def test_overlay_mount_really_mounts(stub: SnapshotsStub, tmp_path: Path) -> None:
    layer(stub, "l1", "", {"a": "from l1", "shadow": "l1"})
    layer(stub, "l2", "l1", {"shadow": "l2"})
    (m,) = prepare(stub, "work", "l2")
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-t", m.type, m.source, "-o", ",".join(m.options), str(target)], check=True)
    try:
        assert (target / "a").read_text() == "from l1" and (target / "shadow").read_text() == "l2"
        (target / "new").write_text("x")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert (upper([m]) / "new").read_text() == "x"


def test_commit_stat_usage(stub: SnapshotsStub) -> None:
    mounts = prepare(stub, "k")
    (upper(mounts) / "f").write_bytes(b"x" * 10000)
    usage = stub.Usage(pb.UsageRequest(snapshotter=SN, key="k"))
    assert usage.size >= 10000 and usage.inodes == 2  # the upper dir itself and the file, as containerd counts
    commit(stub, "c", "k", {"l": "v"})
    info = stat(stub, "c")
    assert info.kind == pb.COMMITTED and dict(info.labels) == {"l": "v"}
    assert stub.Usage(pb.UsageRequest(snapshotter=SN, key="c")).size == usage.size
    assert code_of(stat, stub, "k") == grpc.StatusCode.NOT_FOUND


def test_error_codes(stub: SnapshotsStub) -> None:
    prepare(stub, "a")
    assert code_of(prepare, stub, "a") == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(prepare, stub, "b", "missing-parent") == grpc.StatusCode.NOT_FOUND
    assert code_of(prepare, stub, "b", "a") == grpc.StatusCode.INVALID_ARGUMENT  # parent not committed
    assert code_of(stat, stub, "nope") == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Mounts, pb.MountsRequest(snapshotter=SN, key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(snapshotter=SN, key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Usage, pb.UsageRequest(snapshotter=SN, key="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(commit, stub, "c", "nope") == grpc.StatusCode.NOT_FOUND
    commit(stub, "c", "a")
    prepare(stub, "a2")
    assert code_of(commit, stub, "c", "a2") == grpc.StatusCode.ALREADY_EXISTS
    # not active / committed: FAILED_PRECONDITION, as containerd's storage.CommitActive and GetSnapshot answer
    assert code_of(commit, stub, "c2", "c") == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.Mounts, pb.MountsRequest(snapshotter=SN, key="c")) == grpc.StatusCode.FAILED_PRECONDITION
    prepare(stub, "child", "c")
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(snapshotter=SN, key="c")) == grpc.StatusCode.FAILED_PRECONDITION
    upd = pb.UpdateSnapshotRequest(snapshotter=SN, info=pb.Info(name="c", parent="x"),
                                   update_mask=field_mask_pb2.FieldMask(paths=["parent"]))
    assert code_of(stub.Update, upd) == grpc.StatusCode.INVALID_ARGUMENT
    upd = pb.UpdateSnapshotRequest(snapshotter=SN, info=pb.Info(name="nope"))
    assert code_of(stub.Update, upd) == grpc.StatusCode.NOT_FOUND
    assert code_of(walk, stub, 'labels."unterminated') == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(prepare, stub, "") == grpc.StatusCode.INVALID_ARGUMENT


def test_remove_deletes_directory(stub: SnapshotsStub, snapshotter: SnapshotterProc) -> None:
    mounts = prepare(stub, "default/9/extract-x")
    d = upper(mounts).parent
    assert d.is_dir()
    stub.Remove(pb.RemoveSnapshotRequest(snapshotter=SN, key="default/9/extract-x"))
    assert not d.exists()
    assert code_of(stat, stub, "default/9/extract-x") == grpc.StatusCode.NOT_FOUND


def test_update_labels_with_field_masks(stub: SnapshotsStub) -> None:
    prepare(stub, "k")
    commit(stub, "c", "k", {"a": "1", "b": "2"})
    before = stat(stub, "c")

    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        req = pb.UpdateSnapshotRequest(snapshotter=SN, info=pb.Info(name="c", labels=labels))
        if paths:
            req.update_mask.paths.extend(paths)
        return dict(stub.Update(req).info.labels)

    assert update({"b": "20", "z": "ignored"}, "labels.b") == {"a": "1", "b": "20"}
    assert update({}, "labels.a") == {"b": "20"}                     # empty value deletes the label
    assert update({"n": "1"}, "labels") == {"n": "1"}                 # whole map replaced
    assert update({"m": "2"}) == {"m": "2"}                           # no mask: all mutable fields
    after = stat(stub, "c")
    assert dict(after.labels) == {"m": "2"}
    assert after.created_at == before.created_at
    assert (after.updated_at.seconds, after.updated_at.nanos) > (before.updated_at.seconds, before.updated_at.nanos)


def test_walk_filters(stub: SnapshotsStub) -> None:
    prepare(stub, "k1")
    commit(stub, "default/c1", "k1", {"containerd.io/snapshot.ref": "sha256:aaa", "team": "x"})
    prepare(stub, "k2", "default/c1", {"team": "y"})
    stub.View(pb.ViewSnapshotRequest(snapshotter=SN, key="v", parent="default/c1"))
    assert walk(stub) == ["default/c1", "k2", "v"]
    assert walk(stub, 'labels."containerd.io/snapshot.ref"') == ["default/c1"]
    assert walk(stub, 'labels."containerd.io/snapshot.ref"==sha256:aaa') == ["default/c1"]
    assert walk(stub, 'labels."containerd.io/snapshot.ref"=="sha256:bbb"') == []
    assert walk(stub, "kind==active") == ["k2"]
    assert walk(stub, "kind==view", "kind==active") == ["k2", "v"]              # OR across filters
    assert walk(stub, "parent==default/c1,labels.team==y") == ["k2"]            # AND within one
    assert walk(stub, "labels.team!=x") == ["k2", "v"]
    assert walk(stub, "name~=^default/") == ["default/c1"]


def test_restart_keeps_everything(snapshotter: SnapshotterProc) -> None:
    with snapshotter.channel() as ch:
        stub = snapshotter.stub(ch)
        layer(stub, "l1", "", {"a": "1"})
        layer(stub, "l2", "l1", {"b": "2"})
        view = list(stub.View(pb.ViewSnapshotRequest(snapshotter=SN, key="view", parent="l2",
                                                     labels={"x": "y"})).mounts)
        active = prepare(stub, "active", "l2")
        infos = {n: stat(stub, n) for n in ("l1", "l2", "view", "active")}
    snapshotter.stop()
    snapshotter.start()
    with snapshotter.channel() as ch:
        stub = snapshotter.stub(ch)
        assert {n: stat(stub, n) for n in infos} == infos
        assert list(stub.Mounts(pb.MountsRequest(snapshotter=SN, key="view")).mounts) == view
        assert list(stub.Mounts(pb.MountsRequest(snapshotter=SN, key="active")).mounts) == active
        # New snapshots get new ids (no reuse of directories).
        fresh = prepare(stub, "fresh")
        assert upper(fresh) not in {upper(active)}
        assert walk(stub) == ["active", "fresh", "l1", "l2", "view"]


def test_cleanup_removes_orphan_dirs(stub: SnapshotsStub, snapshotter: SnapshotterProc) -> None:
    prepare(stub, "keep")
    orphan = snapshotter.root / "snapshots" / "999"
    (orphan / "fs").mkdir(parents=True)
    (orphan / "fs" / "junk").write_text("x")
    stub.Cleanup(pb.CleanupRequest(snapshotter=SN))
    assert not orphan.exists()
    assert upper(list(stub.Mounts(pb.MountsRequest(snapshotter=SN, key="keep")).mounts)).is_dir()


def test_cleanup_racing_prepare_keeps_new_snapshots(stub: SnapshotsStub) -> None:
    """containerd's GC calls Cleanup while other clients Prepare: a directory being made is not an orphan."""
    import threading

    stop = threading.Event()
    errors: list[BaseException] = []

    def clean() -> None:
        while not stop.is_set():
            try:
                stub.Cleanup(pb.CleanupRequest(snapshotter=SN))
            except grpc.RpcError as exc:  # pragma: no cover - reported below
                errors.append(exc)

    cleaner = threading.Thread(target=clean)
    cleaner.start()
    try:
        uppers = [upper(prepare(stub, f"race-{n}")) for n in range(150)]
    finally:
        stop.set()
        cleaner.join()
    assert not errors
    assert [u for u in uppers if not u.is_dir()] == []


def test_remote_labels_without_lazyd_fall_back(stub: SnapshotsStub, snapshotter: SnapshotterProc) -> None:
    labels = {
        "containerd.io/snapshot.ref": "sha256:" + "c" * 64,
        "containerd.io/snapshot/remote/stargz.reference": "127.0.0.1:1/img:latest",
        "containerd.io/snapshot/remote/stargz.digest": "sha256:" + "d" * 64,
        "containerd.io/snapshot/remote/stargz.layers": "sha256:" + "d" * 64,
    }
    (m,) = prepare(stub, "default/1/extract-r", "", labels)
    assert m.type == "bind" and list(m.options) == ["rw", "rbind"]
    info = stat(stub, "default/1/extract-r")
    assert info.kind == pb.ACTIVE and "containerd.io/snapshot/remote" not in info.labels
    log = snapshotter.log_text()
    line = next(ln for ln in log.splitlines() if "falling back" in ln)
    assert "sha256:" + "d" * 64 in line and "127.0.0.1:1/img:latest" in line and "unavailable" in line


def test_cri_labels_without_lazyd_fall_back(stub: SnapshotsStub, snapshotter: SnapshotterProc) -> None:
    labels = {
        "containerd.io/snapshot.ref": "sha256:" + "e" * 64,
        "containerd.io/snapshot/cri.image-ref": "127.0.0.1:1/cri:latest",
        "containerd.io/snapshot/cri.layer-digest": "sha256:" + "f" * 64,
        "containerd.io/snapshot/cri.image-layers": "sha256:" + "f" * 64,
    }
    prepare(stub, "default/2/extract-r", "", labels)
    assert stat(stub, "default/2/extract-r").kind == pb.ACTIVE
    assert any("falling back" in ln and "127.0.0.1:1/cri:latest" in ln for ln in snapshotter.log_text().splitlines())
