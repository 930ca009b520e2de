"""Promotion: a remote layer whose every chunk is cached becomes a plain local directory.

The ``Promoter`` runs one background thread (``promote_interval``) in the snapshotter:

1. It reports the snapshotter's ``promote`` setting and the state of each committed remote
   snapshot's layer to lazyd (``layer_state``); lazyd answers, per lazy layer, whether every
   chunk is in its store (``complete``) and whether ``lazyctl promote`` asked for it.
2. It promotes at most one complete layer at a time (``after_fetch``: any complete layer;
   ``manual``: the requested ones): ``extract_layer(<id>/fs, <id>/local)`` in its own thread
   (never in a gRPC handler).  The rename of ``local.tmp`` to ``local`` is the switch: from
   then on ``Layout.lower`` gives ``local`` to every new mount.
3. The swap: the FUSE bind at ``<id>/fs`` is detached lazily (overlays that already use it keep
   it alive) and ``local`` is bound read-only at ``<id>/fs`` (a mount built from an older
   ``Mounts`` reply gets the local tree too).
4. The release: once ``SWAP_GRACE`` has passed and no overlay in ``/proc/self/mountinfo``
   names ``<id>/fs`` as a lower directory, lazyd is asked to ``unmount`` it: the worker drops
   the layer and its chunks may leave the cache.

Failures leave the layer lazy: ``extract_layer`` removes ``local.tmp`` itself, a crash leaves
it for ``recover`` (at start-up) to remove, and a failed layer is tried again only after
``promote_retry`` seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lazyd import mounttable
from lazyd.api.messages import MAX_LAYER_REPORTS, ApiError, LayerReport
from lazyd.snapshotter import overlay
from lazyd.snapshotter.config import SnapshotterConfig
from lazyd.snapshotter.extract import ExtractAborted, ExtractError, cleanup_partial, extract_layer
from lazyd.snapshotter.metadata import Info, Kind, MetaStore
from lazyd.snapshotter.overlay import Layout
from lazyd.snapshotter.remote import Lazyd, RemoteLayer, layer_from_committed

log = logging.getLogger("lazyd.snapshotter")

MOUNTINFO = Path("/proc/self/mountinfo")
SWAP_GRACE = 10.0
"""Seconds after a swap before lazyd's mount may be released: a mount containerd builds from
a ``Mounts`` reply it got just before the swap (naming ``<id>/fs``) is made within this time."""
CANCEL_WAIT = 30.0  # longest ``cancel`` waits for an extraction of that snapshot to stop
TEST_DELAY_ENV = "LAZYD_TEST_PROMOTE_DELAY"
"""Tests only: seconds to sleep per extracted entry (a slow extraction to crash in)."""


def _unescape(text: str) -> str:
    """Undo mountinfo's octal escapes (``\\054`` for a comma in an option value)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 4 <= len(text) and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def overlay_lowerdirs(mountinfo: str) -> list[list[str]]:
    """The lower directories of every overlay mount in ``mountinfo`` text, one list per mount.

    They are shown as given to mount(2): absolute, or relative to the directory containerd
    changed into when the option string was long (``12/fs:11/fs``).
    """
    out = []
    for line in mountinfo.splitlines():
        _, sep, right = line.partition(" - ")
        fields = right.split()
        if not sep or len(fields) < 3 or fields[0] != "overlay":
            continue
        lowers: list[str] = []
        for option in fields[2].split(","):
            key, _, value = option.partition("=")
            if key in ("lowerdir", "lowerdir+", "datadir+"):
                lowers += [_unescape(v) for v in value.split(":") if v]
        out.append(lowers)
    return out


def uses_dir(lowerdir: str, fs: Path) -> bool:
    """Whether one lowerdir entry names ``fs`` (``<root>/snapshots/<id>/fs``): the same absolute
    path, or a relative one ending in ``<id>/fs`` (that may be another snapshotter's ``<id>``:
    such a false match only delays a release)."""
    tail = f"{fs.parent.name}/{fs.name}"
    return lowerdir == str(fs) or lowerdir == tail or lowerdir.endswith("/" + tail)


def overlay_users(fs_dirs: Iterable[Path], mountinfo: str) -> set[Path]:
    """The directories of ``fs_dirs`` that some overlay mount uses as a lower directory."""
    wanted = list(fs_dirs)
    used: set[Path] = set()
    for lowers in overlay_lowerdirs(mountinfo):
        for entry in lowers:
            used.update(fs for fs in wanted if uses_dir(entry, fs))
    return used


@dataclass
class _Job:
    """The promotion in progress (one at a time)."""

    sid: int
    layer: RemoteLayer
    future: Future[None]
    cancelled: threading.Event


