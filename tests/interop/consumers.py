"""The two lazy pullers of the matrix, each with its own containerd.

* ``LazydConsumer``: ``lazyd serve`` + ``lazyd snapshotter`` + containerd (tests/e2e's Stack);
  ``lazyctl rpull`` pulls, and lazy/fallback is read from rpull's per-layer modes and from
  lazyd's fallback record and mount table (``lazyctl status --json``).
* ``StargzConsumer``: the reference ``containerd-stargz-grpc`` + containerd, proxy ``stargz``;
  ``ctr-remote images rpull`` pulls, and lazy/fallback is read from its FUSE mounts
  (/proc/self/mountinfo) and its ``remote-snapshot-prepared`` log lines.

Each pull goes to its own containerd namespace, so snapshots (and mounts) are never shared
between cells. A layer counts as lazy only if it was mounted remotely and its blob never
reached containerd's content store.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.conftest import Stack
from tests.support.containerd import Containerd, start_containerd
from tests.support.lazyd import unmount_all_below
from tests.support.procs import Proc, wait_until

from .oci import Image
from .trees import Entry, chain_id, snapshot_tree

STARGZ_GRPC = "/opt/lazyd-interop/bin/containerd-stargz-grpc"


@dataclass
class PullReport:
    """What one consumer did with one image."""

    layers: int
    lazy: int                      # layers mounted remotely (and not downloaded)
    fallbacks: list[str] = field(default_factory=list)  # one line per layer that was not lazy
    run_output: str = ""


def content_digests(cd: Containerd, namespace: str) -> set[str]:
    """Digests in ``namespace`` of containerd's content store (a lazily pulled layer's blob is never there)."""
    out = cd.ctr("content", "ls", "-q", namespace=namespace).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def fuse_mounts_below(root: Path) -> set[str]:
    """Mount points of FUSE file systems under ``root``."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    out = set()
    for row in rows:
        fstype = row[row.index("-") + 1]
        if fstype.startswith("fuse") and row[4].startswith(prefix):
            out.add(row[4])
    return out


def lazyd_fallbacks(digests: list[str], rpull_result: dict, status: dict, downloaded: set[str]) -> list[str]:
    """One line per layer of ``digests`` that lazyd did not serve lazily, from ``lazyctl rpull --json``'s
    per-layer modes, ``lazyctl status --json`` (fallback record, mounts) and the content store."""
    # A layer served lazily and then promoted (every chunk fetched, extracted to a local directory,
    # its FUSE mount released once no container used it) is no longer mounted: not a fallback.
    mounted = {m["layer_digest"] for m in status["mounts"]} | {
        s["layer_digest"] for s in status.get("local_layers", []) if s["state"] == "local"}
    recorded = {f["layer_digest"]: f["reason"] for f in status["fallbacks"]}
    modes = {layer["digest"]: layer for layer in rpull_result["layers"]}
    out = []
    for digest in digests:
        layer = modes.get(digest)
        problems = []
        if layer is None or layer["mode"] != "lazy":
            problems.append(f"rpull mode {layer and layer['mode']} ({layer and layer.get('reason')})")
        if digest in recorded:
            problems.append(f"lazyd recorded a fallback: {recorded[digest]}")
        if digest not in mounted:
            problems.append("no lazyd mount")
        if digest in downloaded:
            problems.append("blob downloaded into containerd")
        if problems:
            out.append(f"{digest[:19]}: " + "; ".join(problems))
    return out


def stargz_prepared(log_text: str, namespace: str) -> tuple[int, list[str]]:
    """(successes, failure messages) of remote snapshot preparation that containerd-stargz-grpc logged
    (at ``-log-level debug``) for ``namespace``."""
    ok, failed = 0, []
    for line in log_text.splitlines():
        if "remote-snapshot-prepared" not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = {"msg": line, "remote-snapshot-prepared": "true" if
                   re.search(r'remote-snapshot-prepared="?true', line) else "false", "key": line}
        if not str(rec.get("key", "")).startswith(f"{namespace}/"):
            continue
        if str(rec.get("remote-snapshot-prepared")) == "true":
            ok += 1
        else:
            failed.append(f"{rec.get('msg')}: {rec.get('error')}")
    return ok, failed


