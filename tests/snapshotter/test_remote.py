"""The remote (lazy) path with the real ``lazyd serve``, ``ctr-remote rpull`` and containerd.

Skipped only when ``lazyd serve`` is not installed; lazyctl rpull and the full
end-to-end matrix are in tests/e2e.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from lazyd.api.client import Client
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from lazyd.mounttable import is_mounted as is_mountpoint, unmount_below
from tests.snapshotter.conftest import SnapshotterProc, _teardown, make_snapshotter
from tests.support.containerd import Containerd, ContainerdError, start_containerd
from tests.support.images import build_busybox, push
from tests.support.procs import Proc, wait_until
from tests.support.registry import Registry

SN = "lazyd"
REMOTE = "containerd.io/snapshot/remote"


def _have_lazyd_serve() -> bool:
    try:
        return subprocess.run(["lazyd", "serve", "--help"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _have_lazyd_serve(), reason="lazyd serve is not available yet")


@dataclass
class LazydProc:
    root: Path
    socket: Path
    log: Path
    proc: Proc | None = None

    def start(self) -> LazydProc:
        self.socket.unlink(missing_ok=True)
        self.proc = Proc(["lazyd", "serve", "--root", str(self.root), "--socket", str(self.socket),
                          "--log-level", "debug"], self.log)
        wait_until(lambda: self.socket.exists() or not self.proc.alive(), 30, "lazyd serve socket")
        assert self.proc.alive(), self.log.read_text()
        return self

    def shutdown(self) -> None:
        """The clean stop: lazyd unmounts everything and exits."""
        if self.proc is not None and self.proc.alive():
            with Client(str(self.socket), timeout=30) as c:
                try:
                    c.shutdown(timeout=30)
                except Exception:  # noqa: BLE001 - the reply may be lost as it exits
                    pass
            wait_until(lambda: not self.proc.alive(), 30, "lazyd serve to exit")
            self.proc.stop()

    def status(self) -> dict:  # type: ignore[type-arg]
        with Client(str(self.socket), timeout=30) as c:
            return c.call("status")


@dataclass
class Stack:
    lazyd: LazydProc
    sn: SnapshotterProc
    cd: Containerd


@pytest.fixture(scope="module")
def esgz_busybox(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.e2e.images import convert_layout, reference_builder

    work = tmp_path_factory.mktemp("sn-esgz")
    build_busybox(work / "busybox", "latest", with_deletions=True)
    convert_layout(work / "busybox", "latest", work / "esgz", reference_builder)
    return push(f"oci:{work / 'esgz'}:latest", registry.host, "busybox:esgz")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    sockdir = Path(tempfile.mkdtemp(prefix="lz-", dir="/tmp"))
    lz = LazydProc(tmp_path / "lazyd", sockdir / "lazyd.sock", tmp_path / "lazyd.log")
    sn = make_snapshotter(tmp_path, lazyd_socket=lz.socket)
    cd = None
    try:
        lz.start()
        sn.start()
        cd = start_containerd(tmp_path / "containerd", snapshotter_address=str(sn.address))
        yield Stack(lz, sn, cd)
    finally:
        if cd is not None:
            cd.stop()
        if sn.proc is not None:
            sn.proc.stop()
        lz.shutdown()
        if lz.proc is not None:
            lz.proc.stop()
        _teardown(sn)
        unmount_below(lz.root)
        subprocess.run(["rm", "-rf", str(sockdir)], check=False)


def _rpull(cd: Containerd, ref: str) -> None:
    cd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", SN, ref, timeout=300)


def _manifest_layers(cd: Containerd, ref: str) -> list[str]:
    line = next(ln for ln in cd.ctr("images", "ls").stdout.splitlines() if ln.startswith(ref + " "))
    digest = next(f for f in line.split() if f.startswith("sha256:"))
    manifest = json.loads(cd.ctr("content", "get", digest).stdout)
    return [layer["digest"] for layer in manifest["layers"]]


def _remote_snapshots(cd: Containerd) -> list[str]:
    names = [ln.split()[0] for ln in cd.ctr("snapshots", "--snapshotter", SN, "ls").stdout.splitlines()[1:]]
    out = []
    for name in names:
        info = json.loads(cd.ctr("snapshots", "--snapshotter", SN, "info", name).stdout)
        if REMOTE in (info.get("Labels") or {}):
            out.append(name)
    return out


def _remote_mountpoints(sn: SnapshotterProc) -> list[Path]:
    """``snapshots/<id>/fs`` of every mounted snapshot dir, in id order."""
    dirs = sorted((p for p in (sn.root / "snapshots").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return [p / "fs" for p in dirs if is_mountpoint(p / "fs")]


def test_rpull_mounts_every_layer_lazily_and_runs(stack: Stack, esgz_busybox: str) -> None:
    _rpull(stack.cd, esgz_busybox)
    layers = _manifest_layers(stack.cd, esgz_busybox)
    content = set(stack.cd.ctr("content", "ls", "-q").stdout.split())
    assert not content & set(layers), "a layer blob was downloaded although lazyd mounted it"
    assert len(_remote_snapshots(stack.cd)) == len(layers) == 2
    assert len(_remote_mountpoints(stack.sn)) == 2
    out = stack.cd.ctr("run", "--rm", "--snapshotter", SN, esgz_busybox, "t", "/bin/sh", "-c",
                       "cat /etc/hello.txt /data/file.txt; ls /var/log; test -e /etc/group || echo nogroup").stdout
    assert out == "hello from lazyd\npayload\nnew.log\nnogroup\n"
    assert "falling back" not in stack.sn.log_text()


def test_plain_image_falls_back_and_is_reported(stack: Stack, busybox: str) -> None:
    _rpull(stack.cd, busybox)
    layers = _manifest_layers(stack.cd, busybox)
    assert _remote_snapshots(stack.cd) == []
    assert set(layers) <= set(stack.cd.ctr("content", "ls", "-q").stdout.split())  # containerd pulled them
    lines = [ln for ln in stack.sn.log_text().splitlines() if "falling back" in ln]
    assert len(lines) == 2 and all(busybox in ln for ln in lines)
    reported = {f["layer_digest"] for f in stack.lazyd.status().get("fallbacks", [])}
    assert reported == set(layers)
    out = stack.cd.ctr("run", "--rm", "--snapshotter", SN, busybox, "t", "/bin/cat", "/etc/hello.txt").stdout
    assert out == "hello from lazyd\n"


def test_snapshotter_restart_restores_remote_mounts(stack: Stack, esgz_busybox: str) -> None:
    _rpull(stack.cd, esgz_busybox)
    mountpoints = _remote_mountpoints(stack.sn)
    assert len(mountpoints) == 2
    stack.sn.stop()
    with Client(str(stack.lazyd.socket), timeout=30) as c:  # lose the mounts while the snapshotter is down
        for mp in mountpoints:
            c.unmount(str(mp))
    assert _remote_mountpoints(stack.sn) == []
    stack.sn.start()
    assert _remote_mountpoints(stack.sn) == mountpoints
    wait_until(lambda: stack.cd.ctr("snapshots", "--snapshotter", SN, "ls", check=False).returncode == 0, 15,
               "containerd to reconnect")
    out = stack.cd.ctr("run", "--rm", "--snapshotter", SN, esgz_busybox, "t", "/bin/cat", "/data/file.txt").stdout
    assert out == "payload\n"


def test_mounts_unavailable_while_lazyd_is_down(stack: Stack, esgz_busybox: str) -> None:
    _rpull(stack.cd, esgz_busybox)
    top = _remote_snapshots(stack.cd)
    with stack.sn.channel() as ch:
        stub = stack.sn.stub(ch)
        chain = [i.name for r in stub.List(pb.ListSnapshotsRequest(snapshotter=SN)) for i in r.info]
        # The topmost layer is the one no other snapshot names as its parent.
        parents = {stub.Stat(pb.StatSnapshotRequest(snapshotter=SN, key=n)).info.parent for n in chain}
        (leaf,) = [n for n in top if n not in parents]
        stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="default/c1", parent=leaf))
        # SIGTERM stops lazyd without unmounting; its workers keep serving, but nobody can vouch for them.
        assert stack.lazyd.proc is not None
        stack.lazyd.proc.stop()
        with pytest.raises(grpc.RpcError) as err:
            stub.Mounts(pb.MountsRequest(snapshotter=SN, key="default/c1"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "lazyd" in (err.value.details() or "")
        with pytest.raises(ContainerdError):
            stack.cd.ctr("run", "--rm", "--snapshotter", SN, esgz_busybox, "t", "/bin/true")
        stack.lazyd.start()

        def mounts_ok() -> bool:
            try:
                stub.Mounts(pb.MountsRequest(snapshotter=SN, key="default/c1"))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return False
            return True

        # With lazyd back (it adopts its workers a moment after its socket appears), Mounts answers again.
        wait_until(mounts_ok, 30, "Mounts to answer once lazyd is back", interval=0.5)
        (m,) = list(stub.Mounts(pb.MountsRequest(snapshotter=SN, key="default/c1")).mounts)
        assert m.type == "overlay"
        assert len(_remote_mountpoints(stack.sn)) == 2
    out = stack.cd.ctr("run", "--rm", "--snapshotter", SN, esgz_busybox, "t2", "/bin/echo", "back").stdout
    assert out == "back\n"


def test_remove_unmounts(stack: Stack, esgz_busybox: str) -> None:
    _rpull(stack.cd, esgz_busybox)
    assert len(_remote_mountpoints(stack.sn)) == 2
    stack.cd.ctr("images", "rm", "--sync", esgz_busybox)
    wait_until(lambda: not _remote_snapshots(stack.cd), 30, "remote snapshots to be removed")
    wait_until(lambda: not any((stack.sn.root / "snapshots").iterdir()), 30, "snapshot dirs to go")
    with Client(str(stack.lazyd.socket), timeout=30) as c:
        assert not [m for m in c.mounts().mounts if str(stack.sn.root) in m.mountpoint]


def _manifest(ref: str) -> dict:  # type: ignore[type-arg]
    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_cri_labels_mount_lazily_over_grpc(stack: Stack, esgz_busybox: str) -> None:
    """The labels containerd's CRI plugin sends (no TOC digest: lazyd reads it from the manifest)."""
    layers = [layer["digest"] for layer in _manifest(esgz_busybox)["layers"]]
    labels = {
        "containerd.io/snapshot.ref": "sha256:" + "1" * 64,
        "containerd.io/snapshot/cri.image-ref": esgz_busybox,
        "containerd.io/snapshot/cri.layer-digest": layers[0],
        "containerd.io/snapshot/cri.image-layers": ",".join(layers),
    }
    with stack.sn.channel() as ch:
        stub = stack.sn.stub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="k8s.io/1/extract-x", labels=labels))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        info = stub.Stat(pb.StatSnapshotRequest(snapshotter=SN, key="sha256:" + "1" * 64)).info
        assert info.kind == pb.COMMITTED and REMOTE in info.labels
        with pytest.raises(grpc.RpcError) as err:  # the temporary active key is gone
            stub.Stat(pb.StatSnapshotRequest(snapshotter=SN, key="k8s.io/1/extract-x"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # The layer asked for, then the early mount of the layer above it (cri.image-layers lists both).
        wait_until(lambda: len(_remote_mountpoints(stack.sn)) == 2, 30, "the early mount of layer 1")
        fs, early = _remote_mountpoints(stack.sn)
        assert (fs / "etc/hello.txt").read_text() == "hello from lazyd\n"
        # A second Prepare for the same target answers ALREADY_EXISTS without mounting again.
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="k8s.io/2/extract-x", labels=labels))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert _remote_mountpoints(stack.sn) == [fs, early]
        stub.Remove(pb.RemoveSnapshotRequest(snapshotter=SN, key="sha256:" + "1" * 64))
        assert not fs.exists()


