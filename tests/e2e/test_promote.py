"""Promotion of fully fetched layers to local snapshots (issue 15), with real containerd, runc,
registry, ``lazyd serve`` and ``lazyd snapshotter``.

One stack for the module (the tests run in file order and build on each other):

1. ``after_fetch``: a container reads busybox-esgz in a loop while its layers are fetched in the
   background and promoted; it keeps reading the right bytes across the swap; a new container's
   overlay has the ``local`` directories as lower layers and no FUSE; once the first container
   exits, lazyd's FUSE mounts of those layers are released.
2. The promoted layer directories equal containerd's overlayfs pull of the plain image
   (type, mode, owner, size, content, link target, device, xattrs) and the layer tars
   (mtimes and hard links, ``tests.support.treecheck``).
3. ``kill -9`` of the snapshotter in the middle of an extraction (debian+python3, slowed by the
   test hook): after the restart the layer is lazy (``local.tmp`` gone, no ``local``, readable
   through FUSE) and is then promoted.
4. ``promote = "manual"`` waits for ``lazyctl promote``; ``promote = "off"`` never promotes and
   ``lazyctl promote`` says so.
5. With lazyd shut down and the registry stopped, new containers of the promoted image start and
   read every file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lazyd.snapshotter.promote import SWAP_GRACE, TEST_DELAY_ENV
from tests.e2e.images import _blob, add_layer, convert_layout, lazyd_builder, manifest_of
from tests.e2e.test_equivalence import _chain, _view, assert_same_tree, describe
from tests.e2e.test_registry_down import _sha256_in_layout
from tests.interop.trees import layer_dirs
from tests.support import treecheck
from tests.support.images import push
from tests.support.procs import Proc, wait_until
from tests.support.registry import Registry, start_registry

from .conftest import SNAPSHOTTER, Images, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIG = "data/big.bin"
INTERVAL = 0.5  # promote_interval of the test snapshotter
HELLO_SHA256 = hashlib.sha256(b"hello from lazyd\n").hexdigest()
ESTARGZ_ONLY = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}


@dataclass
class PromoteStack(Stack):
    """The e2e stack with a ``[snapshotter]`` config file and environment of the test's choosing."""

    snapshotter_config: dict[str, Any] = field(default_factory=dict)
    snapshotter_env: dict[str, str] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)

    def start_snapshotter(self) -> None:
        self.snapshotter_socket.unlink(missing_ok=True)
        config = self.root / "snapshotter.toml"
        config.write_text("[snapshotter]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                      for k, v in self.snapshotter_config.items()))
        self.snapshotter = Proc(
            ["lazyd", "snapshotter", "--config", str(config), "--root", str(self.root / "snapshotter"),
             "--address", str(self.snapshotter_socket), "--lazyd-socket", str(self.lazyd_socket)],
            self.root / "snapshotter.log", env=self.snapshotter_env)
        wait_until(lambda: self.snapshotter_socket.exists() or not self.snapshotter.alive(), 30,
                   "lazyd snapshotter socket")
        assert self.snapshotter.alive(), self.snapshotter.log_text()

    def restart_snapshotter(self, sig: int = signal.SIGTERM, env: dict[str, str] | None = None,
                            **config: Any) -> None:
        self.snapshotter.stop(sig)
        self.snapshotter_config.update(config)
        self.snapshotter_env = env or {}
        self.start_snapshotter()
        wait_until(lambda: self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False).returncode == 0,
                   15, "containerd to reach the restarted snapshotter", interval=0.2)

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshotter" / "snapshots"

    def layer_states(self) -> dict[str, set[str]]:
        """layer digest -> the states lazyd's status shows for it (mounted or only reported)."""
        st = self.status()
        out: dict[str, set[str]] = {}
        for m in st["mounts"]:
            out.setdefault(m["layer_digest"], set()).add(m["layer_state"])
        for local in st["local_layers"]:
            out.setdefault(local["layer_digest"], set()).add(local["state"])
        return out


@dataclass
class Env:
    stack: PromoteStack
    registry: Registry
    images: Images
    busybox: str  # busybox-esgz in the module's own registry
    debian: str
    busybox_layers: list[str] = field(default_factory=list)
    tmp: Path = Path()


