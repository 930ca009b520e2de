"""The worker's filesystem on pyfuse3 (libfuse 3, trio): ``LayerFS`` with READDIRPLUS and push.

``fuse_backend = "pyfuse3"`` (docs/config.md).  The answers are ``LayerFS``'s, under its lock;
what libfuse 3 adds:

* **READDIRPLUS**: a listing carries each entry's attributes, so the kernel makes the inodes
  and dentries and sends no LOOKUP for them (pyfuse3 always lists this way).
* **Push**: a listing notes the directory's small regular files.  At the first READ of a file
  of that directory, a pusher thread writes those of them whose chunks are all in the chunk
  store into the kernel's page cache (``FUSE_NOTIFY_STORE``; their inodes exist since the
  listing), so reading them needs no READ.  Pushes never fetch; files not wholly stored stay
  noted and are tried again at later READs of the directory, at most ``PUSH_TRIES`` times.
  The READ is answered first: the pusher runs beside it and never holds the lock, so a push
  that waits for a page another READ is filling cannot hold that READ up.

Requests run in trio's thread, under the lock.  A READ whose chunks are all in the reader's LRU
or (small) in the store is answered there too; any other runs in a worker thread
(``trio.to_thread``), holding the lock except while it waits, as llfuse's threads do.  A pyfuse3 whose ``read`` gets the inode
with no file handle (``contrib/pyfuse3``, version ``+lazyd.readino``) lets OPEN be refused
("no_open"), as with llfuse.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import signal
import stat
import threading
from collections.abc import Iterator
from typing import Any

import pyfuse3
import trio

from lazyd.cache.store import ChunkKey
from lazyd.fuse.fs import _LOCAL_MASK, _SLOT_SHIFT, ROOT_INODE, Layer, LayerFS
from lazyd.fuse.reader import ChunkReader

log = logging.getLogger(__name__)

READ_GETS_INODE = pyfuse3.__version__.endswith("+lazyd.readino")
# Files bigger than one FUSE read (128 KiB) are not pushed: their READs are few per byte.
PUSH_FILE_MAX = 128 * 1024
# Bytes one push writes at most (the rest of the directory waits for its next READ).
PUSH_BATCH_BYTES = 16 << 20
# Files noted per directory at most (a bigger listing notes its first ones).
PUSH_NOTED_MAX = 1 << 16
# How often a noted file that was not wholly stored is tried again.
PUSH_TRIES = 3
# Pushed inodes remembered, so that listing a directory again does not push them again
# (forgotten all at once when full: a second push is only wasted work).
PUSHED_MAX = 1 << 20
# Push jobs queued at most; a READ that finds the queue full pushes nothing.
_PUSH_QUEUE = 64
# Threads that run reads at once (each holds the lock only while it computes).
READ_THREADS = 8


class LazyFS3(LayerFS, pyfuse3.Operations):  # type: ignore[misc]
    """``LayerFS`` served by pyfuse3, with READDIRPLUS and push (module doc)."""

    def __init__(self, reader: ChunkReader, no_open: bool = READ_GETS_INODE, trace: bool = False,
                 xattrs: bool | None = True, push: bool = True) -> None:
        super().__init__(pyfuse3, threading.Lock(), reader, no_open, trace, xattrs)
        self.push = push
        # Directory inode -> noted files: (file inode, tries left).
        self._noted: dict[int, dict[int, int]] = {}
        self._pushed: set[int] = set()
        self._jobs: queue.Queue[tuple[Layer, int, dict[int, int]] | None] = queue.Queue(_PUSH_QUEUE)
        self._pusher: threading.Thread | None = None
        self._limiter: trio.CapacityLimiter | None = None

    @contextlib.contextmanager
    def unlocked(self) -> Iterator[None]:
        """What the reader enters while it waits: the lock released."""
        self.lock.release()
        try:
            yield
        finally:
            self.lock.acquire()

    # -- life cycle ---------------------------------------------------------------

    def mount(self, root: str, options: set[str]) -> None:
        pyfuse3.init(self, root, options)
        if self.push:
            self._pusher = threading.Thread(target=self._push_loop, name="pusher", daemon=True)
            self._pusher.start()

    def serve(self, threads: int) -> int | None:
        """Serve until unmounted (None) or SIGTERM, SIGINT or SIGHUP (its number)."""
        return trio.run(self._serve, threads)  # type: ignore[no-any-return]

    async def _serve(self, threads: int) -> int | None:
        self._limiter = trio.CapacityLimiter(max(threads, READ_THREADS))
        stopped: list[int] = []
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    async for signum in signals:
                        stopped.append(signum)
                        nursery.cancel_scope.cancel()
                        return

            async def requests() -> None:
                await pyfuse3.main(min_tasks=2, max_tasks=max(threads, READ_THREADS) * 2)
                nursery.cancel_scope.cancel()  # unmounted

            nursery.start_soon(on_signals)
            nursery.start_soon(requests)
        return stopped[0] if stopped else None

    def close(self) -> None:
        """Stop the pusher, end the FUSE session and unmount."""
        if self._pusher is not None:
            self._jobs.put(None)
            self._pusher.join(10)
            self._pusher = None
        pyfuse3.close(unmount=True)

    @property
    def binding(self) -> str:
        return f"pyfuse3 {pyfuse3.__version__}"

    def remove_layer(self, mount_id: str) -> Layer:
        layer = super().remove_layer(mount_id)
        slot = layer.slot
        for directory in [d for d in self._noted if d >> _SLOT_SHIFT == slot]:
            del self._noted[directory]
        self._pushed = {ino for ino in self._pushed if ino >> _SLOT_SHIFT != slot}
        return layer

    def _invalidate_entry(self, parent: int, name: bytes) -> None:
        # Queued to pyfuse3's notify thread: the caller holds the lock, which a request the
        # kernel holds the directory for may be waiting on.
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)

    # -- requests: LayerFS's answers under the lock ----------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        with self.lock:
            return LayerFS.lookup(self, parent_inode, name, ctx)

    async def getattr(self, inode: int, ctx: Any) -> Any:
        with self.lock:
            return LayerFS.getattr(self, inode, ctx)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        with self.lock:
            return LayerFS.readlink(self, inode, ctx)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        with self.lock:
            return LayerFS.getxattr(self, inode, name, ctx)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        with self.lock:
            return LayerFS.listxattr(self, inode, ctx)

    async def statfs(self, ctx: Any) -> Any:
        with self.lock:
            return LayerFS.statfs(self, ctx)

    async def opendir(self, inode: int, ctx: Any) -> int:
        with self.lock:
            return LayerFS.opendir(self, inode, ctx)

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        with self.lock:
            inode, entries = self._dir_handles[fh]
            listed: list[tuple[int, Any]] = []
            for name, attrs, next_id in LayerFS.readdir(self, fh, start_id):
                if not pyfuse3.readdir_reply(token, name, attrs, next_id):
                    break
                listed.append((attrs.st_ino, attrs))
            if self.push and inode != ROOT_INODE:
                self._note(inode, listed)

    async def releasedir(self, fh: int) -> None:
        with self.lock:
            LayerFS.releasedir(self, fh)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        with self.lock:
            fh = LayerFS.open(self, inode, flags, ctx)  # raises ENOSYS for no_open
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        data = self._read(fh, off, size, cached_only=True)  # a hit: answered here, no thread hop
        if data is None:
            data = await trio.to_thread.run_sync(self._read, fh, off, size, limiter=self._limiter)
        return data  # type: ignore[return-value]

    async def flush(self, fh: int) -> None:
        LayerFS.flush(self, fh)

    async def release(self, fh: int) -> None:
        return None

    async def _readonly(self, *args: object) -> None:  # type: ignore[override]
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _readonly  # type: ignore[assignment]
    create = write = setxattr = removexattr = _readonly  # type: ignore[assignment]

    # -- reads and pushes ---------------------------------------------------------------

    def _read(self, fh: int, off: int, size: int, cached_only: bool = False) -> bytes | memoryview | None:
        """One READ: ``LayerFS.read`` under the lock, then queue a push.  In a worker thread; in
        trio's with ``cached_only`` (None: it would wait)."""
        with self.lock:
            data = LayerFS.read(self, fh, off, size, cached_only)
            if data is None:
                return None
            job = None
            if self.push:
                self._remember_pushed([fh])  # in the page cache now: not to be pushed again
                job = self._take_noted(fh)
        if job is not None:
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                log.debug("push queue full: %d noted file(s) left to their READs", len(job[2]))
        return data

    def _remember_pushed(self, inodes: list[int]) -> None:
        """Note ``inodes`` as in the page cache (lock held)."""
        if len(self._pushed) + len(inodes) > PUSHED_MAX:
            self._pushed.clear()
        self._pushed.update(inodes)

    def _note(self, directory: int, listed: list[tuple[int, Any]]) -> None:
        """Note the small regular files of a listing of ``directory`` for a push (lock held)."""
        noted = self._noted.setdefault(directory, {})
        for ino, attrs in listed:
            if len(noted) >= PUSH_NOTED_MAX:
                break
            if stat.S_ISREG(attrs.st_mode) and 0 < attrs.st_size <= PUSH_FILE_MAX and ino not in self._pushed:
                noted.setdefault(ino, PUSH_TRIES)
        if not noted:
            del self._noted[directory]

    def _take_noted(self, inode: int) -> tuple[Layer, int, dict[int, int]] | None:
        """The noted files of the directory of file ``inode``, less ``inode`` itself (lock held)."""
        if not self._noted:
            return None
        layer, local = self._resolve(inode)
        base = inode & ~_LOCAL_MASK
        directory = base | layer.table.parent(local)
        noted = self._noted.pop(directory, None)
        if noted is None:
            return None
        noted.pop(inode, None)  # its READ fills its pages: a push of it would wait for that READ
        return (layer, directory, noted) if noted else None

    def _push_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._push(*job)
            except Exception:  # noqa: BLE001 - a push is an optimisation; READs still serve every byte
                log.exception("push of %d file(s) failed", len(job[2]))

    def _push(self, layer: Layer, directory: int, noted: dict[int, int]) -> None:
        """Write the wholly stored files of ``noted`` into the page cache; note the rest again."""
        table = layer.table
        files: list[tuple[int, list[Any], int]] = []  # (inode, chunk refs, size)
        budget = PUSH_BATCH_BYTES
        later: dict[int, int] = {}
        for ino, tries in noted.items():
            local = ino & _LOCAL_MASK
            size = table.raw_attr(local)[4]
            if size > budget:
                later[ino] = tries
                continue
            budget -= size
            files.append((ino, table.chunks(local, 0, size), tries))
        keys = [ChunkKey(layer.layer_digest, r.blob_offset, r.inner_offset) for _, refs, _ in files for r in refs]
        stored = self.reader.store.peek_many(keys)
        pushed: list[int] = []
        pushed_bytes = 0
        for ino, refs, tries in files:
            parts = []
            for r in refs:
                data = stored.get(ChunkKey(layer.layer_digest, r.blob_offset, r.inner_offset))
                if data is None or len(data) != r.size:
                    break
                parts.append(data)
            else:
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                try:
                    pyfuse3.notify_store(ino, 0, body)
                except OSError as exc:  # the kernel forgot the inode (unmounted, or memory pressure)
                    log.debug("push of inode %d: %s", ino, exc)
                    continue
                pushed.append(ino)
                pushed_bytes += len(body)
                continue
            if tries > 1:
                later[ino] = tries - 1
        with self.lock:
            layer.counters.pushed_files += len(pushed)
            layer.counters.pushed_bytes += pushed_bytes
            self._remember_pushed(pushed)
            if later and self._layers.get(layer.slot) is layer:  # still mounted
                self._noted.setdefault(directory, {}).update(later)
