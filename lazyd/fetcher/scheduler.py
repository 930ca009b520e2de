"""Chunk scheduler: dedupe, coalescing, priorities, verification and storing.

``Scheduler.fetch(layer, members, priority)`` returns once every member's
chunks are verified and in the ChunkStore.  A member already being fetched (by
any request, of any priority) is awaited, not fetched again, so concurrent
overlapping requests cause one registry request.  Missing members adjacent in
the blob are merged into one range, and all ranges of one call go out as one
multi-range request; a single range is streamed, so each member is stored and
its waiters released as soon as its bytes are in.  Registry requests pass a
priority gate (demand, then prefetch, then background); background work also
waits until no demand or prefetch fetch has run, and no mount has started, for
``background_delay`` seconds (``wait_quiet``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Iterable

from lazyd.api.messages import DIGEST_MISMATCH, FETCH_FAILED, ApiError
from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.estargz import EStargzError, decode_chunk
from lazyd.fetcher.layers import Layer, Member, registry_error
from lazyd.registry import RegistryClient, RegistryError

log = logging.getLogger(__name__)

PRIORITY_RANK = {"demand": 0, "prefetch": 1, "background": 2}


class PriorityGate:
    """At most ``limit`` holders; waiters are admitted lowest rank first, FIFO within a rank."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, rank: int) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)  # the slot passes to the waiter
                return
        self.active -= 1


def coalesce(members: Iterable[Member], max_size: int | None) -> list[list[Member]]:
    """Group members (sorted by offset) into runs that are adjacent in the blob."""
    runs: list[list[Member]] = []
    for m in sorted(members, key=lambda m: m.blob_offset):
        if runs:
            run = runs[-1]
            adjacent = run[-1].blob_end == m.blob_offset
            fits = max_size is None or m.blob_end - run[0].blob_offset <= max_size
            if adjacent and fits:
                run.append(m)
                continue
        runs.append([m])
    return runs