@pytest.fixture(scope="module")
def env(images: Images, registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("promote")
    own = start_registry(tmp, name="own", storage_root=registry.root)
    stack = PromoteStack(tmp / "stack", config={"background_delay": 3.0},
                         snapshotter_config={"promote": "after_fetch", "promote_interval": INTERVAL})
    try:
        stack.start()
        yield Env(stack, own, images, images.busybox_esgz.replace(registry.host, own.host),
                  images.debian_esgz.replace(registry.host, own.host), tmp=tmp)
    finally:
        try:
            stack.close()
        finally:
            own.stop()


def _overlay_lowers(mountinfo: str) -> list[str]:
    """The lowerdir entries of the root overlay in a container's /proc/self/mountinfo."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if fields[4] == "/" and " - overlay " in line:
            options = line.split(" - ")[1].split()[2]
            return [e for o in options.split(",") if o.startswith("lowerdir=") for e in o[9:].split(":") if e]
    raise AssertionError(f"no root overlay in\n{mountinfo}")


def _exec(stack: Stack, container: str, *cmd: str) -> str:
    """stdout of ``ctr tasks exec`` (which fails on a non-zero exit). ctr 1.6 now and then returns
    an empty stdout for a short exec that did print; such an empty answer is asked again."""
    for _ in range(3):
        out = stack.ctr("tasks", "exec", "--exec-id", f"x{time.monotonic_ns()}", container, *cmd).stdout
        if out:
            return out
    return out


def test_after_fetch_swap_and_release(env: Env) -> None:
    stack = env.stack
    pulled = stack.rpull(env.busybox)
    assert {layer["mode"] for layer in pulled["layers"]} == {"lazy"}
    digests = [layer["digest"] for layer in pulled["layers"]]
    env.busybox_layers = digests
    want = _sha256_in_layout(env.images.busybox_esgz_layout, BIG)
    # A long-lived container that checks the big file (and a small one) every 0.2 s.
    stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, env.busybox, "reader", "sh", "-c",
              f"while :; do sha256sum /{BIG} /etc/hello.txt >> /tmp/sums; sleep 0.2; done")
    mountinfo = _exec(stack, "reader", "cat", "/proc/self/mountinfo")
    assert all(e.endswith("/fs") for e in _overlay_lowers(mountinfo)), "the first container is not lazy"

    # Background fetch finishes (after background_delay), then the snapshotter promotes.
    done_at = local_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and local_at is None:
        st = stack.status()
        mine = [m for m in st["mounts"] if m["layer_digest"] in digests]
        if done_at is None and len(mine) == 3 and all(m["layer"]["background_state"] == "done" for m in mine):
            done_at = time.monotonic()
        states = stack.layer_states()
        if all(states.get(d) == {"local"} for d in digests):
            local_at = time.monotonic()
        time.sleep(0.05)
    assert done_at is not None and local_at is not None, stack.status()
    stack.measured["background_done_to_local_s"] = local_at - done_at
    swapped_at = time.monotonic()
    dirs = [Path(p) for p in stack.snapshots.iterdir() if (Path(p) / "local").is_dir()]
    assert len(dirs) == 3 and not any((d / "local.tmp").exists() for d in dirs)

    # The running container keeps reading the right bytes across the swap.
    lines_before = len(_exec(stack, "reader", "cat", "/tmp/sums").splitlines())
    time.sleep(1.5)
    sums = _exec(stack, "reader", "cat", "/tmp/sums").splitlines()
    assert len(sums) > lines_before + 2, "the reader stopped reading"
    big = [line.split()[0] for line in sums if line.endswith(f"/{BIG}")]
    assert big and set(big) == {want}, f"wrong bytes read: {sorted(set(big))[:3]} != {want}"
    hello = [line.split()[0] for line in sums if line.endswith("/etc/hello.txt")]
    assert hello and set(hello) == {HELLO_SHA256}, sums[-6:]
    assert _exec(stack, "reader", "cat", "/etc/hello.txt") == "hello from lazyd\n"

    # A new container gets the local directories as lower layers, and no FUSE.
    mountinfo = stack.run(env.busybox, "fresh", "cat", "/proc/self/mountinfo").stdout
    lowers = _overlay_lowers(mountinfo)
    assert len(lowers) == 3 and all(e.endswith("/local") for e in lowers), lowers
    assert " - fuse" not in mountinfo, mountinfo
    assert stack.run(env.busybox, "fresh-sum", "sha256sum", f"/{BIG}").stdout.split()[0] == want

    # While the reader runs, its overlay holds the FUSE mounts (past the swap grace period)...
    time.sleep(max(0.0, swapped_at + SWAP_GRACE + 3 * INTERVAL - time.monotonic()))
    status = stack.status()
    assert {m["layer_digest"] for m in status["mounts"]} >= set(digests), "released while still in use"
    assert _exec(stack, "reader", "sha256sum", f"/{BIG}").split()[0] == want
    # ... and once it exits, lazyd's FUSE mounts of the promoted layers are released.
    stack.ctr("tasks", "kill", "-s", "KILL", "reader")
    exited = time.monotonic()
    wait_until(lambda: stack.ctr("tasks", "rm", "reader", check=False).returncode == 0, 30,
               "the reader's task to be deleted", interval=0.1)
    stack.ctr("containers", "rm", "reader")
    wait_until(lambda: not any(m["layer_digest"] in digests for m in stack.status()["mounts"]), 60,
               "lazyd to release the promoted layers' FUSE mounts", interval=0.1)
    stack.measured["release_after_exit_s"] = time.monotonic() - exited
    fuse = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if any(f"{d}/fs " in line for d in dirs)]
    assert not fuse, fuse
    # Status still lists the promoted layers, from the snapshotter's reports.
    local = {x["layer_digest"]: x for x in stack.status()["local_layers"]}
    assert set(digests) <= set(local) and all(local[d]["state"] == "local" and local[d]["disk_bytes"] > 0
                                              for d in digests)
    log = stack.snapshotter.log_text()
    assert log.count("promoted layer sha256:") >= 3, log
    print(json.dumps(stack.measured))
    print("\n".join(line for line in log.splitlines() if "promoted layer" in line or "released" in line))


def _filtered_layer_tar(layout: Path, digest: str, out: Path) -> Path:
    """The layer's tar without the eStargz-only entries (TOC and landmarks), as ``out``."""
    with tarfile.open(_blob(layout, digest), "r:gz") as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            if "/".join(p for p in member.name.split("/") if p not in ("", ".")) in ESTARGZ_ONLY:
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out


def test_promoted_tree_equals_overlayfs_pull(env: Env) -> None:
    stack = env.stack
    plain = env.images.busybox_plain
    stack.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", plain)
    plain_chain = _chain_of(stack, plain)
    lazy_chain = _chain_of(stack, env.busybox)
    ref_layers = layer_dirs(_view(stack.address, "overlayfs", "view-plain", plain_chain))  # nearest first
    lazy_layers = layer_dirs(_view(stack.address, SNAPSHOTTER, "view-promoted", lazy_chain))
    assert len(ref_layers) == len(lazy_layers) == 3
    assert all(p.endswith("/local") for p in lazy_layers), lazy_layers
    for i, (a, b) in enumerate(zip(ref_layers, lazy_layers)):
        assert_same_tree(describe(Path(a)), describe(Path(b)), f"promoted layer {i} (0 = top)")
    # mtimes and hard links against the layer tars themselves.
    _, esgz_manifest = manifest_of(env.images.busybox_esgz_layout, "latest")
    checked = 0
    for i, desc in enumerate(reversed(esgz_manifest["layers"])):
        tar = _filtered_layer_tar(env.images.busybox_esgz_layout, desc["digest"], env.tmp / f"layer{i}.tar")
        checked += treecheck.check_tree(Path(lazy_layers[i]), tar)
    assert checked > 100


def _target_in(stack: Stack, ref: str, namespace: str) -> str:
    for line in stack.ctr("images", "ls", namespace=namespace).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == ref:
            return fields[2]
    raise AssertionError(f"{ref} is not in containerd's image list")


def _chain_of(stack: Stack, ref: str, namespace: str = "default") -> str:
    manifest = json.loads(stack.ctr("content", "get", _target_in(stack, ref, namespace), namespace=namespace).stdout)
    config = json.loads(stack.ctr("content", "get", manifest["config"]["digest"], namespace=namespace).stdout)
    return _chain(config["rootfs"]["diff_ids"])


def _snapshot_dirs(stack: PromoteStack, digests: set[str]) -> list[Path]:
    """The snapshot directories lazyd mounts the given layers at (those it still mounts)."""
    return sorted({Path(m["mountpoint"]).parent for m in stack.status()["mounts"] if m["layer_digest"] in digests})


def test_kill9_during_extraction_leaves_the_layer_lazy(env: Env) -> None:
    stack = env.stack
    stack.restart_snapshotter(env={TEST_DELAY_ENV: "0.002"})  # a slow extraction, to crash in
    pulled = stack.rpull(env.debian)
    digests = {layer["digest"] for layer in pulled["layers"]}
    dirs = _snapshot_dirs(stack, digests)
    assert len(dirs) == len(digests) == 2
    wait_until(lambda: any((d / "local.tmp").is_dir() for d in dirs), 120, "an extraction to start", interval=0.05)
    time.sleep(1.0)
    stack.snapshotter.stop(signal.SIGKILL)
    half = [d for d in dirs if (d / "local.tmp").exists()]
    assert half and not any((d / "local").exists() for d in half), "the extraction ended before the kill"

    # Restart with promotion off first: the state right after start-up is visible.
    stack.restart_snapshotter(promote="off")
    for d in dirs:
        assert not (d / "local.tmp").exists(), f"{d}/local.tmp left after the restart"
    assert not any((d / "local").exists() for d in half)
    out = stack.run(env.debian, "after-kill", "python3", "-c", "print('lazy and working')").stdout
    assert out == "lazy and working\n"
    states = stack.layer_states()
    assert all(states.get(d, set()) <= {"lazy", "fetching"} for d in digests), states

    # Promotion on again: the layers are promoted, from scratch.
    stack.restart_snapshotter(promote="after_fetch")
    wait_until(lambda: all(stack.layer_states().get(d) == {"local"} for d in digests), 180,
               "the debian layers to be promoted", interval=0.2)
    assert all((d / "local").is_dir() and not (d / "local.tmp").exists() for d in dirs)
    out = stack.run(env.debian, "promoted-py", "python3", "-c", "print('local')").stdout
    assert out == "local\n"
    print("\n".join(line for line in stack.snapshotter.log_text().splitlines() if "promoted layer" in line))


def _fresh_image(env: Env, name: str = "busybox-fresh") -> str:
    """busybox plus a layer of random bytes, as eStargz: layers no earlier test has pulled."""
    work = env.tmp / name
    shutil.copytree(env.images.busybox_layout, work / "plain")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        data = os.urandom(300_000)
        info = tarfile.TarInfo("data/fresh.bin")
        info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
        tf.addfile(info, io.BytesIO(data))
    add_layer(work / "plain", "latest", buf.getvalue(), "lazyd e2e: fresh layer")
    convert_layout(work / "plain", "latest", work / "esgz", lazyd_builder)
    return push(f"oci:{work / 'esgz'}:latest", env.registry.host, f"{name}:esgz")


def test_manual_waits_for_lazyctl_promote_and_off_never_promotes(env: Env) -> None:
    stack = env.stack
    fresh = _fresh_image(env)
    # "off": layers stay lazy once wholly fetched, and lazyctl promote says why.
    stack.restart_snapshotter(promote="off")
    pulled = stack.rpull(fresh)
    new = {layer["digest"] for layer in pulled["layers"]} - set(env.busybox_layers)
    assert new, pulled
    dirs = _snapshot_dirs(stack, new)
    assert dirs and len(dirs) == len(new)
    wait_until(lambda: all(m["layer"]["background_state"] == "done" for m in stack.status()["mounts"]
                           if m["layer_digest"] in new), 60, "background fetch of the fresh layers")
    time.sleep(6 * INTERVAL)
    refused = stack.lazyctl("promote", fresh, check=False)
    assert refused.returncode != 0 and "promote = \"off\"" in refused.stderr, refused
    assert not any((d / "local").exists() for d in dirs)
    assert stack.run(fresh, "off-run", "cat", "/etc/hello.txt").stdout == "hello from lazyd\n"

    # "manual": the same complete layers wait for lazyctl promote.
    stack.restart_snapshotter(promote="manual")
    time.sleep(6 * INTERVAL)
    assert not any((d / "local").exists() for d in dirs)
    states = stack.layer_states()
    assert all(states.get(d, set()) == {"lazy"} for d in new), states
    asked = json.loads(stack.lazyctl("promote", fresh, "--json").stdout)
    assert new <= set(asked["layers"]) and asked["mode"] == "manual", asked
    off_dirs, digests = dirs, new
    wait_until(lambda: all((d / "local").is_dir() for d in off_dirs), 60, "manual promotion", interval=0.1)
    wait_until(lambda: all(stack.layer_states().get(d) == {"local"} for d in digests), 30, "status to say local")


def test_failed_extraction_leaves_the_layer_lazy_and_is_retried(env: Env) -> None:
    """An extraction that cannot write (here: the snapshot directory made immutable, so ``local.tmp``
    cannot be created) is one warning naming the layer; the layer stays lazy and readable, and the
    next attempt after ``promote_retry`` succeeds."""
    stack = env.stack
    stack.restart_snapshotter(promote="manual", promote_retry=3.0)
    fresh = _fresh_image(env, "busybox-fail")
    pulled = stack.rpull(fresh)
    top = pulled["layers"][-1]["digest"]
    (snapshot,) = _snapshot_dirs(stack, {top})
    subprocess.run(["chattr", "+i", str(snapshot)], check=True)
    try:
        stack.lazyctl("promote", top)
        wait_until(lambda: f"promotion of layer {top}" in stack.snapshotter.log_text(), 60,
                   "the failed promotion's warning")
        failed = [line for line in stack.snapshotter.log_text().splitlines() if f"promotion of layer {top}" in line]
        assert "WARNING" in failed[0] and "failed" in failed[0] and "stays lazy" in failed[0], failed
        assert not (snapshot / "local").exists() and not (snapshot / "local.tmp").exists()
        lazy_sum = stack.run(fresh, "after-failure", "sha256sum", "/data/fresh.bin").stdout.split()[0]
        wait_until(lambda: stack.layer_states()[top] == {"lazy"}, 10, "status to show the layer lazy again")
        time.sleep(2 * INTERVAL)
        assert len([line for line in stack.snapshotter.log_text().splitlines()
                    if f"promotion of layer {top}" in line]) == 1, "retried before promote_retry"
    finally:
        subprocess.run(["chattr", "-i", str(snapshot)], check=True)
    wait_until(lambda: (snapshot / "local").is_dir(), 30, "the retried promotion")
    assert stack.run(fresh, "after-retry", "sha256sum", "/data/fresh.bin").stdout.split()[0] == lazy_sum


def test_promoted_image_runs_without_lazyd_and_registry(env: Env) -> None:
    stack = env.stack
    want = _sha256_in_layout(env.images.busybox_esgz_layout, BIG)
    assert stack.lazyd.shutdown(), "lazyd did not stop"  # the clean stop: its workers and FUSE mounts go too
    env.registry.stop()
    fuse = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if " - fuse" in line and str(stack.root) in line]
    assert not fuse, fuse
    out = stack.run(env.busybox, "offline", "sh", "-c",
                    f"find / -xdev -type f | xargs cat > /dev/null && sha256sum /{BIG} && cat /etc/hello.txt").stdout
    assert out.split()[0] == want and out.endswith("hello from lazyd\n"), out
    out = stack.run(env.debian, "offline-py", "python3", "-c", "import json; print(json.dumps('offline'))").stdout
    assert out == '"offline"\n'
