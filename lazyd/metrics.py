"""Prometheus metrics of ``lazyd serve``: what the fetcher counts and the ``/metrics`` endpoint.

docs/metrics.md lists every metric with its type and labels.  Where stargz-snapshotter has a
metric for the same thing, lazyd uses its name, label names, buckets and type (``stargz_fs_*``),
so dashboards made for it work -- except that its counters are written untyped, because
prometheus-client would append ``_total`` to them.  lazyd's own metrics are prefixed ``lazyd_``.

Counting: ``Metrics`` holds plain numbers, changed only on the fetcher's event loop by hooks
in the daemon, the scheduler, the layer table and (through ``RegistryMetrics``, a
``RegistryObserver``: the registry package imports nothing of this) the registry client.
What happens on other threads or in other processes is read where it is kept, at scrape
time: the chunk store's evictions and the scheduler's verification errors (store threads),
and the FUSE workers' read counters (``worker.status`` of each worker, with a short timeout).

Scraping: ``MetricsServer`` answers ``GET /metrics`` on the fetcher's event loop (aiohttp, on
the configured ``IP:PORT`` or Unix socket only).  The daemon gathers a ``Snapshot`` of what
lives elsewhere, copies ``Metrics``, and ``render`` writes both out in the Prometheus text
format with prometheus-client, in a thread.  No endpoint runs in the workers.
"""

from __future__ import annotations

import bisect
import re
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from lazyd import unixsocket
from lazyd.api import messages
from lazyd.config import MetricsAddress
from lazyd.registry.client import ERROR_KINDS, RegistryObserver

# stargz-snapshotter's names (fs/metrics/common/metrics.go, fs/metrics/layer/*.go).
DURATION_MS = "stargz_fs_operation_duration_milliseconds"
DURATION_US = "stargz_fs_operation_duration_microseconds"
OPERATION_COUNT = "stargz_fs_operation_count"
BYTES_SERVED = "stargz_fs_bytes_served"
MS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
US_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# operation_type values (the reference's where it has one)
MOUNT = "mount"
REMOTE_REGISTRY_GET = "remote_registry_get"
FOOTER_GET = "stargz_footer_get"
TOC_GET = "stargz_toc_get"
TOC_DESERIALIZE = "stargz_toc_json_deserialize"
READ_ON_DEMAND = "read_on_demand"
PREFETCH_DOWNLOAD = "prefetch_download"
BACKGROUND_FETCH_DOWNLOAD = "background_fetch_download"
BACKGROUND_FETCH_TOTAL = "background_fetch_total"
ON_DEMAND_READ_ACCESS_COUNT = "on_demand_read_access_count"
ON_DEMAND_REMOTE_REGISTRY_FETCH_COUNT = "on_demand_remote_registry_fetch_count"
ON_DEMAND_BYTES_SERVED = "on_demand_bytes_served"
ON_DEMAND_BYTES_FETCHED = "on_demand_bytes_fetched"

PRIORITIES = ("demand", "prefetch", "background")
RETRY_KINDS = ("unreachable", "throttled", "server", "body", "digest")
"""Error kinds after which a request is tried again (each starts at 0 in ``lazyd_registry_retries_total``)."""
FALLBACK_REASONS = (messages.INVALID_REQUEST, messages.NOT_FOUND, messages.ALREADY_EXISTS, messages.NOT_ESTARGZ,
                    messages.UNAUTHORIZED, messages.UNREACHABLE, messages.DIGEST_MISMATCH, messages.FETCH_FAILED,
                    messages.TIMEOUT, messages.UNAVAILABLE, messages.INTERNAL, messages.UNKNOWN_OP)
"""``reason`` label values of ``lazyd_fallbacks_total``: the API error code the snapshotter's reason
starts with (it reports ``"<code>: <message>"``), else ``other``; the label set stays bounded."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format, which ``generate_latest`` writes (what Prometheus 2 and 3 both read)."""
_BLOB_PATH = re.compile(r"/blobs/([a-z0-9]+:[a-f0-9]+)$")
_REASON = re.compile(r"^([a-z_]{1,32}):")