class Scheduler:
    """Fetches members of layers into the chunk store; see the module docstring."""

    def __init__(self, client: RegistryClient, store: ChunkStore, max_concurrent: int, max_range_size: int) -> None:
        self.client = client
        self.store = store
        self.max_range_size = max_range_size
        self.gate = PriorityGate(max_concurrent)
        self._inflight: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._foreground = 0  # demand and prefetch fetches running
        self.foreground_idle = asyncio.Event()
        self.foreground_idle.set()
        self.last_activity = asyncio.get_running_loop().time()  # see note_activity()
        self.fetch_requests = 0
        self.verify_errors = 0

    def note_activity(self) -> None:
        """Record foreground activity now (a mount, a demand or prefetch fetch starting or ending)."""
        self.last_activity = asyncio.get_running_loop().time()

    async def wait_quiet(self, quiet: float) -> None:
        """Return once no demand or prefetch fetch is running and there has been no foreground
        activity for ``quiet`` seconds: background fetch never competes with a starting container."""
        loop = asyncio.get_running_loop()
        while True:
            await self.foreground_idle.wait()
            remaining = self.last_activity + quiet - loop.time()
            if remaining <= 0 and self.foreground_idle.is_set():
                return
            await asyncio.sleep(max(remaining, 0.01))

    def is_stored(self, layer: Layer, member: Member) -> bool:
        return all(self.store.has(ChunkKey(layer.digest, c.blob_offset, c.inner_offset)) for c in member.chunks)

    def missing(self, layer: Layer, members: Iterable[Member]) -> list[Member]:
        return [m for m in members if not self.is_stored(layer, m)]

    async def fetch(self, layer: Layer, members: Iterable[Member], priority: str, max_range: int | None = -1) -> None:
        """Make every member's chunks present and verified in the store."""
        rank = PRIORITY_RANK[priority]
        limit = self.max_range_size if max_range == -1 else max_range
        self.fetch_requests += 1
        foreground = priority != "background"
        if foreground:
            self._foreground += 1
            self.foreground_idle.clear()
            self.note_activity()
        try:
            wanted = {m.blob_offset: m for m in members}
            todo = await asyncio.to_thread(self.missing, layer, wanted.values())
            if not todo:
                return
            if priority == "demand":
                mine, others = self._claim(layer, todo)
                if mine:
                    await self._run(layer, mine, priority, rank, limit)
            else:
                await self.gate.acquire(rank)
                try:
                    mine, others = self._claim(layer, todo)
                    if mine:
                        await self._download(layer, mine, priority, limit)
                finally:
                    self.gate.release()
            if others:
                await asyncio.gather(*others)
        finally:
            if foreground:
                self._foreground -= 1
                self.note_activity()
                if self._foreground == 0:
                    self.foreground_idle.set()

    def _claim(self, layer: Layer, todo: list[Member]) -> tuple[list[Member], list[asyncio.Future[None]]]:
        """Split into members this call fetches (futures registered) and in-flight ones to await."""
        mine: list[Member] = []
        others: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for m in todo:
            key = (layer.digest, m.blob_offset)
            fut = self._inflight.get(key)
            if fut is not None:
                others.append(fut)
            elif self.is_stored(layer, m):
                # Stored by a request that settled after our ``missing`` check ran in a thread.
                continue
            else:
                fut = loop.create_future()
                fut.add_done_callback(_consume)
                self._inflight[key] = fut
                mine.append(m)
        return mine, others

    async def _run(self, layer: Layer, mine: list[Member], priority: str, rank: int, limit: int | None) -> None:
        try:
            await self.gate.acquire(rank)
        except BaseException as exc:
            self._settle(layer, mine, exc if isinstance(exc, Exception) else ApiError(FETCH_FAILED, "cancelled"))
            raise
        try:
            await self._download(layer, mine, priority, limit)
        finally:
            self.gate.release()

    def _settle(self, layer: Layer, members: list[Member], error: BaseException | None) -> None:
        for m in members:
            fut = self._inflight.pop((layer.digest, m.blob_offset), None)
            if fut is not None and not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    async def _download(self, layer: Layer, mine: list[Member], priority: str, limit: int | None) -> None:
        """One (multi-)range request for ``mine``; verify and store; settle their futures.

        A single range is streamed: each member is stored and its waiters released as soon
        as its bytes are in, so a read of the first file of a long prefetch need not wait for
        the last one.
        """
        runs = coalesce(mine, limit)
        ranges = [(run[0].blob_offset, run[-1].blob_end - run[0].blob_offset) for run in runs]
        counters = layer.counters
        bad: dict[int, ApiError] = {}
        try:
            counters.in_flight += 1
            try:
                if len(runs) == 1:
                    bad = await self._stream(layer, runs[0], priority)
                else:
                    parts = await self.client.fetch_ranges(layer.ref, layer.digest, ranges)
                    counters.add_bytes(priority, sum(len(p) for p in parts))
                    bad = await asyncio.to_thread(self._store, layer, runs, parts)
            except RegistryError as exc:
                raise registry_error(exc) from None
            finally:
                counters.in_flight -= 1
                counters.registry_requests += 1
        except ApiError as exc:
            counters.last_error = exc.message
            log.warning("fetching %d range(s) of layer %s failed: %s", len(ranges), layer.digest, exc)
            self._settle(layer, mine, exc)
            raise
        except BaseException as exc:
            self._settle(layer, mine, exc if isinstance(exc, Exception) else ApiError(FETCH_FAILED, "cancelled"))
            raise
        for m in mine:
            self._settle(layer, [m], bad.get(m.blob_offset))
        if bad:
            first = next(iter(bad.values()))
            counters.last_error = first.message
            log.warning("%s", first.message)
            raise first

    async def _stream(self, layer: Layer, run: list[Member], priority: str) -> dict[int, ApiError]:
        """Stream one run of adjacent members; store and settle each as soon as it is complete."""
        bad: dict[int, ApiError] = {}
        ready: asyncio.Queue[tuple[list[Member], bytes] | None] = asyncio.Queue()
        buf = bytearray()
        buf_start = run[0].blob_offset
        next_member = 0

        async def sink(_pos: int, data: bytes) -> None:
            nonlocal buf_start, next_member
            buf.extend(data)
            first = next_member
            while next_member < len(run) and run[next_member].blob_end <= buf_start + len(buf):
                next_member += 1
            if next_member > first:
                cut = run[next_member - 1].blob_end - buf_start
                ready.put_nowait((run[first:next_member], bytes(buf[:cut])))
                del buf[:cut]
                buf_start += cut
                layer.counters.add_bytes(priority, cut)

        async def store_ready() -> None:
            while (item := await ready.get()) is not None:
                members, data = item
                failed = await asyncio.to_thread(self._store, layer, [members], [data])
                bad.update(failed)
                for m in members:
                    self._settle(layer, [m], failed.get(m.blob_offset))

        consumer = asyncio.create_task(store_ready())
        try:
            await self.client.stream_range(layer.ref, layer.digest, run[0].blob_offset,
                                           run[-1].blob_end - run[0].blob_offset, sink)
        finally:
            ready.put_nowait(None)
            await asyncio.shield(consumer)
        return bad

    def _store(self, layer: Layer, runs: list[list[Member]], parts: list[bytes]) -> dict[int, ApiError]:
        """Decode, verify and store every chunk; returns the members (by offset) that failed."""
        bad: dict[int, ApiError] = {}
        for run, data in zip(runs, parts):
            base = run[0].blob_offset
            view = memoryview(data)
            for m in run:
                compressed = view[m.blob_offset - base : m.blob_end - base]
                for chunk in m.chunks:
                    try:
                        plain = decode_chunk(chunk, compressed)
                    except EStargzError as exc:
                        self.verify_errors += 1
                        layer.counters.verify_errors += 1
                        bad.setdefault(m.blob_offset, ApiError(DIGEST_MISMATCH, f"layer {layer.digest}: {exc}"))
                        continue
                    self.store.put(ChunkKey(layer.digest, chunk.blob_offset, chunk.inner_offset), plain)
        return bad


def _consume(fut: asyncio.Future[None]) -> None:
    """Mark a member future's exception as retrieved (it may have no other waiter)."""
    if not fut.cancelled():
        fut.exception()
