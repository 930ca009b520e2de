"""The snapshotter itself: containerd overlay semantics plus lazily mounted remote layers.

Transport-free (the gRPC mapping is in ``service.py``).  Errors are the exception
classes of ``metadata`` plus ``RemoteUnavailableError``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from lazyd.api.messages import UNAVAILABLE, ApiError
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
from lazyd.snapshotter.promote import Promoter
from lazyd.snapshotter.remote import (
    Lazyd,
    RemoteLayer,
    RemoteUnavailableError,
    layer_from_committed,
    parse_remote_labels,
)

log = logging.getLogger("lazyd.snapshotter")

PREMOUNT_THREADS = 4  # concurrent early lazyd mounts (each mostly waits for lazyd)
CHECK_THREADS = 8  # concurrent checks of the remote layers below a new snapshot


@dataclass
class _Premount:
    """An early lazyd mount of a later layer, at the directory of a reserved snapshot id."""

    sid: int
    result: Future[str]  # the TOC digest, or the mount's ApiError
    timer: threading.Timer


class Snapshotter:
    """Snapshots under ``config.root``; remote layers mounted by lazyd through its API."""

    def __init__(self, config: SnapshotterConfig) -> None:
        self.config = config
        self.layout = Layout(config.root)
        self.store = MetaStore(config.root / "metadata.db")
        self.lazyd = Lazyd(config.lazyd_socket, config.mount_timeout, config.check_timeout, config.connect_timeout,
                           config.require_registry)
        self._remount_lock = threading.Lock()
        self._premounts: dict[tuple[str, str], _Premount] = {}  # (ref, layer digest) -> early mount
        self._premount_lock = threading.Lock()
        # Held while a snapshot's row and directory come into being, and while cleanup decides
        # what is orphaned (else it can delete a directory a concurrent Prepare is making).
        # Lock order: _premount_lock, then _dirs_lock.
        self._dirs_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=PREMOUNT_THREADS, thread_name_prefix="premount")
        self._checks = ThreadPoolExecutor(max_workers=CHECK_THREADS, thread_name_prefix="check")
        self.promoter = Promoter(config, self.layout, self.store, self.lazyd)

    def start_promotion(self) -> None:
        """Start the promotion thread (``lazyd snapshotter`` does, after ``restore``)."""
        self.promoter.start()

    def close(self) -> None:
        self.promoter.close()
        with self._premount_lock:
            premounts, self._premounts = list(self._premounts.values()), {}
        for pre in premounts:
            pre.timer.cancel()
            self._release(pre)
        self._pool.shutdown(wait=True)
        self._checks.shutdown(wait=True)
        self.lazyd.close()
        self.store.close()

    # -- create ------------------------------------------------------------------------

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str],
                premount: _Premount | None = None) -> tuple[int, list[Mount]]:
        """Create the snapshot and its directories (those of ``premount`` when given: they exist)."""
        if parent and self.store.exists(parent):
            self._check_remote_chain([self.store.stat(parent), *self.store.parents(parent)])
        with self._dirs_lock:
            snap = self.store.create(kind, key, parent, labels, premount.sid if premount else None)
            if premount is None:
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
        if layer is None:
            return self._create(Kind.ACTIVE, key, parent, labels)[1]
        premount = self._claim_premount(layer)
        try:
            sid, mounts = self._create(Kind.ACTIVE, key, parent, labels, premount)
        except BaseException:
            if premount is not None:  # undone in the background: that waits for the mount to finish
                threading.Thread(target=self._release, args=(premount,), name="premount-release", daemon=True).start()
            raise
        if self.config.premount:
            self._premount_later(layer)
        started = time.monotonic()
        try:
            toc = self._premount_result(premount, layer) if premount else self.lazyd.mount(layer, self.layout.upper(sid))
        except ApiError as exc:
            reason = f"{exc.code}: {exc.message}"
            log.warning("layer %s of %s: lazy mount failed (%s); falling back to a normal snapshot",
                        layer.layer_digest, layer.ref, reason)
            self.lazyd.report_fallback(layer, reason)
            fs = self.layout.upper(sid)
            if mounttable.is_mounted(fs):  # e.g. lazyd finished mounting after our timeout
                self.lazyd.unmount(fs)
                mounttable.unmount_below(fs)
            if premount is not None:
                self.layout.own_like_parent(sid, self.store.get_snapshot(key).parent_ids)
            return mounts
        log.debug("layer %s mounted in %.3fs (%s)", layer.layer_digest, time.monotonic() - started,
                  "early mount" if premount else "mount")
        return self._commit_remote(key, layer, toc, labels, sid)

    # -- early mounts of later layers --------------------------------------------------

    def _premount_later(self, layer: RemoteLayer) -> None:
        """Start lazyd mounts of the layers above ``layer`` (its labels list them) at reserved snapshot dirs."""
        later = [d for d in dict.fromkeys(layer.layers) if d != layer.layer_digest]
        for digest in later:
            key = (layer.ref, digest)
            with self._premount_lock:
                if key in self._premounts:
                    continue
                with self._dirs_lock:
                    sid = self.store.reserve_id()
                    self.layout.create_dirs(sid, Kind.ACTIVE, [])
                later_layer = RemoteLayer(target="", ref=layer.ref, layer_digest=digest, toc_digest=None)
                timer = threading.Timer(self.config.premount_ttl, self._expire, (key,))
                timer.daemon = True
                pre = _Premount(sid, self._pool.submit(self.lazyd.mount, later_layer, self.layout.upper(sid)), timer)
                self._premounts[key] = pre
                timer.start()
            log.debug("early mount of layer %s of %s at snapshot dir %d", digest, layer.ref, sid)

    def _claim_premount(self, layer: RemoteLayer) -> _Premount | None:
        with self._premount_lock:
            pre = self._premounts.pop((layer.ref, layer.layer_digest), None)
        if pre is not None:
            pre.timer.cancel()
        return pre

    def _premount_result(self, pre: _Premount, layer: RemoteLayer) -> str:
        """The early mount's TOC digest, or its ``ApiError``; one with another TOC digest is redone."""
        try:
            toc = pre.result.result(timeout=self.config.mount_timeout)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the wait timed out: handled like a failed mount
            raise ApiError(UNAVAILABLE, f"early mount failed: {type(exc).__name__}: {exc}") from None
        if layer.toc_digest and toc and toc != layer.toc_digest:
            log.info("early mount of layer %s has TOC %s, Prepare asks for %s; mounting again",
                     layer.layer_digest, toc, layer.toc_digest)
            fs = self.layout.upper(pre.sid)
            self.lazyd.unmount(fs)
            mounttable.unmount_below(fs)
            return self.lazyd.mount(layer, fs)
        return toc

    def _expire(self, key: tuple[str, str]) -> None:
        with self._premount_lock:
            pre = self._premounts.pop(key, None)
        if pre is not None:
            log.info("early mount of layer %s of %s was not asked for; unmounting it", key[1], key[0])
            self._release(pre)

    def _release(self, pre: _Premount) -> None:
        """Undo an unclaimed early mount: unmount it and delete its directory."""
        try:
            pre.result.result(timeout=self.config.mount_timeout)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the directory goes
            log.debug("unclaimed early mount at snapshot dir %d had failed: %s", pre.sid, exc)
        fs = self.layout.upper(pre.sid)
        if mounttable.is_mounted(fs):
            self.lazyd.unmount(fs)
        self.layout.remove_dir(pre.sid)

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
        if info.kind == Kind.COMMITTED and self.layout.promoted(info.id):
            return overlay.usage(self.layout.local(info.id))  # a promoted layer's real disk use
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
            self.promoter.cancel(info.id)
            self.lazyd.unmount(self.layout.upper(info.id))
        self.layout.remove_dir(info.id)

    def cleanup(self) -> None:
        """Delete snapshot directories that have no metadata (crash leftovers), except early mounts'."""
        with self._premount_lock, self._dirs_lock:
            reserved = {pre.sid for pre in self._premounts.values()}
            orphans = self.layout.orphan_dirs(self.store.ids() | reserved)
        for path in orphans:  # ids are never reused, so what was orphaned stays orphaned
            fs = path / "fs"
            if mounttable.is_mounted(fs):
                self.lazyd.unmount(fs)
            mounttable.unmount_below(path)
            log.info("cleanup: removing %s", path)
            shutil.rmtree(path, ignore_errors=True)

    # -- remote layers -----------------------------------------------------------------

    def _check_remote_chain(self, chain: list[Info]) -> None:
        """Raise ``RemoteUnavailableError`` unless every remote layer in ``chain`` is served (checked at once).

        Promoted layers (``local`` exists) need neither lazyd nor the registry and are not checked."""
        remote = [(info, layer) for info in chain if (layer := layer_from_committed(info.name, info.labels))
                  and not self.layout.promoted(info.id)]
        if len(remote) == 1:
            self._check_remote(*remote[0])
        elif remote:
            for done in [self._checks.submit(self._check_remote, info, layer) for info, layer in remote]:
                done.result()  # the first failure (nearest parent first) is raised

    def _check_remote(self, info: Info, layer: RemoteLayer) -> None:
        """Check one remote layer; ask lazyd to mount it again once when it is not served."""
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
        """Re-mount every committed remote snapshot lazyd does not serve; return how many were mounted.

        Promoted layers are not re-mounted (see ``Promoter.recover``); an unfinished promotion is undone."""
        restored = 0
        for info in self.store.walk():
            layer = layer_from_committed(info.name, info.labels)
            if layer is None:
                continue
            self.promoter.recover(info)
            if self.layout.promoted(info.id):
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

