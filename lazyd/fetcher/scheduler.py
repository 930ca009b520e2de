"""Chunk scheduler: dedupe, coalescing, priorities, verification and storing.

``Scheduler.fetch(layer, members, priority)`` returns once every member's
chunks are verified and in the ChunkStore.  A member already being fetched (by
any request, of any priority) is awaited, not fetched again, so concurrent
overlapping requests cause one registry request.  Missing members adjacent in
the blob are merged into one range, and all ranges of one call go out as one
multi-range request.  Registry requests pass a priority gate (demand, then
prefetch, then background); background work also waits while any demand fetch
is active.
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
        self._demand = 0
        self.demand_idle = asyncio.Event()
        self.demand_idle.set()
        self.last_demand = asyncio.get_running_loop().time()  # end of the latest demand fetch
        self.fetch_requests = 0
        self.verify_errors = 0

    async def wait_quiet(self, quiet: float) -> None:
        """Return once no demand fetch is running and none has ended for ``quiet`` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            await self.demand_idle.wait()
            remaining = self.last_demand + quiet - loop.time()
            if remaining <= 0 and self.demand_idle.is_set():
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
        wanted = {m.blob_offset: m for m in members}
        todo = await asyncio.to_thread(self.missing, layer, wanted.values())
        if not todo:
            return
        if priority == "demand":
            self._demand += 1
            self.demand_idle.clear()
        try:
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
            if priority == "demand":
                self._demand -= 1
                self.last_demand = asyncio.get_running_loop().time()
                if self._demand == 0:
                    self.demand_idle.set()

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
        """One (multi-)range request for ``mine``; verify and store; settle their futures."""
        runs = coalesce(mine, limit)
        ranges = [(run[0].blob_offset, run[-1].blob_end - run[0].blob_offset) for run in runs]
        counters = layer.counters
        bad: dict[int, ApiError] = {}
        try:
            counters.in_flight += 1
            try:
                parts = await self.client.fetch_ranges(layer.ref, layer.digest, ranges)
            except RegistryError as exc:
                raise registry_error(exc) from None
            finally:
                counters.in_flight -= 1
                counters.registry_requests += 1
            counters.add_bytes(priority, sum(len(p) for p in parts))
            bad = await asyncio.to_thread(self._store, layer, runs, parts)
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
