"""The snapshotter itself: containerd overlay semantics plus lazily mounted remote layers.

Transport-free (the gRPC mapping is in ``service.py``).  Errors are the exception
classes of ``metadata`` plus ``RemoteUnavailableError``.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from lazyd.api.messages import ApiError
from lazyd import mounttable
from lazyd.snapshotter import overlay
from lazyd.snapshotter.config import SnapshotterConfig
from lazyd.snapshotter.filters import Filter
from lazyd.snapshotter.metadata import (
    AlreadyExistsError,
    Info,
    Kind,
    MetaStore,
)
from lazyd.snapshotter.overlay import Layout, Mount
from lazyd.snapshotter.remote import (
    Lazyd,
    RemoteLayer,
    RemoteUnavailableError,
    layer_from_committed,
    parse_remote_labels,
)

log = logging.getLogger("lazyd.snapshotter")


class Snapshotter:
    """Snapshots under ``config.root``; remote layers mounted by lazyd through its API."""

    def __init__(self, config: SnapshotterConfig) -> None:
        self.config = config
        self.layout = Layout(config.root)
        self.store = MetaStore(config.root / "metadata.db")
        self.lazyd = Lazyd(config.lazyd_socket, config.mount_timeout, config.check_timeout, config.connect_timeout,
                           config.require_registry)
        self._remount_lock = threading.Lock()

    def close(self) -> None:
        self.lazyd.close()
        self.store.close()

    # -- create ------------------------------------------------------------------------

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> tuple[int, list[Mount]]:
        if parent and self.store.exists(parent):
            self._check_remote_chain([self.store.stat(parent), *self.store.parents(parent)])
        snap = self.store.create(kind, key, parent, labels)
        try:
            self.layout.create_dirs(snap.id, kind, snap.parent_ids)
        except BaseException:
            self.store.remove(key)
            raise
        return snap.id, self.layout.mounts(snap.id, kind, snap.parent_ids)

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """An active snapshot; remote layers are mounted lazily and answered with ``AlreadyExistsError``."""
        layer = parse_remote_labels(labels) if self.config.remote else None
        if layer is not None and self.store.exists(layer.target):
            raise AlreadyExistsError(f"target snapshot {layer.target!r} already exists")
        sid, mounts = self._create(Kind.ACTIVE, key, parent, labels)
        if layer is None:
            return mounts
        try:
            toc = self.lazyd.mount(layer, self.layout.upper(sid))
        except ApiError as exc:
            reason = f"{exc.code}: {exc.message}"
            log.warning("layer %s of %s: lazy mount failed (%s); falling back to a normal snapshot",
                        layer.layer_digest, layer.ref, reason)
            self.lazyd.report_fallback(layer, reason)
            fs = self.layout.upper(sid)
            if mounttable.is_mounted(fs):  # e.g. lazyd finished mounting after our timeout
                self.lazyd.unmount(fs)
                mounttable.unmount_below(fs)
            return mounts
        return self._commit_remote(key, layer, toc, labels, sid)

    def _commit_remote(self, key: str, layer: RemoteLayer, toc: str, labels: dict[str, str], sid: int) -> NoReturn:
        recorded = RemoteLayer(layer.target, layer.ref, layer.layer_digest, layer.toc_digest or toc or None)
        try:
            self.store.commit(key, layer.target, {**labels, **recorded.labels()})
        except AlreadyExistsError:
            self.lazyd.unmount(self.layout.upper(sid))
            self.store.remove(key)
            self.layout.remove_dir(sid)
            raise
        log.info("layer %s of %s mounted lazily as %s", layer.layer_digest, layer.ref, layer.target)
        raise AlreadyExistsError(f"target snapshot {layer.target!r} (remote snapshot)")

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)[1]

    # -- read --------------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        snap = self.store.get_snapshot(key)
        self._check_remote_chain(self.store.parents(key))
        return self.layout.mounts(snap.id, snap.kind, snap.parent_ids)

    def stat(self, key: str) -> Info:
        return self.store.stat(key)

    def usage(self, key: str) -> tuple[int, int]:
        info = self.store.stat(key)
        if info.kind == Kind.ACTIVE:
            return overlay.usage(self.layout.upper(info.id))
        return info.size, info.inodes

    def walk(self, filters: list[str]) -> Iterator[Info]:
        flt = Filter.parse(filters)
        for info in self.store.walk():
            if flt.match(lambda path, info=info: _field(info, path)):
                yield info

    # -- change ------------------------------------------------------------------------

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Info:
        info = self.store.stat(key)
        size, inodes = (0, 0)
        if info.kind == Kind.ACTIVE:
            size, inodes = overlay.usage(self.layout.upper(info.id))
        return self.store.commit(key, name, labels, size, inodes)

    def update(self, name: str, labels: dict[str, str], fieldpaths: list[str]) -> Info:
        return self.store.update(name, labels, fieldpaths)

    def remove(self, key: str) -> None:
        info = self.store.remove(key)
        if layer_from_committed(info.name, info.labels) is not None:
            self.lazyd.unmount(self.layout.upper(info.id))
        self.layout.remove_dir(info.id)

    def cleanup(self) -> None:
        """Delete snapshot directories that have no metadata (crash leftovers)."""
        for path in self.layout.orphan_dirs(self.store.ids()):
            fs = path / "fs"
            if mounttable.is_mounted(fs):
                self.lazyd.unmount(fs)
            mounttable.unmount_below(path)
            log.info("cleanup: removing %s", path)
            shutil.rmtree(path, ignore_errors=True)

    # -- remote layers -----------------------------------------------------------------

    def _check_remote_chain(self, chain: list[Info]) -> None:
        """Raise ``RemoteUnavailableError`` unless every remote layer in ``chain`` is served."""
        for info in chain:
            layer = layer_from_committed(info.name, info.labels)
            if layer is None:
                continue
            mountpoint = self.layout.upper(info.id)
            try:
                self.lazyd.check(mountpoint)
            except RemoteUnavailableError as first:
                log.info("remote layer %s not served (%s); asking lazyd to mount it again", info.name, first)
                self._remount(layer, mountpoint)
                try:
                    self.lazyd.check(mountpoint)
                except RemoteUnavailableError as exc:
                    raise RemoteUnavailableError(
                        f"layer {layer.layer_digest} of {layer.ref} (snapshot {info.name}) is unavailable: {exc}"
                    ) from None

    def _remount(self, layer: RemoteLayer, mountpoint: Path) -> bool:
        with self._remount_lock:
            try:
                self.lazyd.mount(layer, mountpoint)
            except ApiError as exc:
                log.warning("could not re-mount layer %s of %s at %s: %s", layer.layer_digest, layer.ref, mountpoint, exc)
                return False
        return True

    def restore(self) -> int:
        """Re-mount every committed remote snapshot lazyd does not serve; return how many were mounted."""
        restored = 0
        for info in self.store.walk():
            layer = layer_from_committed(info.name, info.labels)
            if layer is None:
                continue
            mountpoint = self.layout.upper(info.id)
            if self.lazyd.served(mountpoint):
                continue
            if self._remount(layer, mountpoint):
                restored += 1
        return restored


def _field(info: Info, path: tuple[str, ...]) -> str | None:
    """containerd's adaptSnapshot: kind, name, parent, labels.<key>."""
    if not path:
        return None
    head = path[0]
    if head == "kind":
        return info.kind.name.lower()
    if head == "name":
        return info.name
    if head == "parent":
        return info.parent
    if head == "labels":
        return info.labels.get(".".join(path[1:]))
    return None

