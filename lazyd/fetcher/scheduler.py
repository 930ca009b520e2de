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
``background_delay`` seconds (``wait_quiet``) -- except that once foreground activity
has gone on without such a pause for ``background_share_after`` seconds, up to
``background_share`` background requests may be in flight anyway, so a long scan of a
big layer cannot starve the background fetch.

Neighbour window: a demand fetch also fetches its neighbours in the blob (not stored,
not in flight, adjacent without a gap): up to a quarter of a window of compressed bytes
before the demanded members and the rest after them, in the same streamed range request.  The demanded read returns as soon
as its own members are stored; neighbours are verified and stored like any member, and
one that fails only fails itself (a read that was waiting for it fetches it again).  The
window starts at ``window_min`` per layer and doubles up to ``window_max`` while demand
misses land within ``window_max / 2`` of one of the layer's last ``RECENT_RANGES`` demand
ranges (misses that cluster: a sequential scan, or imports from one package directory);
a miss elsewhere starts again at ``window_min``.  Scattered misses (a program's shared
libraries across a base layer) so fetch little besides what was asked, clustered ones few
large requests (measured: docs/design.md, "Small-file read path").

Memory: store queries, chunk decoding and verification run on ``STORE_THREADS`` threads of
the scheduler's own (``in_store_thread``), each with one SQLite connection of bounded cache
and no memory map; a demand fetch queries the store on the event loop (one query, cheaper
than a thread hop).  Nothing is kept per member once it is stored, and when no fetch has run
for ``TRIM_AFTER`` seconds the free pages of the C heap go back to the system.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import ctypes.util
import functools
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from lazyd.api.messages import DIGEST_MISMATCH, FETCH_FAILED, ApiError
from lazyd.cache.store import ChunkKey, ChunkStore
from lazyd.estargz import EStargzError, decode_chunk
from lazyd.fetcher.layers import Layer, Member, registry_error
from lazyd.metrics import Metrics
from lazyd.registry import RegistryClient, RegistryError

log = logging.getLogger(__name__)

PRIORITY_RANK = {"demand": 0, "prefetch": 1, "background": 2}
_INLINE_STORE = 64 * 1024
"""A demanded member up to this many compressed bytes is verified and stored on the event loop."""
_BACK_FRACTION = 4
"""A demand fetch's window reaches back 1/_BACK_FRACTION of itself before the demanded member."""
_RANGE_SPREAD = 4
"""``missing`` asks the store by key range when the layer has at most this many members per
member asked about in their span, else key by key."""
RECENT_RANGES = 4
"""Demand ranges per layer that a miss is compared with to decide whether misses cluster."""
STORE_THREADS = 2
"""Threads that decode, verify and store chunks and query the store (see ``in_store_thread``):
two, so a demand member's store need not wait behind a background batch's."""
TRIM_AFTER = 1.0
"""Seconds without any fetch after which the scheduler returns free heap pages (``_trim_heap``)."""
_T = TypeVar("_T")


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


@dataclass
class Trace:
    """Timestamps (event-loop clock) of one demand fetch, for the per-hop debug log."""

    start: float
    planned: float = 0.0
    gated: float = 0.0
    first_byte: float = 0.0
    stored: float = 0.0