def stargz_report(digests: list[str], new_mounts: set[str], log_text: str, namespace: str,
                  downloaded: set[str]) -> PullReport:
    """Lazy layers and fallbacks of a reference pull of an image with layers ``digests``: its new FUSE
    mounts, its ``remote-snapshot-prepared`` log lines and the content store."""
    ok, failed = stargz_prepared(log_text, namespace)
    report = PullReport(layers=len(digests), lazy=0)
    report.fallbacks += [f"reference log: {msg}" for msg in failed]
    report.fallbacks += [f"{digest[:19]}: blob downloaded into containerd" for digest in digests
                         if digest in downloaded]
    if not report.fallbacks:
        # Every layer prepared remotely and none downloaded: the new FUSE mounts are the lazy layers.
        report.lazy = min(len(new_mounts), ok)
    if report.lazy != report.layers and not report.fallbacks:
        report.fallbacks.append(f"{len(new_mounts)} new FUSE mounts and {ok} remote snapshots for "
                                f"{report.layers} layers")
    return report


class LazydConsumer:
    """lazyd as the consumer."""

    name = "lazyd"
    snapshotter = "lazyd"

    def __init__(self, root: Path) -> None:
        self.stack = Stack(root)

    def start(self) -> "LazydConsumer":
        self.stack.start()
        return self

    def close(self) -> None:
        self.stack.close()

    @property
    def containerd(self) -> Containerd:
        return self.stack.containerd

    def pull(self, image: Image, namespace: str) -> PullReport:
        result = self.stack.rpull(image.ref, namespace=namespace)
        digests = [layer["digest"] for layer in image.layers]
        fallbacks = lazyd_fallbacks(digests, result, self.stack.status(), content_digests(self.containerd, namespace))
        return PullReport(layers=len(digests), lazy=len(digests) - len(fallbacks), fallbacks=fallbacks)

    def run(self, ref: str, namespace: str, name: str, cmd: list[str]) -> str:
        return self.containerd.ctr("run", "--rm", "--snapshotter", self.snapshotter, ref, name, *cmd,
                                   namespace=namespace).stdout

    def tree(self, image: Image, namespace: str, where: Path) -> dict[str, Entry]:
        return snapshot_tree(self.containerd.address, namespace, self.snapshotter, chain_id(image.diff_ids), where)


class StargzConsumer:
    """The reference stargz-snapshotter 0.12 as the consumer."""

    name = "stargz"
    snapshotter = "stargz"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: Proc | None = None
        self.cd: Containerd | None = None

    def start(self) -> "StargzConsumer":
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "stargz.toml"
        config.write_text("")
        sock = self.root / "stargz.sock"
        self.proc = Proc([STARGZ_GRPC, "-address", str(sock), "-root", str(self.root / "stargz"), "-config",
                          str(config), "-log-level", "debug"], self.root / "stargz.log")
        try:
            wait_until(lambda: sock.exists() or not self.proc.alive(), 30, "containerd-stargz-grpc socket")
            if not self.proc.alive():
                raise RuntimeError(f"containerd-stargz-grpc exited:\n{self.proc.log_text()[-3000:]}")
            self.cd = start_containerd(self.root / "containerd", snapshotter_address=str(sock),
                                       proxy_name=self.snapshotter)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.cd is not None:
            self.cd.stop()
        if self.proc is not None:
            self.proc.stop()
        unmount_all_below(self.root)

    @property
    def containerd(self) -> Containerd:
        assert self.cd is not None
        return self.cd

    def pull(self, image: Image, namespace: str) -> PullReport:
        before = fuse_mounts_below(self.root)
        self.containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", self.snapshotter, image.ref,
                                   namespace=namespace)
        assert self.proc is not None
        return stargz_report([layer["digest"] for layer in image.layers], fuse_mounts_below(self.root) - before,
                             self.proc.log_text(), namespace, content_digests(self.containerd, namespace))

    def run(self, ref: str, namespace: str, name: str, cmd: list[str]) -> str:
        return self.containerd.ctr("run", "--rm", "--snapshotter", self.snapshotter, ref, name, *cmd,
                                   namespace=namespace).stdout

    def tree(self, image: Image, namespace: str, where: Path) -> dict[str, Entry]:
        return snapshot_tree(self.containerd.address, namespace, self.snapshotter, chain_id(image.diff_ids), where)