class MetricsError(Exception):
    """The metrics endpoint could not listen where it is configured to."""


class Histogram:
    """Bucket counts (not cumulative; the last is above every bound) and the sum of observations."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[int, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # ``le`` is inclusive
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> Histogram:
        h = Histogram(self.bounds)
        h.counts = list(self.counts)
        h.total = self.total
        return h

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them, ``le`` written like the Go client does."""
        out, running = [], 0
        for bound, n in zip((*(f"{b:g}" for b in self.bounds), "+Inf"), self.counts):
            running += n
            out.append((bound, float(running)))
        return out


def fallback_reason(reason: str) -> str:
    """The ``reason`` label of a fallback reported with ``reason`` (see ``FALLBACK_REASONS``)."""
    m = _REASON.match(reason)
    return m.group(1) if m and m.group(1) in FALLBACK_REASONS else "other"


def _observe(table: dict[tuple[str, str], Histogram], bounds: tuple[int, ...], key: tuple[str, str],
             value: float) -> None:
    """Add ``value`` to the histogram of ``key`` in ``table``, made with ``bounds`` when there is none yet."""
    h = table.get(key)
    if h is None:
        h = table[key] = Histogram(bounds)
    h.observe(value)


@dataclass
class Metrics:
    """What the fetcher counts since it started; changed on its event loop only."""

    durations_ms: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    """(operation_type, layer) -> histogram of milliseconds."""
    durations_us: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    operations: dict[tuple[str, str], int] = field(default_factory=dict)
    bytes_served: dict[tuple[str, str], int] = field(default_factory=dict)
    fetched_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    """Compressed bytes the scheduler received from registries, by priority."""
    fetch_requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    """Range requests (streamed or multi-range) the scheduler sent, by priority."""
    dedupe_requests: int = 0
    dedupe_bytes: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    registry_errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    registry_retries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RETRY_KINDS, 0))
    worker_restarts: int = 0
    workers_adopted: int = 0
    mounts_adopted: int = 0
    mounts_reestablished: int = 0

    def observe_ms(self, operation: str, layer: str, seconds: float) -> None:
        _observe(self.durations_ms, MS_BUCKETS, (operation, layer), seconds * 1e3)

    def observe_us(self, operation: str, layer: str, seconds: float) -> None:
        _observe(self.durations_us, US_BUCKETS, (operation, layer), seconds * 1e6)

    def count(self, operation: str, layer: str, n: int = 1) -> None:
        key = (operation, layer)
        self.operations[key] = self.operations.get(key, 0) + n

    def serve(self, operation: str, layer: str, nbytes: int) -> None:
        key = (operation, layer)
        self.bytes_served[key] = self.bytes_served.get(key, 0) + nbytes

    def fetched(self, priority: str, layer: str, nbytes: int) -> None:
        """``nbytes`` of layer ``layer`` arrived from the registry for a fetch of ``priority``."""
        self.fetched_bytes[priority] = self.fetched_bytes.get(priority, 0) + nbytes
        if priority == "demand":
            self.serve(ON_DEMAND_BYTES_FETCHED, layer, nbytes)

    def fetch_request(self, priority: str, layer: str) -> None:
        """The scheduler sent one range request (streamed or multi-range) for a fetch of ``priority``."""
        self.fetch_requests[priority] = self.fetch_requests.get(priority, 0) + 1
        if priority == "demand":
            self.count(ON_DEMAND_REMOTE_REGISTRY_FETCH_COUNT, layer)

    def deduped(self, nbytes: int, whole: bool) -> None:
        """A fetch waited for ``nbytes`` of members another request was fetching; ``whole``: it sent
        no request of its own (a registry request saved), else it sent a smaller one."""
        self.dedupe_bytes += nbytes
        if whole:
            self.dedupe_requests += 1

    def fallback(self, reason: str) -> None:
        key = fallback_reason(reason)
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def copy(self) -> Metrics:
        """A copy that the event loop no longer changes (to render in another thread)."""
        return replace(self, durations_ms={k: h.copy() for k, h in self.durations_ms.items()},
                       durations_us={k: h.copy() for k, h in self.durations_us.items()},
                       operations=dict(self.operations), bytes_served=dict(self.bytes_served),
                       fetched_bytes=dict(self.fetched_bytes), fetch_requests=dict(self.fetch_requests),
                       fallbacks=dict(self.fallbacks), registry_errors=dict(self.registry_errors),
                       registry_retries=dict(self.registry_retries))

    def forget_layer(self, digest: str) -> None:
        """Drop every series of layer ``digest`` (its directory is gone: it will not come back soon)."""
        for table in (self.durations_ms, self.durations_us, self.operations, self.bytes_served):
            for key in [k for k in table if k[1] == digest]:
                del table[key]