class Promoter:
    """The snapshotter's promotion thread and the state it keeps in memory (the directories
    on disk are the truth: ``local`` means promoted)."""

    def __init__(self, config: SnapshotterConfig, layout: Layout, store: MetaStore, lazyd: Lazyd) -> None:
        self.config = config
        self.layout = layout
        self.store = store
        self.lazyd = lazyd
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._extractor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promote")
        self._job: _Job | None = None
        self._release: dict[int, float] = {}  # sid -> monotonic time from which lazyd's mount may go
        self._retry_at: dict[int, float] = {}  # sid -> monotonic time before which a failed one waits
        self._disk: dict[int, int] = {}  # sid -> disk bytes of its ``local``
        delay = os.environ.get(TEST_DELAY_ENV)
        self._test_delay = float(delay) if delay else 0.0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the promotion thread (also with ``promote = "off"``: it reports the setting)."""
        self._thread = threading.Thread(target=self._run, name="promoter", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            job = self._job
        if job is not None:
            job.cancelled.set()
        if self._thread is not None:
            self._thread.join(timeout=CANCEL_WAIT)
        self._extractor.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stop.wait(self.config.promote_interval):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the thread must survive anything one pass hits
                log.exception("promotion pass failed")

    # -- start-up ----------------------------------------------------------------------

    def recover(self, info: Info) -> None:
        """At start-up, for one committed remote snapshot: remove a crashed extraction's
        ``local.tmp``; for a promoted one, detach a FUSE bind still at ``fs`` and queue the
        release of lazyd's mount (done once no overlay uses it)."""
        sid = info.id
        if cleanup_partial(self.layout.local(sid)):
            log.info("removed the unfinished promotion of snapshot %s (%s); the layer stays lazy", sid, info.name)
        if not self.layout.promoted(sid):
            return
        fs = self.layout.upper(sid)
        if mounttable.is_mounted(str(fs)):
            self._detach(fs)
        with self._lock:
            self._release[sid] = time.monotonic()

    # -- one pass ----------------------------------------------------------------------

    def _remote(self) -> list[tuple[Info, RemoteLayer]]:
        out = []
        for info in self.store.walk():
            if info.kind == Kind.COMMITTED and (layer := layer_from_committed(info.name, info.labels)) is not None:
                out.append((info, layer))
        return out

    def _disk_bytes(self, sid: int) -> int:
        with self._lock:
            known = self._disk.get(sid)
        if known is None:
            known = overlay.usage(self.layout.local(sid))[0]
            with self._lock:
                self._disk[sid] = known
        return known

    def tick(self) -> None:
        """Report layer states, release unused FUSE mounts, and start one promotion if due."""
        with self._lock:
            job = self._job
        busy = job is not None and not job.future.done()
        by_digest: dict[str, list[tuple[Info, RemoteLayer]]] = {}
        states: dict[str, LayerReport] = {}
        rank = {"local": 0, "lazy": 1, "promoting": 2}  # one report per digest: the most active state
        for info, layer in self._remote():
            if self.layout.promoted(info.id):
                report = LayerReport(layer.layer_digest, "local", self._disk_bytes(info.id))
            elif busy and job is not None and job.sid == info.id:
                report = LayerReport(layer.layer_digest, "promoting")
            else:
                report = LayerReport(layer.layer_digest, "lazy")
                by_digest.setdefault(layer.layer_digest, []).append((info, layer))
            old = states.get(layer.layer_digest)
            if old is None or rank[report.state] > rank[old.state]:
                states[layer.layer_digest] = report
        self._release_unused()
        reports, answers = list(states.values()), []
        try:
            for start in range(0, max(len(reports), 1), MAX_LAYER_REPORTS):  # one request per 4096 layers
                answers += self.lazyd.layer_state(self.config.promote,
                                                  reports[start:start + MAX_LAYER_REPORTS]).layers
        except ApiError as exc:
            log.debug("layer_state to lazyd: %s", exc)
            return
        if self.config.promote == "off" or busy or self._stop.is_set():
            return
        now = time.monotonic()
        for p in answers:
            if not p.complete or (self.config.promote == "manual" and not p.requested):
                continue
            for info, layer in by_digest.get(p.layer_digest, []):
                if self._retry_at.get(info.id, 0.0) > now:
                    continue
                self._start(info, layer)
                return

    def _start(self, info: Info, layer: RemoteLayer) -> None:
        cancelled = threading.Event()
        with self._lock:
            self._job = _Job(info.id, layer, Future(), cancelled)
            self._job.future = self._extractor.submit(self._promote, info, layer, cancelled)

    # -- one promotion (extractor thread) ------------------------------------------------

    def _should_stop(self, cancelled: threading.Event) -> Callable[[], bool]:
        def should_stop() -> bool:
            if self._test_delay:
                time.sleep(self._test_delay)
            return cancelled.is_set() or self._stop.is_set()
        return should_stop

    def _promote(self, info: Info, layer: RemoteLayer, cancelled: threading.Event) -> None:
        sid = info.id
        fs, local = self.layout.upper(sid), self.layout.local(sid)
        if not mounttable.is_mounted(str(fs)) or mounttable.is_dead(str(fs)):
            # Never copy an empty mountpoint or a dead mount: that would be a wrong layer.
            log.warning("not promoting layer %s (snapshot %s): lazyd does not serve %s; retrying in %.0fs",
                        layer.layer_digest, sid, fs, self.config.promote_retry)
            self._retry_at[sid] = time.monotonic() + self.config.promote_retry
            return
        try:
            self.lazyd.layer_state(self.config.promote, [LayerReport(layer.layer_digest, "promoting")])
        except ApiError as exc:
            log.debug("layer_state to lazyd: %s", exc)
        log.info("promoting layer %s of %s (snapshot %s) to %s", layer.layer_digest, layer.ref, sid, local)
        started = time.monotonic()
        try:
            stats = extract_layer(fs, local, should_stop=self._should_stop(cancelled))
        except ExtractAborted:
            log.info("promotion of layer %s (snapshot %s) stopped; it stays lazy", layer.layer_digest, sid)
            return
        except ExtractError as exc:
            log.warning("promotion of layer %s (snapshot %s) failed: %s; the layer stays lazy, next attempt in %.0fs",
                        layer.layer_digest, sid, exc, self.config.promote_retry)
            self._retry_at[sid] = time.monotonic() + self.config.promote_retry
            return
        extracted = time.monotonic()
        self._detach(fs)
        try:
            mounttable.bind_readonly(str(local), str(fs))
        except mounttable.MountError as exc:  # new mounts name ``local`` anyway
            log.warning("could not bind %s at %s after the swap: %s", local, fs, exc)
        swapped = time.monotonic()
        with self._lock:
            self._disk[sid] = stats.peak_disk_bytes
            self._release[sid] = swapped + SWAP_GRACE
            self._retry_at.pop(sid, None)
        log.info("promoted layer %s (snapshot %s): %d files, %d dirs, %d bytes extracted in %.3fs "
                 "(%.3fs after the start), swap %.3fs, %d bytes on disk", layer.layer_digest, sid, stats.files,
                 stats.dirs, stats.bytes, stats.seconds, extracted - started, swapped - extracted,
                 stats.peak_disk_bytes)
        try:
            self.lazyd.layer_state(self.config.promote, [LayerReport(layer.layer_digest, "local",
                                                                     stats.peak_disk_bytes)])
        except ApiError as exc:
            log.debug("layer_state to lazyd: %s", exc)

    def _detach(self, fs: Path) -> None:
        """Lazily detach whatever is mounted at ``fs`` (overlays using it keep it alive)."""
        try:
            mounttable.unmount_all_at(str(fs))
        except mounttable.MountError as exc:
            log.warning("could not detach %s: %s", fs, exc)

    # -- release -----------------------------------------------------------------------

    def _release_unused(self) -> None:
        """Ask lazyd to unmount promoted layers no overlay uses any more (after ``SWAP_GRACE``)."""
        now = time.monotonic()
        with self._lock:
            due = {sid: self.layout.upper(sid) for sid, at in self._release.items() if at <= now}
        if not due:
            return
        used = overlay_users(due.values(), MOUNTINFO.read_text())
        for sid, fs in due.items():
            if fs in used:
                continue
            outcome = self.lazyd.release(fs)
            if outcome is None:
                continue  # lazyd is down: next pass
            self._detach(fs)  # the local bind (and a FUSE bind a restarted worker put back)
            with self._lock:
                self._release.pop(sid, None)
            log.log(logging.INFO if outcome == "released" else logging.DEBUG,
                    "released lazyd's mount of promoted snapshot %s (%s): no overlay uses it", sid, fs)

    def pending_release(self) -> set[int]:
        """Snapshot ids whose lazyd mount is not released yet."""
        with self._lock:
            return set(self._release)

    def cancel(self, sid: int) -> None:
        """Forget snapshot ``sid`` (being removed): stop its extraction and wait for that."""
        with self._lock:
            self._release.pop(sid, None)
            self._retry_at.pop(sid, None)
            self._disk.pop(sid, None)
            job = self._job
        if job is not None and job.sid == sid:
            job.cancelled.set()
            try:
                job.future.result(timeout=CANCEL_WAIT)
            except Exception as exc:  # noqa: BLE001 - the outcome is logged by the job
                log.debug("promotion of snapshot %s ended: %s", sid, exc)