def test_unclaimed_early_mount_is_undone(stack: Stack, esgz_busybox: str, tmp_path: Path) -> None:
    """Prepare of layer 0 mounts layer 1 early; when no Prepare asks for it, it is unmounted after premount_ttl."""
    config = tmp_path / "snapshotter.toml"
    config.write_text("[snapshotter]\npremount_ttl = 2.0\n")
    stack.sn.stop()
    stack.sn.start("--config", str(config))
    layers = [layer["digest"] for layer in _manifest(esgz_busybox)["layers"]]
    labels = {
        "containerd.io/snapshot.ref": "sha256:" + "2" * 64,
        "containerd.io/snapshot/remote/stargz.reference": esgz_busybox,
        "containerd.io/snapshot/remote/stargz.digest": layers[0],
        "containerd.io/snapshot/remote/stargz.layers": ",".join(layers),
    }
    with stack.sn.channel() as ch, pytest.raises(grpc.RpcError) as err:
        stack.sn.stub(ch).Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="default/1/extract-y", labels=labels))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    wait_until(lambda: len(_remote_mountpoints(stack.sn)) == 2, 30, "the early mount of layer 1")
    fs, early = _remote_mountpoints(stack.sn)
    wait_until(lambda: not early.parent.exists(), 30, "the unclaimed early mount to be undone")
    assert _remote_mountpoints(stack.sn) == [fs]
    assert [m["mountpoint"] for m in stack.lazyd.status()["mounts"]] == [str(fs)]