class RegistryMetrics(RegistryObserver):
    """The registry client's reports, counted into ``metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def request(self, method: str, path: str, status: int | None, seconds: float) -> None:
        m = _BLOB_PATH.search(path)
        if method == "GET" and m is not None:
            self.metrics.observe_ms(REMOTE_REGISTRY_GET, m.group(1), seconds)

    def error(self, kind: str) -> None:
        self.metrics.registry_errors[kind] = self.metrics.registry_errors.get(kind, 0) + 1

    def retry(self, kind: str) -> None:
        self.metrics.registry_retries[kind] = self.metrics.registry_retries.get(kind, 0) + 1


@dataclass(frozen=True)
class MountGauge:
    """One mount's layer, for the reference's per-layer metrics."""

    digest: str
    mountpoint: str
    fetched: int
    prefetched: int
    size: int


@dataclass
class WorkerCounts:
    """Read counters of the FUSE workers (``worker.status``), summed over the mounts of one layer."""

    reads: int = 0
    bytes_read: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    read_errors: int = 0


@dataclass(frozen=True)
class Snapshot:
    """What a scrape reports besides ``Metrics``: read from the workers, the store and the tables."""

    mounts: list[MountGauge]
    mount_states: dict[str, int]
    worker_layers: dict[str, WorkerCounts]
    workers: dict[str, int]
    workers_unanswered: int
    cache_bytes: int
    cache_limit: int
    cache_chunks: int
    cache_evictions: int
    registry_requests: int
    registry_bytes: int
    registry_in_flight: int
    verify_errors: int


def _untyped(name: str, documentation: str, labels: list[str],
             values: dict[tuple[str, ...], float]) -> Metric:
    """A family whose samples are named exactly ``name`` (prometheus-client appends ``_total`` to a
    counter's samples, and the reference's counters have no such suffix)."""
    family = Metric(name, documentation, "unknown")
    for key, value in sorted(values.items()):
        family.add_sample(name, dict(zip(labels, key)), value)
    return family


_FamilyValue = float | None | tuple[str, Mapping[str, float]]
"""A counter's or gauge's samples for ``_family``."""


def _family(cls: type[CounterMetricFamily | GaugeMetricFamily], name: str, documentation: str,
            value: _FamilyValue) -> Metric:
    """A counter or gauge: ``value`` is its one sample, None for none (yet), or ``(label, {label value:
    sample})`` for one sample a label value, sorted by it."""
    if not isinstance(value, tuple):
        return cls(name, documentation, value=value)
    label, values = value
    family = cls(name, documentation, labels=[label])
    for key, sample in sorted(values.items()):
        family.add_metric([key], sample)
    return family


class _Collector:
    """Every metric, from ``metrics`` and one scrape's ``snapshot``."""

    def __init__(self, metrics: Metrics, snapshot: Snapshot) -> None:
        self.metrics = metrics
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        m, s = self.metrics, self.snapshot
        yield from self._reference(m, s)
        hits = sum(w.cache_hits for w in s.worker_layers.values())
        misses = sum(w.cache_misses for w in s.worker_layers.values())
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        families: tuple[tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, _FamilyValue], ...] = (
            (gauge, "lazyd_cache_bytes", ("Bytes the chunk store takes on disk (chunk files, SQLite database and "
             "write-ahead log)."), s.cache_bytes),
            (gauge, "lazyd_cache_limit_bytes", "The chunk store's cap (cache_size).", s.cache_limit),
            (gauge, "lazyd_cache_chunks", "Chunks in the chunk store.", s.cache_chunks),
            (counter, "lazyd_cache_evictions_total", ("Chunks evicted (least recently used first) to keep the chunk "
             "store under its cap."), s.cache_evictions),
            (counter, "lazyd_cache_hits_total", ("Chunk lookups of FUSE reads found in the chunk store (current "
             "mounts, from the workers)."), hits),
            (counter, "lazyd_cache_misses_total", ("Chunk lookups of FUSE reads that had to ask the fetcher (current "
             "mounts, from the workers)."), misses),
            (gauge, "lazyd_cache_hit_ratio", ("lazyd_cache_hits_total / (hits + misses); absent before the first "
             "lookup."), hits / (hits + misses) if hits + misses else None),
            (counter, "lazyd_read_errors_total", ("FUSE reads that failed with EIO (current mounts, from the "
             "workers)."), sum(w.read_errors for w in s.worker_layers.values())),
            (counter, "lazyd_dedupe_saved_requests_total", ("Fetches that sent no registry request: every member "
             "they needed was already being fetched by another request."), m.dedupe_requests),
            (counter, "lazyd_dedupe_saved_bytes_total", ("Compressed bytes fetches waited for from another request "
             "instead of asking the registry for them again."), m.dedupe_bytes),
            (counter, "lazyd_fetched_bytes_total", ("Compressed layer bytes received from registries, by the "
             "priority of the fetch."), ("priority", m.fetched_bytes)),
            (counter, "lazyd_fetch_requests_total", ("Range requests (streamed or multi-range) sent for layer data, "
             "by the priority of the fetch."), ("priority", m.fetch_requests)),
            (counter, "lazyd_chunk_verify_errors_total", ("Chunks whose content did not match the digest in the TOC "
             "(each is fetched again)."), s.verify_errors),
            (counter, "lazyd_fallbacks_total", ("Layers the snapshotter could not mount lazily and pulled instead, "
             "by the error code of the reason."), ("reason", m.fallbacks)),
            (counter, "lazyd_registry_errors_total", "Failed registry requests (each attempt), by kind.",
             ("kind", m.registry_errors)),
            (counter, "lazyd_registry_retries_total", ("Registry requests tried again, or bodies resumed, by the "
             "kind of error before."), ("kind", m.registry_retries)),
            (counter, "lazyd_registry_requests_total", ("HTTP requests sent to registries (redirects, 401 "
             "challenges and checks included)."), s.registry_requests),
            (counter, "lazyd_registry_received_bytes_total", "Body bytes received from registries.",
             s.registry_bytes),
            (gauge, "lazyd_registry_in_flight", "Registry requests waiting for their answer's headers.",
             s.registry_in_flight),
            (counter, "lazyd_worker_restarts_total", "FUSE workers started again after they died.",
             m.worker_restarts),
            (counter, "lazyd_workers_adopted_total", "Running FUSE workers this fetcher took over at its start.",
             m.workers_adopted),
            (counter, "lazyd_mounts_adopted_total", ("Mounts still served by an adopted worker that this fetcher "
             "took over at its start."), m.mounts_adopted),
            (counter, "lazyd_mounts_reestablished_total", ("Mounts mounted again after their worker died or was "
             "gone at start-up."), m.mounts_reestablished),
            (gauge, "lazyd_workers", "FUSE workers by state.", ("state", s.workers)),
            (gauge, "lazyd_workers_unanswered", ("Ready workers that did not answer worker.status for this scrape "
             "(their read counters are missing from it)."), s.workers_unanswered),
            (gauge, "lazyd_mounts", "Mounts by state.", ("state", s.mount_states)),
        )
        for cls, name, documentation, value in families:
            yield _family(cls, name, documentation, value)

    def _reference(self, m: Metrics, s: Snapshot) -> Iterator[Metric]:
        """The metrics stargz-snapshotter has, under its names."""
        for name, table, unit in ((DURATION_MS, m.durations_ms, "milliseconds"),
                                  (DURATION_US, m.durations_us, "microseconds")):
            family = HistogramMetricFamily(name, f"Latency in {unit} of stargz snapshotter operations. Broken down by "
                                           "operation type and layer sha.", labels=["operation_type", "layer"])
            for (op, layer), h in sorted(table.items()):
                family.add_metric([op, layer], h.cumulative(), h.total)
            yield family
        counts: dict[tuple[str, ...], float] = {key: float(n) for key, n in m.operations.items()}
        served: dict[tuple[str, ...], float] = {key: float(n) for key, n in m.bytes_served.items()}
        for digest, w in s.worker_layers.items():
            counts[(ON_DEMAND_READ_ACCESS_COUNT, digest)] = float(w.reads)
            served[(ON_DEMAND_BYTES_SERVED, digest)] = float(w.bytes_read)
        yield _untyped(OPERATION_COUNT, "The count of stargz snapshotter operations. Broken down by operation type and "
                       "layer sha.", ["operation_type", "layer"], counts)
        gauge = GaugeMetricFamily(BYTES_SERVED, "The number of bytes served per stargz snapshotter operations. Broken "
                                  "down by operation type and layer sha.", labels=["operation_type", "layer"])
        for (op, layer), value in sorted(served.items()):
            gauge.add_metric([op, layer], value)
        yield gauge
        for name, doc, attr in (("stargz_fs_layer_fetched_size_bytes", "Total fetched size of the layer", "fetched"),
                                ("stargz_fs_layer_prefetch_size_bytes", "Total prefetched size of the layer",
                                 "prefetched"),
                                ("stargz_fs_layer_size_bytes", "Total size of the layer", "size")):
            yield _untyped(name, doc, ["digest", "mountpoint"],
                           {(g.digest, g.mountpoint): float(getattr(g, attr)) for g in s.mounts})