class Scheduler:
    """Fetches members of layers into the chunk store; see the module docstring."""

    def __init__(self, client: RegistryClient, store: ChunkStore, max_concurrent: int, max_range_size: int, *,
                 window_min: int = 0, window_max: int = 0, background_share: int = 0,
                 quiet: float = 2.0, share_after: float = 10.0, metrics: Metrics | None = None) -> None:
        self.client = client
        self.metrics = metrics if metrics is not None else Metrics()
        self.store = store
        self.max_range_size = max_range_size
        self.gate = PriorityGate(max_concurrent)
        self.window_min = window_min
        self.window_max = max(window_max, window_min)
        self.background_share = background_share
        self.quiet = quiet
        self.share_after = share_after
        self._inflight: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._neighbours: set[tuple[str, int]] = set()  # in-flight members claimed as neighbours
        # layer -> (its last RECENT_RANGES demand ranges (start, end), the window of the last one)
        self._windows: dict[str, tuple[deque[tuple[int, int]], int]] = {}
        self._downloads: set[asyncio.Task[None]] = set()
        self._trim: asyncio.TimerHandle | None = None
        self.heap_trims = 0
        self._store_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="lazyd-store")
        self._foreground = 0  # demand and prefetch fetches running
        self._background = 0  # background fetches running
        self.foreground_idle = asyncio.Event()
        self.foreground_idle.set()
        now = asyncio.get_running_loop().time()
        self.last_activity = now  # see note_activity()
        self.busy_since = now  # start of the current stretch of foreground activity
        self.fetch_requests = 0
        self.verify_errors = 0
        self.neighbour_members = 0  # members fetched as neighbours of a demand fetch
        self.neighbour_errors = 0
        self.background_shared = 0  # background fetches admitted during sustained foreground activity

    def note_activity(self, idle_before: bool | None = None) -> None:
        """Record foreground activity now (a mount, a demand or prefetch fetch starting or ending).

        ``idle_before``: no foreground fetch ran just before this (default: none is running);
        a pause of at least ``quiet`` seconds then starts a new stretch of activity.
        """
        now = asyncio.get_running_loop().time()
        if idle_before is None:
            idle_before = self._foreground == 0
        if idle_before and now - self.last_activity >= self.quiet:
            self.busy_since = now
        self.last_activity = now

    async def wait_quiet(self, quiet: float) -> None:
        """Return once no demand or prefetch fetch is running and there has been no foreground
        activity for ``quiet`` seconds: background fetch does not compete with a starting container.

        Under foreground activity that has gone on without such a pause for ``share_after``
        seconds, return as soon as fewer than ``background_share`` background fetches are
        running: the background fetch keeps a share of the link during a long scan.
        """
        loop = asyncio.get_running_loop()
        while True:
            if self.background_share <= 0:
                await self.foreground_idle.wait()
            now = loop.time()
            remaining = self.last_activity + quiet - now
            if remaining <= 0 and self.foreground_idle.is_set():
                return
            if self.background_share > 0:
                starved = now - self.busy_since >= self.share_after
                if starved and self._background < self.background_share:
                    self.background_shared += 1
                    log.debug("background request admitted under %.1fs of sustained foreground activity",
                              now - self.busy_since)
                    return
                remaining = min(remaining, 0.05) if starved else min(remaining,
                                                                     self.busy_since + self.share_after - now)
            await asyncio.sleep(max(remaining, 0.01))

    def missing(self, layer: Layer, members: Iterable[Member]) -> list[Member]:
        """The members not wholly in the store; blocking: coroutines run it with ``in_store_thread``.

        Members close together in the blob (a demand window, a background batch) take one range
        query of the store's keys, whose cost follows what is stored there, not how many members
        are asked about (the plan of a cold 5,000-member demand window: 36 ms by key, 24 ms by
        range, the rest Python).  Members spread over the layer take one query per 500 chunks.
        """
        members = list(members)
        if not members:
            return []
        lo = min(m.blob_offset for m in members)
        hi = max(m.blob_end for m in members)
        offsets = layer.index.m_off
        if bisect.bisect_left(offsets, hi) - bisect.bisect_left(offsets, lo) <= _RANGE_SPREAD * len(members):
            have = self.store.stored_between(layer.digest, lo, hi)
            if not have:
                return members
            return [m for m in members
                    if not all((m.blob_offset, inner) in have for inner in m.inner_offsets())]
        keys = {m.blob_offset: m.chunk_keys(layer.digest) for m in members}
        have = self.store.stored([k for ks in keys.values() for k in ks])
        return [m for m in members if not all(k in have for k in keys[m.blob_offset])]

    async def in_store_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on one of the scheduler's ``STORE_THREADS`` store threads.

        Every thread that touches the store gets its own SQLite connection (bounded by
        ``ChunkStore``: a 4 MiB page cache, no memory map), so a few long-lived threads keep
        the fetcher's memory bounded; store work on the default executor's threads made it
        grow by hundreds of MB during background fetch (bench/bench_memory.py).
        """
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, functools.partial(fn, *args))

    def _trim_heap(self) -> None:
        """Give the C heap's free pages back to the system once no fetch has run for
        ``TRIM_AFTER`` seconds: chunks are decoded in several threads, each with its own
        malloc arena, and glibc keeps what they freed (measured: half of the fetcher's growth
        over a background fetch of 50 layers)."""
        self._trim = None
        if self._foreground or self._background:
            return
        started = time.perf_counter()
        if _malloc_trim():
            self.heap_trims += 1
            log.debug("returned free heap pages to the system in %.1f ms", 1e3 * (time.perf_counter() - started))

    def forget(self, digest: str) -> None:
        """Drop what the scheduler remembers of a layer (its neighbour window)."""
        self._windows.pop(digest, None)

    def close(self) -> None:
        """Stop the store threads once their work is done."""
        self._store_pool.shutdown(wait=False)
        if self._trim is not None:
            self._trim.cancel()

    async def fetch(self, layer: Layer, members: Iterable[Member], priority: str, max_range: int | None = -1) -> None:
        """Make every member's chunks present and verified in the store."""
        rank = PRIORITY_RANK[priority]
        limit = self.max_range_size if max_range == -1 else max_range
        self.fetch_requests += 1
        foreground = priority != "background"
        if foreground:
            idle_before = self._foreground == 0
            self._foreground += 1
            self.foreground_idle.clear()
            self.note_activity(idle_before)
        else:
            self._background += 1
        try:
            wanted = {m.blob_offset: m for m in members}
            if priority == "demand":
                await self._demand(layer, list(wanted.values()), rank, limit)
                return
            todo = await self.in_store_thread(self.missing, layer, list(wanted.values()))
            if not todo:
                return
            await self.gate.acquire(rank)
            try:
                mine, others = await self._claim_missing(layer, todo)
                self._note_dedupe(others, mine)
                if mine:
                    await self._download(layer, mine, priority, limit)
            finally:
                self.gate.release()
            await self._await_others(layer, others, priority)
        finally:
            if foreground:
                self._foreground -= 1
                self.note_activity(False)
                if self._foreground == 0:
                    self.foreground_idle.set()
            else:
                self._background -= 1
            if self._foreground == 0 and self._background == 0 and self._trim is None:
                self._trim = asyncio.get_running_loop().call_later(TRIM_AFTER, self._trim_heap)

    async def _demand(self, layer: Layer, wanted: list[Member], rank: int, limit: int | None) -> None:
        """A demand fetch: the wanted members plus a window of neighbours in one streamed range;
        returns once the wanted members are stored."""
        loop = asyncio.get_running_loop()
        trace = Trace(loop.time())
        window = self._window(layer, min(m.blob_offset for m in wanted)) if wanted and self.window_max > 0 else 0
        # One store query for the wanted members and their candidate neighbours: cheaper inline
        # than a hop to a thread.
        todo, extra = self._plan(layer, wanted, window)
        trace.planned = loop.time()
        if not todo:
            return
        mine, others = self._claim(layer, todo)
        self._note_dedupe(others, mine)
        extra = self._claim_neighbours(layer, mine, extra)
        if mine:
            run = sorted(mine + extra, key=_offset)
            recent = self._windows.get(layer.digest)
            ranges = recent[0] if recent is not None else deque(maxlen=RECENT_RANGES)
            ranges.append((run[0].blob_offset, run[-1].blob_end))
            self._windows[layer.digest] = (ranges, window)
            futs = [self._inflight[(layer.digest, m.blob_offset)] for m in mine]
            task = asyncio.ensure_future(self._run(layer, run, "demand", rank, limit, trace))
            self._downloads.add(task)
            task.add_done_callback(self._download_done)
            await asyncio.gather(*futs)
            trace.stored = loop.time()
            trace.first_byte = trace.first_byte or trace.gated  # a multi-range request is not streamed
            log.debug("demand fetch of layer %s at %d: %d member(s) + %d neighbour(s), %d bytes: plan %.1f ms, "
                      "gate %.1f ms, first byte %.1f ms, stored %.1f ms", layer.digest, mine[0].blob_offset, len(mine),
                      len(extra), run[-1].blob_end - run[0].blob_offset,
                      1e3 * (trace.planned - trace.start), 1e3 * (trace.gated - trace.planned),
                      1e3 * (trace.first_byte - trace.gated), 1e3 * (trace.stored - trace.first_byte))
        await self._await_others(layer, others, "demand")

    def _note_dedupe(self, others: list[tuple[Member, asyncio.Future[None], bool]], mine: list[Member]) -> None:
        """Count the members a fetch takes from requests already in flight (``lazyd_dedupe_*``)."""
        if others:
            self.metrics.deduped(sum(m.size for m, _, _ in others), whole=not mine)

    async def drain(self) -> None:
        """Wait until the demand downloads running now (and their neighbours) have ended."""
        while self._downloads:
            await asyncio.gather(*list(self._downloads), return_exceptions=True)

    def _window(self, layer: Layer, start: int) -> int:
        """The neighbour window of a demand fetch starting at ``start``: twice the last one (up to
        ``window_max``) when ``start`` is within ``window_max / 2`` of one of the layer's recent
        demand ranges (misses cluster), else ``window_min``."""
        recent = self._windows.get(layer.digest)
        if recent is None:
            return self.window_min
        ranges, window = recent
        reach = self.window_max // 2
        if any(lo - reach <= start <= hi + reach for lo, hi in ranges):
            return min(max(window, self.window_min) * 2, self.window_max)
        return self.window_min

    def _plan(self, layer: Layer, wanted: list[Member], window: int) -> tuple[list[Member], list[Member]]:
        """(missing wanted members, neighbours to fetch with them).

        Neighbours adjoin the wanted members without a gap, are neither stored nor in flight,
        and the whole run spans at most ``window`` bytes, at most a quarter of it before the
        wanted members.
        """
        before: list[Member] = []  # nearest first
        after: list[Member] = []
        if window > 0 and wanted:
            ordered = sorted(wanted, key=_offset)
            start, end = ordered[0].blob_offset, ordered[-1].blob_end
            members = layer.members
            offsets = layer.index.m_off
            lo = start - window // _BACK_FRACTION
            i = bisect.bisect_left(offsets, start) - 1
            while i >= 0 and members[i].blob_end == start and members[i].blob_offset >= lo:
                if (layer.digest, members[i].blob_offset) in self._inflight:
                    break
                before.append(members[i])
                start = members[i].blob_offset
                i -= 1
            i = bisect.bisect_left(offsets, end)
            while i < len(members) and members[i].blob_offset == end and members[i].blob_end - start <= window:
                if (layer.digest, members[i].blob_offset) in self._inflight:
                    break
                after.append(members[i])
                end = members[i].blob_end
                i += 1
        absent = {m.blob_offset for m in self.missing(layer, [*wanted, *before, *after])}
        todo = sorted((m for m in wanted if m.blob_offset in absent), key=_offset)
        if not todo or len(coalesce(todo, None)) != 1:
            return todo, []
        extra: list[Member] = []
        for m in before:
            if m.blob_offset not in absent or m.blob_end > todo[0].blob_offset:
                break
            extra.append(m)
        extra.reverse()
        for m in after:
            if m.blob_offset not in absent or m.blob_offset < todo[-1].blob_end:
                break
            extra.append(m)
        return todo, extra

    def _claim_neighbours(self, layer: Layer, mine: list[Member], extra: list[Member]) -> list[Member]:
        """Register futures for the neighbours that, with ``mine``, still make one run of
        adjacent members not in flight; returns them in blob order."""
        if not mine or not extra or len(coalesce(mine, None)) != 1:
            return []
        first, last = mine[0].blob_offset, mine[-1].blob_end
        before = [m for m in extra if m.blob_end <= first]
        after = [m for m in extra if m.blob_offset >= last]
        keep_before: list[Member] = []
        edge = first
        for m in reversed(before):
            if m.blob_end != edge or (layer.digest, m.blob_offset) in self._inflight:
                break
            keep_before.append(m)
            edge = m.blob_offset
        keep_after: list[Member] = []
        edge = last
        for m in after:
            if m.blob_offset != edge or (layer.digest, m.blob_offset) in self._inflight:
                break
            keep_after.append(m)
            edge = m.blob_end
        claimed = [*reversed(keep_before), *keep_after]
        loop = asyncio.get_running_loop()
        for m in claimed:
            key = (layer.digest, m.blob_offset)
            fut = loop.create_future()
            fut.add_done_callback(_consume)
            self._inflight[key] = fut
            self._neighbours.add(key)
        self.neighbour_members += len(claimed)
        return claimed

    def _download_done(self, task: asyncio.Task[None]) -> None:
        """A demand download ended; its errors already reached the waiters of its members."""
        self._downloads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("demand download ended with %s", task.exception())

    async def _await_others(self, layer: Layer, others: list[tuple[Member, asyncio.Future[None], bool]],
                            priority: str) -> None:
        """Wait for members other requests are fetching; a neighbour that failed is fetched again."""
        if not others:
            return
        results = await asyncio.gather(*(f for _, f, _ in others), return_exceptions=True)
        retry: list[Member] = []
        for (m, _, neighbour), result in zip(others, results):
            if isinstance(result, BaseException):
                if not neighbour:
                    raise result
                self.neighbour_errors += 1
                retry.append(m)
        if retry:
            mine, again = await self._claim_missing(layer, retry)
            if mine:
                await self._run(layer, mine, priority, PRIORITY_RANK[priority], self.max_range_size)
            for _, fut, _ in again:
                await fut

    def _claim(self, layer: Layer, todo: list[Member]
               ) -> tuple[list[Member], list[tuple[Member, asyncio.Future[None], bool]]]:
        """Split into members this call fetches (futures registered) and in-flight ones to await
        (with whether another demand fetch claimed them as neighbours).  The caller knows
        ``todo`` is not stored: no await since its store query (``_claim_missing`` otherwise)."""
        mine: list[Member] = []
        others: list[tuple[Member, asyncio.Future[None], bool]] = []
        loop = asyncio.get_running_loop()
        for m in todo:
            key = (layer.digest, m.blob_offset)
            fut = self._inflight.get(key)
            if fut is not None:
                others.append((m, fut, key in self._neighbours))
            else:
                fut = loop.create_future()
                fut.add_done_callback(_consume)
                self._inflight[key] = fut
                mine.append(m)
        return mine, others

    async def _claim_missing(self, layer: Layer, todo: list[Member]
                             ) -> tuple[list[Member], list[tuple[Member, asyncio.Future[None], bool]]]:
        """``_claim``, then drop (and settle) the claimed members that a request which ended
        since ``todo`` was computed has stored: the store query runs on a store thread, the
        claim before it, so no other request can claim them meanwhile."""
        mine, others = self._claim(layer, todo)
        if mine:
            try:
                absent = {m.blob_offset for m in await self.in_store_thread(self.missing, layer, mine)}
            except BaseException as exc:
                self._settle(layer, mine, exc if isinstance(exc, Exception) else ApiError(FETCH_FAILED, "cancelled"))
                raise
            self._settle(layer, [m for m in mine if m.blob_offset not in absent], None)
            mine = [m for m in mine if m.blob_offset in absent]
        return mine, others

    async def _run(self, layer: Layer, mine: list[Member], priority: str, rank: int, limit: int | None,
                   trace: Trace | None = None) -> None:
        try:
            await self.gate.acquire(rank)
        except BaseException as exc:
            self._settle(layer, mine, exc if isinstance(exc, Exception) else ApiError(FETCH_FAILED, "cancelled"))
            raise
        if trace is not None:
            trace.gated = asyncio.get_running_loop().time()
        try:
            await self._download(layer, mine, priority, limit, trace)
        finally:
            self.gate.release()

    def _settle(self, layer: Layer, members: list[Member], error: BaseException | None) -> None:
        for m in members:
            self._neighbours.discard((layer.digest, m.blob_offset))
            fut = self._inflight.pop((layer.digest, m.blob_offset), None)
            if fut is not None and not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    async def _download(self, layer: Layer, mine: list[Member], priority: str, limit: int | None,
                        trace: Trace | None = None) -> None:
        """One (multi-)range request for ``mine``; verify and store; settle their futures.

        The answer is streamed (one range or several): each member is stored and its waiters
        released as soon as its bytes are in, so a read of the first file of a long prefetch
        need not wait for the last one.
        """
        runs = coalesce(mine, limit)
        ranges = [(run[0].blob_offset, run[-1].blob_end - run[0].blob_offset) for run in runs]
        counters = layer.counters
        bad: dict[int, ApiError] = {}
        # The stream settles (and unregisters) each member once stored; one evicted since may be
        # registered again by another request, whose future is not this download's to settle.
        owned = {m.blob_offset: self._inflight.get((layer.digest, m.blob_offset)) for m in mine}

        def unsettled() -> list[Member]:
            return [m for m in mine if self._inflight.get((layer.digest, m.blob_offset)) is owned[m.blob_offset]]

        try:
            # Counted as sent, not as done: a reader released by the stream's last member may
            # look at the counters before the stream's bookkeeping has finished.
            counters.in_flight += 1
            counters.registry_requests += 1
            self.metrics.fetch_request(priority, layer.digest)
            try:
                urgent: list[tuple[int, int]] | None = None
                if trace is not None:
                    urgent = []
                    for run in runs:
                        own = [i for i, m in enumerate(run) if (layer.digest, m.blob_offset) not in self._neighbours]
                        urgent.append((own[0], own[-1] + 1) if own else (0, 0))
                bad = await self._stream(layer, runs, priority, trace, urgent)
            except RegistryError as exc:
                raise registry_error(exc) from None
            finally:
                counters.in_flight -= 1
            if bad:
                self.metrics.registry_errors["digest"] += 1
            bad = await self._refetch_bad(layer, mine, priority, bad)
        except ApiError as exc:
            counters.last_error = exc.message
            log.warning("fetching %d range(s) of layer %s failed: %s", len(ranges), layer.digest, exc,
                        extra={"event": "registry_error", "layer": layer.digest, "code": exc.code,
                               "priority": priority})
            self._settle(layer, unsettled(), exc)
            raise
        except BaseException as exc:
            self._settle(layer, unsettled(), exc if isinstance(exc, Exception) else ApiError(FETCH_FAILED, "cancelled"))
            raise
        for m in unsettled():
            self._settle(layer, [m], bad.get(m.blob_offset))
        if bad:
            first = next(iter(bad.values()))
            counters.last_error = first.message
            log.warning("%s", first.message)
            raise first

    async def _refetch_bad(self, layer: Layer, mine: list[Member], priority: str,
                           bad: dict[int, ApiError]) -> dict[int, ApiError]:
        """Fetch the members that failed verification again, ``retries`` times with the registry
        client's backoff (a corrupted answer is a transient fault like a cut body); their futures
        are still this download's.  Returns the members that failed every time."""
        config = self.client.config
        counters = layer.counters
        for attempt in range(config.retries):
            again = [m for m in mine if m.blob_offset in bad]
            if not again:
                break
            log.warning("layer %s: %d member(s) failed verification (%s); fetching them again (%d of %d)",
                        layer.digest, len(again), next(iter(bad.values())).message, attempt + 1, config.retries,
                        extra={"event": "retry", "layer": layer.digest, "kind": "digest", "retry": attempt + 1})
            self.metrics.registry_retries["digest"] += 1
            await asyncio.sleep(config.backoff * (2 ** attempt))
            counters.in_flight += 1
            counters.registry_requests += 1
            self.metrics.fetch_request(priority, layer.digest)
            try:
                parts = await self.client.fetch_ranges(layer.ref, layer.digest, [(m.blob_offset, m.size) for m in again])
            except RegistryError as exc:
                raise registry_error(exc) from None
            finally:
                counters.in_flight -= 1
            received = sum(len(p) for p in parts)
            counters.add_bytes(priority, received)
            self.metrics.fetched(priority, layer.digest, received)
            bad = await self.in_store_thread(self._store, layer, [[m] for m in again], parts)
            del parts
            if bad:
                self.metrics.registry_errors["digest"] += 1
        return bad

    async def _stream(self, layer: Layer, runs: list[list[Member]], priority: str, trace: Trace | None = None,
                      urgent: list[tuple[int, int]] | None = None) -> dict[int, ApiError]:
        """Stream runs of adjacent members (one range GET, or one multi-range GET for several);
        store and settle each member as soon as its bytes are complete.

        ``urgent`` (per run, a demand fetch's own members ``run[lo:hi]``) are stored apart from
        their neighbours, on the event loop as soon as their bytes are in when small (no queue,
        no thread hop), so their reader waits for neither neighbours nor a thread.  The client
        hands each run's bytes over in order and once (a retry resumes after what was sent).
        """
        bad: dict[int, ApiError] = {}
        ready: asyncio.Queue[tuple[list[Member], bytes] | None] = asyncio.Queue()
        bufs = [bytearray() for _ in runs]
        buf_start = [run[0].blob_offset for run in runs]
        next_member = [0] * len(runs)

        async def sink(r: int, _pos: int, data: bytes) -> None:
            if trace is not None and not trace.first_byte:
                trace.first_byte = asyncio.get_running_loop().time()
            run, buf = runs[r], bufs[r]
            lo_urgent, hi_urgent = urgent[r] if urgent else (0, 0)
            buf.extend(data)
            first = next_member[r]
            while next_member[r] < len(run) and run[next_member[r]].blob_end <= buf_start[r] + len(buf):
                next_member[r] += 1
            if next_member[r] > first:
                bounds = sorted({first, next_member[r]}
                                | {b for b in (lo_urgent, hi_urgent) if first < b < next_member[r]})
                for lo, hi in zip(bounds, bounds[1:]):
                    cut = run[hi - 1].blob_end - buf_start[r]
                    data = bytes(buf[:cut])
                    del buf[:cut]
                    buf_start[r] += cut
                    layer.counters.add_bytes(priority, cut)
                    self.metrics.fetched(priority, layer.digest, cut)
                    if lo_urgent <= lo and hi <= hi_urgent and len(data) <= _INLINE_STORE:
                        settle(run[lo:hi], self._store(layer, [run[lo:hi]], [data]))
                    else:
                        ready.put_nowait((run[lo:hi], data))

        def settle(members: list[Member], failed: dict[int, ApiError]) -> None:
            bad.update(failed)  # a member that failed verification stays in flight: _refetch_bad retries it
            for m in members:
                if m.blob_offset not in failed:
                    self._settle(layer, [m], None)

        async def store_ready() -> None:
            while (item := await ready.get()) is not None:
                members, data = item
                settle(members, await self.in_store_thread(self._store, layer, [members], [data]))
                del item, data

        consumer = asyncio.create_task(store_ready())
        try:
            await self.client.stream_ranges(layer.ref, layer.digest,
                                            [(run[0].blob_offset, run[-1].blob_end - run[0].blob_offset)
                                             for run in runs], sink)
        finally:
            ready.put_nowait(None)
            await asyncio.shield(consumer)
        return bad

    def _store(self, layer: Layer, runs: list[list[Member]], parts: list[bytes]) -> dict[int, ApiError]:
        """Decode, verify and store every chunk; returns the members (by offset) that failed."""
        bad: dict[int, ApiError] = {}
        good: list[tuple[ChunkKey, bytes]] = []
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
                    good.append((ChunkKey(layer.digest, chunk.blob_offset, chunk.inner_offset), plain))
        self.store.put_many(good)
        return bad


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a C library without it."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _malloc_trim() -> bool:
    """Release the free pages of every malloc arena; False where that is not possible."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def _offset(m: Member) -> int:
    return m.blob_offset


def _consume(fut: asyncio.Future[None]) -> None:
    """Mark a member future's exception as retrieved (it may have no other waiter)."""
    if not fut.cancelled():
        fut.exception()
