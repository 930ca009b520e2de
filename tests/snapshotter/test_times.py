"""Snapshot times: Commit makes a new snapshot (created == updated == commit time, as containerd's
storage.CommitActive), Update moves only ``updated``, and Stat, List and Update's answer agree."""

from __future__ import annotations

import time
from pathlib import Path

from google.protobuf import timestamp_pb2

from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from lazyd.proto.containerd.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from lazyd.snapshotter.metadata import Kind, MetaStore
from tests.snapshotter.test_grpc import SN, commit, prepare, stat


def ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def listed(stub: SnapshotsStub) -> dict[str, pb.Info]:
    return {i.name: i for r in stub.List(pb.ListSnapshotsRequest(snapshotter=SN)) for i in r.info}


def update(stub: SnapshotsStub, name: str, labels: dict[str, str], *paths: str) -> pb.Info:
    req = pb.UpdateSnapshotRequest(snapshotter=SN, info=pb.Info(name=name, labels=labels, parent="ignored"))
    req.update_mask.paths.extend(paths)
    return stub.Update(req).info


def test_commit_times_are_the_commit_time(stub: SnapshotsStub) -> None:
    prepare(stub, "k")
    time.sleep(0.01)  # so a Prepare-time ``created`` could not pass for the commit time
    before = time.time_ns()
    commit(stub, "c", "k")
    after = time.time_ns()
    info = stat(stub, "c")
    assert info.created_at == info.updated_at
    assert before <= ns(info.created_at) <= after


def test_stat_list_and_update_agree(stub: SnapshotsStub) -> None:
    prepare(stub, "k1")
    commit(stub, "c1", "k1", {"a": "1"})
    prepare(stub, "a1", "c1", {"b": "2"})
    stub.View(pb.ViewSnapshotRequest(snapshotter=SN, key="v1", parent="c1"))
    names = ["c1", "a1", "v1"]
    all_listed = listed(stub)
    for name in names:
        info = stat(stub, name)
        assert info == all_listed[name]
        assert info.created_at == info.updated_at, name
    for name in names:
        created = stat(stub, name).created_at
        u1 = time.time_ns()
        answered = update(stub, name, {"x": name})
        u2 = time.time_ns()
        assert u1 <= ns(answered.updated_at) <= u2, name
        assert answered.created_at == created, name
        assert dict(answered.labels) == {"x": name}
        assert answered == stat(stub, name) == listed(stub)[name]
        answered = update(stub, name, {"y": "1"}, "labels.y")
        assert answered == stat(stub, name) == listed(stub)[name]
        assert dict(answered.labels) == {"x": name, "y": "1"}


def test_metastore_commit_and_update_times(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "metadata.db")
    try:
        store.create(Kind.ACTIVE, "k", "", {})
        prepared = store.stat("k")
        time.sleep(0.01)
        committed = store.commit("k", "c", {})
        assert committed == store.stat("c")
        assert committed.created_ns == committed.updated_ns > prepared.created_ns
        updated = store.update("c", {"l": "v"}, [])
        assert updated == store.stat("c") == next(i for i in store.walk() if i.name == "c")
        assert updated.created_ns == committed.created_ns and updated.updated_ns > committed.updated_ns
    finally:
        store.close()