def render(metrics: Metrics, snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of ``metrics`` and ``snapshot``."""
    return generate_latest(_Collector(metrics, snapshot))  # type: ignore[arg-type]


class MetricsServer:
    """``GET /metrics`` on ``address`` (nothing else is bound): the body is ``await scrape()``.

    A Unix socket is created like lazyd's other sockets (lazyd.unixsocket: mode 0600, or 0660
    with ``group``, never reachable with a wider mode on the way)."""

    def __init__(self, address: MetricsAddress, scrape: Callable[[], Awaitable[bytes]],
                 group: str | None = None) -> None:
        self.address = address
        self.scrape = scrape
        self.group = group
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; MetricsError naming the address when that is not possible."""
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            if self.address.path is not None:
                site: web.BaseSite = web.SockSite(runner, self._unix_socket(Path(self.address.path)))
            else:
                site = web.TCPSite(runner, self.address.host, self.address.port, reuse_address=True)
            await site.start()
        except (OSError, unixsocket.SocketSetupError) as exc:
            await runner.cleanup()
            raise MetricsError(f"cannot serve metrics on {self.address}: {exc}") from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    def _unix_socket(self, path: Path) -> socket.socket:
        gid = unixsocket.group_id(self.group) if self.group is not None else None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unixsocket.publish(path, gid, bind=sock.bind, listen=sock.listen)
        except BaseException:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.address.path is not None:
            try:
                if Path(self.address.path).is_socket():
                    Path(self.address.path).unlink()
            except OSError:
                pass

    async def _handle(self, _request: web.Request) -> web.Response:
        body = await self.scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
