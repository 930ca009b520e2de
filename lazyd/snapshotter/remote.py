"""Remote (lazy) layers: which labels ask for one, and the calls to lazyd's msgpack API.

The snapshotter never touches lazyd's internals: it only sends ``mount``, ``unmount``,
``check``, ``fallback`` and ``layer_state`` requests through ``lazyd.api.client.Client``.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from lazyd.api.client import Client
from lazyd.api.messages import (
    ALREADY_EXISTS,
    NOT_FOUND,
    UNAVAILABLE,
    ApiError,
    LayerReport,
    LayerStateArgs,
    LayerStateResult,
)

log = logging.getLogger("lazyd.snapshotter")

TARGET_REF_LABEL = "containerd.io/snapshot.ref"
REMOTE_LABEL = "containerd.io/snapshot/remote"
REMOTE_LABEL_VALUE = "remote snapshot"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
# Labels we keep on a committed remote snapshot so it can be re-mounted after a restart.
LAZYD_REF = "containerd.io/snapshot/lazyd.ref"
LAZYD_DIGEST = "containerd.io/snapshot/lazyd.layer-digest"
LAZYD_TOC = "containerd.io/snapshot/lazyd.toc-digest"


class RemoteUnavailableError(Exception):
    """A remote lower layer is not served (lazyd down, worker dead, registry unreachable)."""


@dataclass(frozen=True)
class RemoteLayer:
    """What lazyd needs to mount one layer lazily."""

    target: str           # the committed snapshot name containerd asked for (chain id)
    ref: str              # image reference
    layer_digest: str
    toc_digest: str | None
    layers: tuple[str, ...] = ()   # digests of the image's layers (for prefetch hints; informational)

    def labels(self) -> dict[str, str]:
        """Labels recording this layer on its committed snapshot."""
        out = {REMOTE_LABEL: REMOTE_LABEL_VALUE, LAZYD_REF: self.ref, LAZYD_DIGEST: self.layer_digest}
        if self.toc_digest:
            out[LAZYD_TOC] = self.toc_digest
        return out


def parse_remote_labels(labels: dict[str, str]) -> RemoteLayer | None:
    """The remote layer a Prepare asks for, or None when the labels do not ask for one.

    stargz-style labels (sent by ``ctr-remote``/``lazyctl rpull``) win over the CRI ones.
    """
    target = labels.get(TARGET_REF_LABEL, "")
    if not target:
        return None
    ref = labels.get(STARGZ_REFERENCE) or labels.get(CRI_IMAGE_REF) or ""
    digest = labels.get(STARGZ_DIGEST) or labels.get(CRI_LAYER_DIGEST) or ""
    if not ref or not digest:
        return None
    layers_csv = labels.get(STARGZ_LAYERS) or labels.get(CRI_IMAGE_LAYERS) or ""
    layers = tuple(d for d in layers_csv.split(",") if d)
    return RemoteLayer(target=target, ref=ref, layer_digest=digest, toc_digest=labels.get(TOC_DIGEST) or None,
                       layers=layers)


def layer_from_committed(name: str, labels: dict[str, str]) -> RemoteLayer | None:
    """The remote layer recorded on a committed snapshot, or None if it is a normal one."""
    if labels.get(REMOTE_LABEL) is None or not labels.get(LAZYD_REF) or not labels.get(LAZYD_DIGEST):
        return None
    return RemoteLayer(target=name, ref=labels[LAZYD_REF], layer_digest=labels[LAZYD_DIGEST],
                       toc_digest=labels.get(LAZYD_TOC) or None)


class Lazyd:
    """The snapshotter's view of lazyd: mount, unmount, check and report fallbacks."""

    def __init__(self, socket_path: Path, mount_timeout: float, check_timeout: float, connect_timeout: float,
                 require_registry: bool = True) -> None:
        self.socket_path = socket_path
        self.mount_timeout = mount_timeout
        self.check_timeout = check_timeout
        self.require_registry = require_registry
        self.connect_timeout = connect_timeout
        self._client = Client(str(socket_path), timeout=mount_timeout, connect_timeout=connect_timeout)

    def close(self) -> None:
        self._client.close()

    def _probe(self) -> None:
        """Fail fast with ``ApiError(unavailable)`` when nothing listens on lazyd's socket.

        (The client retries connecting until the call's deadline, which for ``mount``
        is long; a snapshotter must not stall a pull for that when lazyd is down.)
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(str(self.socket_path))
        except OSError as exc:
            raise ApiError(UNAVAILABLE, f"lazyd is not running at {self.socket_path}: {exc.strerror or exc}") from None
        finally:
            sock.close()

    def mount(self, layer: RemoteLayer, mountpoint: Path) -> str:
        """Mount the layer at ``mountpoint``; return its TOC digest. Raises ``ApiError``."""
        self._probe()
        try:
            result = self._client.mount(layer.ref, layer.layer_digest, str(mountpoint), toc_digest=layer.toc_digest,
                                        timeout=self.mount_timeout)
        except ApiError as exc:
            if exc.code == ALREADY_EXISTS and self.served(mountpoint):
                return layer.toc_digest or ""
            raise
        return result.toc_digest

    def unmount(self, mountpoint: Path) -> None:
        """Ask lazyd to unmount; errors are logged, not raised (the caller cleans up locally)."""
        try:
            self._probe()
            self._client.call("unmount", {"mountpoint": str(mountpoint)}, timeout=self.check_timeout)
        except ApiError as exc:
            log.debug("lazyd unmount %s: %s", mountpoint, exc)

    def release(self, mountpoint: Path) -> str | None:
        """Ask lazyd to drop a promoted layer's mount (its bind is already detached): ``"released"``,
        ``"absent"`` (lazyd had no mount there), or None when lazyd cannot be asked now."""
        try:
            self._probe()
            self._client.call("unmount", {"mountpoint": str(mountpoint)}, timeout=self.check_timeout)
        except ApiError as exc:
            if exc.code == NOT_FOUND:
                return "absent"
            log.debug("lazyd unmount %s: %s", mountpoint, exc)
            return None
        return "released"

    def layer_state(self, mode: str, reports: list[LayerReport]) -> LayerStateResult:
        """Report the promotion setting and layer states; raises ``ApiError`` (e.g. lazyd down)."""
        self._probe()
        result: LayerStateResult = self._client.request("layer_state", LayerStateArgs(mode, reports),
                                                        timeout=self.check_timeout)
        return result

    def served(self, mountpoint: Path) -> bool:
        try:
            self.check(mountpoint)
        except RemoteUnavailableError:
            return False
        return True

    def check(self, mountpoint: Path) -> None:
        """Raise ``RemoteUnavailableError`` with the reason unless lazyd serves ``mountpoint``."""
        try:
            self._probe()
            result = self._client.request("check", {"mountpoint": str(mountpoint)}, timeout=self.check_timeout)
        except ApiError as exc:
            raise RemoteUnavailableError(f"lazyd cannot serve {mountpoint}: {exc}") from None
        if not result.served or result.state != "ready":
            raise RemoteUnavailableError(
                f"remote layer at {mountpoint} is {result.state}" + (f": {result.error}" if result.error else ""))
        if self.require_registry and not result.registry_reachable and not result.cached:
            raise RemoteUnavailableError(
                f"registry of the remote layer at {mountpoint} is unreachable" + (f": {result.error}" if result.error else ""))

    def report_fallback(self, layer: RemoteLayer, reason: str) -> None:
        """Tell lazyd (best effort) that a layer is pulled in full, for ``lazyctl status``."""
        try:
            self._probe()
            self._client.fallback(layer.ref, layer.layer_digest, reason[:4000])
        except ApiError as exc:
            log.debug("could not report fallback of %s to lazyd: %s", layer.layer_digest, exc)
