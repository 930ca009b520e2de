"""Typed messages of the lazyd msgpack API (the source of truth for docs/protocol.md).

Every op has an ``*Args`` dataclass (validated with ``from_args``) and a result
dataclass (``to_dict`` gives the wire form).  Validation checks types, sizes and
formats and raises ``ApiError("invalid_request", ...)`` naming the bad field, so
a hostile message never reaches a handler.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

# -- error codes ---------------------------------------------------------------

INVALID_REQUEST = "invalid_request"
UNKNOWN_OP = "unknown_op"
NOT_FOUND = "not_found"
ALREADY_EXISTS = "already_exists"
NOT_ESTARGZ = "not_estargz"
UNAUTHORIZED = "unauthorized"
UNREACHABLE = "unreachable"
DIGEST_MISMATCH = "digest_mismatch"
FETCH_FAILED = "fetch_failed"
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"
PULL_FAILED = "pull_failed"
FAILED_PRECONDITION = "failed_precondition"

ERROR_CODES = frozenset(
    {
        INVALID_REQUEST, UNKNOWN_OP, NOT_FOUND, ALREADY_EXISTS, NOT_ESTARGZ, UNAUTHORIZED,
        UNREACHABLE, DIGEST_MISMATCH, FETCH_FAILED, TIMEOUT, UNAVAILABLE, INTERNAL, PULL_FAILED,
        FAILED_PRECONDITION,
    }
)


class ApiError(Exception):
    """An error with a protocol error code; the server sends it as ``{code, message}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code if code in ERROR_CODES else INTERNAL
        self.message = message


# -- limits --------------------------------------------------------------------

MAX_PATH = 4096
MAX_REF = 1024
MAX_TEXT = 4096
MAX_ID = 128
MAX_FETCH_CHUNKS = 4096
MAX_LIST = 100_000
MAX_BLOB = 4 * 1024 * 1024  # a manifest, index or config carried in a message
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,256}$")
MOUNT_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
PRIORITIES = ("demand", "prefetch", "background")
CACHE_ACTIONS = ("stats", "evict")
MOUNT_STATES = ("mounting", "ready", "broken", "error")


def _f(default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field with validation metadata (max_len, pattern, choices, min, max, max_items)."""
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


T = TypeVar("T", bound="Message")


def _check_meta(value: Any, meta: dict[str, Any], name: str) -> None:
    if isinstance(value, str):
        limit = meta.get("max_len", MAX_TEXT)
        if len(value) > limit:
            raise ApiError(INVALID_REQUEST, f"{name}: string of {len(value)} characters exceeds {limit}")
        pattern = meta.get("pattern")
        if pattern is not None and not pattern.match(value):
            raise ApiError(INVALID_REQUEST, f"{name}: {value[:80]!r} is not a valid {meta.get('what', 'value')}")
        if meta.get("absolute") and not value.startswith("/"):
            raise ApiError(INVALID_REQUEST, f"{name}: {value[:80]!r} is not an absolute path")
        if meta.get("absolute") and "\0" in value:
            raise ApiError(INVALID_REQUEST, f"{name}: path contains a NUL byte")
    if isinstance(value, bytes) and len(value) > meta.get("max_len", MAX_BLOB):
        raise ApiError(INVALID_REQUEST, f"{name}: {len(value)} bytes exceed {meta.get('max_len', MAX_BLOB)}")
    choices = meta.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise ApiError(INVALID_REQUEST, f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise ApiError(INVALID_REQUEST, f"{name}: {value} is below the minimum {meta['min']}")
        if "max" in meta and value > meta["max"]:
            raise ApiError(INVALID_REQUEST, f"{name}: {value} is above the maximum {meta['max']}")
    if isinstance(value, list):
        limit = meta.get("max_items", MAX_LIST)
        if len(value) > limit:
            raise ApiError(INVALID_REQUEST, f"{name}: {len(value)} items exceed the limit of {limit}")
        if len(value) < meta.get("min_items", 0):
            raise ApiError(INVALID_REQUEST, f"{name}: needs at least {meta['min_items']} items")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ApiError(INVALID_REQUEST, f"{name}: must not be null")
        last: ApiError | None = None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except ApiError as exc:
                last = exc
        assert last is not None
        raise last
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ApiError(INVALID_REQUEST, f"{name}: expected a list, got {type(value).__name__}")
        if len(value) > MAX_LIST:
            raise ApiError(INVALID_REQUEST, f"{name}: {len(value)} items exceed the limit of {MAX_LIST}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        item_tps = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_tps):
            raise ApiError(INVALID_REQUEST, f"{name}: expected a list of {len(item_tps)} items")
        return tuple(_coerce(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, item_tps)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ApiError(INVALID_REQUEST, f"{name}: expected a map, got {type(value).__name__}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Message):
        return tp.from_args(value, prefix=f"{name}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ApiError(INVALID_REQUEST, f"{name}: expected true or false, got {type(value).__name__}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(INVALID_REQUEST, f"{name}: expected an integer, got {type(value).__name__}")
        if not -(2**63) <= value < 2**64:
            raise ApiError(INVALID_REQUEST, f"{name}: integer out of range")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(INVALID_REQUEST, f"{name}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ApiError(INVALID_REQUEST, f"{name}: expected a string, got {type(value).__name__}")
        return value
    if tp is bytes:
        if not isinstance(value, bytes):
            raise ApiError(INVALID_REQUEST, f"{name}: expected bytes, got {type(value).__name__}")
        return value
    raise ApiError(INTERNAL, f"{name}: unsupported message field type {tp!r}")


class Message:
    """Base of every args/result dataclass: validated parsing and wire encoding."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_meta(getattr(self, f.name), dict(f.metadata), f.name)

    @classmethod
    def from_args(cls: type[T], args: Any, prefix: str = "") -> T:
        """Build from a decoded msgpack map; unknown keys, wrong types and bad sizes raise ApiError."""
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ApiError(INVALID_REQUEST, f"{prefix.rstrip('.') or 'args'}: expected a map, got {type(args).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = [k for k in args if k not in fields]
        if unknown:
            raise ApiError(INVALID_REQUEST, f"unknown field {prefix}{str(unknown[0])[:80]!r} for {cls.__name__}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in args:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ApiError(INVALID_REQUEST, f"missing field {prefix}{name}")
                continue
            value = _coerce(args[name], hints[name], f"{prefix}{name}")
            _check_meta(value, dict(f.metadata), f"{prefix}{name}")
            values[name] = value
        try:
            return cls(**values)
        except ApiError as exc:
            raise ApiError(exc.code, f"{prefix}{exc.message}") from None

    def to_dict(self) -> dict[str, Any]:
        """The wire form (lists for tuples, maps for nested messages)."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_DIGEST = {"pattern": DIGEST_RE, "what": "digest (algorithm:hex)", "max_len": 300}
_PATH = {"absolute": True, "max_len": MAX_PATH}


@dataclass(frozen=True)
class Empty(Message):
    """No fields (args of status/mounts/shutdown ops; result of several ops)."""


# -- worker contract: fetch (worker -> fetcher) ------------------------------------


@dataclass(frozen=True)
class FetchArgs(Message):
    """``fetch``: store the listed chunks of a layer in the ChunkStore, verified."""

    layer_digest: str = _f(**_DIGEST)
    chunks: list[tuple[int, int]] = _f(min_items=1, max_items=MAX_FETCH_CHUNKS)
    priority: str = _f("demand", choices=PRIORITIES)

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, (blob_offset, inner_offset) in enumerate(self.chunks):
            if blob_offset < 0 or inner_offset < 0:
                raise ApiError(INVALID_REQUEST, f"chunks[{i}]: offsets must not be negative")


# -- worker contract: control ops (fetcher -> worker) ------------------------------


@dataclass(frozen=True)
class WorkerMountArgs(Message):
    """``worker.mount``: serve a layer whose verified TOC is in ``toc_path``.

    ``inodes_path``, when given, is where the layer's inode table is kept (``InodeTable.dumps``):
    the worker uses it instead of parsing the TOC, unless it is unreadable or tagged with
    another TOC digest; when it is missing (a layer's first mount) the worker builds the table
    from the TOC and saves it there.
    """

    mount_id: str = _f(pattern=MOUNT_ID_RE, what="mount id", max_len=MAX_ID)
    mountpoint: str = _f(**_PATH)
    layer_digest: str = _f(**_DIGEST)
    toc_digest: str = _f(**_DIGEST)
    toc_path: str = _f(**_PATH)
    blob_size: int = _f(min=0)
    inodes_path: str | None = _f(None, **_PATH)


@dataclass(frozen=True)
class WorkerMountResult(Message):
    fuse_path: str = _f(max_len=MAX_PATH)


@dataclass(frozen=True)
class WorkerUnmountArgs(Message):
    """``worker.unmount``: unmount the bind mount and drop the layer."""

    mount_id: str = _f(pattern=MOUNT_ID_RE, what="mount id", max_len=MAX_ID)


@dataclass(frozen=True)
class WorkerMountStatus(Message):
    mount_id: str
    mountpoint: str
    layer_digest: str
    toc_digest: str
    blob_size: int
    reads: int = 0
    bytes_read: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    fetch_errors: int = 0
    last_error: str | None = None
    opens: int = 0
    pushed_files: int = 0  # files written into the page cache before their READ (the pyfuse3 binding)
    pushed_bytes: int = 0


@dataclass(frozen=True)
class WorkerStatusResult(Message):
    """``worker.status`` result.

    ``no_open`` is true when the worker's llfuse passes the inode to ``read`` (lazyd's
    patched build), so the kernel opens files without asking the worker.
    ``llfuse_version`` is the ``llfuse.__version__`` the worker imported ("" from a
    worker started before this field existed).  ``fuse_binding`` is the binding that serves
    its mount and its version: ``llfuse 1.5.2+lazyd.readino`` or ``pyfuse3 3.5.0+lazyd.readino``
    ("" from a worker started before this field existed).
    """

    pid: int
    worker_id: int
    fuse_root: str
    fetcher_connected: bool
    mounts: list[WorkerMountStatus] = _f([])
    no_open: bool = False
    llfuse_version: str = _f("", max_len=MAX_ID)
    tracing: bool = False
    fuse_binding: str = _f("", max_len=MAX_ID)
    xattrs: bool = True  # false: the worker told the kernel it has no extended attributes (--no-xattrs)


@dataclass(frozen=True)
class WorkerTraceArgs(Message):
    """``worker.trace``: the files opened so far in a mount of a tracing worker (``--trace``)."""

    mount_id: str = _f(pattern=MOUNT_ID_RE, what="mount id", max_len=MAX_ID)


@dataclass(frozen=True)
class TraceResult(Message):
    """``trace`` / ``worker.trace`` result: root-relative paths of the regular files opened in the
    mount, each once, in first-open order; ``truncated`` when the trace stopped at its bound.
    ``seqs[i]`` numbers the first open of ``paths[i]`` among all opens the tracing worker saw, so
    the traces of the layers of one container merge into one first-access order."""

    paths: list[str] = _f([])
    truncated: bool = False
    seqs: list[int] = _f([])


# -- main ops (clients -> fetcher) ---------------------------------------------------


@dataclass(frozen=True)
class MountArgs(Message):
    """``mount``: lazily mount one eStargz layer of ``ref`` at ``mountpoint``.

    ``toc_digest`` defaults to the layer's ``containerd.io/snapshot/stargz/toc.digest``
    manifest annotation; ``prefetch_wait`` (default: the daemon's setting) makes the
    reply wait up to ``prefetch_timeout`` for the prefetch region.
    """

    ref: str = _f(max_len=MAX_REF)
    layer_digest: str = _f(**_DIGEST)
    mountpoint: str = _f(**_PATH)
    toc_digest: str | None = _f(None, **_DIGEST)
    prefetch_wait: bool | None = None
    trace: bool = False  # serve it from the tracing worker, which records every open (``trace`` op)


@dataclass(frozen=True)
class MountResult(Message):
    mount_id: str
    toc_digest: str
    layer_size: int
    worker_pid: int


@dataclass(frozen=True)
class TraceArgs(Message):
    """``trace``: the files opened so far in the traced mount at ``mountpoint`` (``mount`` with ``trace``)."""

    mountpoint: str = _f(**_PATH)


@dataclass(frozen=True)
class UnmountArgs(Message):
    mountpoint: str = _f(**_PATH)


@dataclass(frozen=True)
class CheckArgs(Message):
    mountpoint: str = _f(**_PATH)


@dataclass(frozen=True)
class CheckResult(Message):
    """``check``: is the mount served by a live worker, and is its registry reachable?

    ``cached`` is computed only when the registry is unreachable: every chunk of the layer
    is in the chunk store, so the mount needs no registry."""

    served: bool
    registry_reachable: bool
    state: str
    error: str | None = None
    cached: bool = False


@dataclass(frozen=True)
class LayerStats(Message):
    """Per-layer fetch counters kept by the fetcher."""

    layer_size: int = 0
    fetched_bytes: int = 0
    cached_bytes: int = 0
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    background_bytes: int = 0
    registry_requests: int = 0
    in_flight: int = 0
    verify_errors: int = 0
    prefetch_state: str = "none"
    background_state: str = "none"
    last_error: str | None = None


@dataclass(frozen=True)
class MountInfo(Message):
    """One mount as shown by ``mounts`` and ``status``."""

    mount_id: str
    ref: str
    layer_digest: str
    toc_digest: str
    mountpoint: str
    state: str
    worker_id: int
    worker_pid: int
    layer: LayerStats
    reads: int = 0
    bytes_read: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    fetch_errors: int = 0
    error: str | None = None
    profile: str | None = None  # manifest digest of the prefetch profile used, if any
    profile_source: str | None = None  # "local" or "registry"
    profile_files: int = 0  # profiled files of this layer
    profile_bytes: int = 0  # compressed bytes of the profile's chunks this mount's prefetch fetched
    layer_state: str = _f("lazy", choices=("lazy", "fetching", "promoting", "local"))
    """``lazy``, ``fetching`` (prefetch or background fetch running), ``promoting`` or ``local``
    (the snapshotter's ``layer_state`` reports; a local layer stays mounted until released)."""


@dataclass(frozen=True)
class MountsResult(Message):
    mounts: list[MountInfo] = _f([])


@dataclass(frozen=True)
class WorkerInfo(Message):
    """One worker in ``status``; ``llfuse_version``, ``no_open`` and ``fuse_binding`` are null when it did
    not answer."""

    worker_id: int
    pid: int
    state: str
    mounts: int
    restarts: int = 0
    llfuse_version: str | None = _f(None, max_len=MAX_ID)
    no_open: bool | None = None
    fuse_binding: str | None = _f(None, max_len=MAX_ID)
    xattrs: bool | None = None


@dataclass(frozen=True)
class CacheStats(Message):
    size: int
    limit: int
    count: int
    directory: str
    evicted: int | None = None


@dataclass(frozen=True)
class Totals(Message):
    """Daemon-wide counters."""

    registry_requests: int = 0
    registry_bytes: int = 0
    in_flight: int = 0
    fetched_bytes: int = 0
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    background_bytes: int = 0
    fetch_requests: int = 0
    verify_errors: int = 0
    fallbacks: int = 0


@dataclass(frozen=True)
class FallbackInfo(Message):
    ref: str
    layer_digest: str
    reason: str
    time: float


@dataclass(frozen=True)
class StatusResult(Message):
    """``status``: the whole daemon.

    ``llfuse_version``: the llfuse build the workers use (they import llfuse, the fetcher
    does not), comma-separated if they differ; null when no worker answered.
    """

    pid: int
    version: str
    root: str
    socket: str
    started_at: float
    mounts: list[MountInfo]
    workers: list[WorkerInfo]
    cache: CacheStats
    totals: Totals
    fallbacks: list[FallbackInfo] = _f([])
    llfuse_version: str | None = _f(None, max_len=MAX_TEXT)
    local_layers: list[LayerStateInfo] = _f([])
    """Layers the snapshotter reports ``promoting`` or ``local`` that lazyd no longer mounts."""


@dataclass(frozen=True)
class CacheArgs(Message):
    """``cache``: ``stats``, or ``evict`` one layer (``layer_digest``) or everything."""

    action: str = _f(choices=CACHE_ACTIONS)
    layer_digest: str | None = _f(None, **_DIGEST)


@dataclass(frozen=True)
class FallbackArgs(Message):
    """``fallback``: the snapshotter could not mount a layer lazily and pulled it instead."""

    ref: str = _f(max_len=MAX_REF)
    layer_digest: str = _f(**_DIGEST)
    reason: str = _f(max_len=MAX_TEXT)


@dataclass(frozen=True)
class ResolveArgs(Message):
    """``resolve``: fetch the manifest and config of ``ref`` for the daemon's platform.

    Lets a client such as ``lazyctl rpull`` pull an image without talking to the
    registry itself: lazyd has the registry configuration, the credentials and warm
    connections.
    """

    ref: str = _f(max_len=MAX_REF)


@dataclass(frozen=True)
class ResolveResult(Message):
    """The raw bytes as the registry served them (digests verified); ``index*`` are set
    when ``ref`` named an index and the manifest was picked from it."""

    ref: str = _f(max_len=MAX_REF)
    manifest_digest: str = _f(**_DIGEST)
    manifest_media_type: str = _f(max_len=MAX_TEXT)
    manifest: bytes = _f()
    config: bytes = _f()
    index_digest: str | None = _f(None, **_DIGEST)
    index_media_type: str | None = _f(None, max_len=MAX_TEXT)
    index: bytes = _f(b"")


_NAME = {"pattern": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$"), "what": "name", "max_len": 256}


@dataclass(frozen=True)
class PullArgs(Message):
    """``pull``: pull ``ref`` into containerd as ``lazyctl rpull`` does, inside lazyd.

    lazyd resolves the image, writes index, manifest and config into containerd's content
    store (at ``address``, in ``namespace``) and builds the snapshot chain through
    ``snapshotter`` with the remote-snapshot labels; layers the snapshotter does not mount
    lazily are downloaded and applied in full.  ``plain_http`` and ``hosts_dir`` apply to
    those downloads (as rpull's flags did when it fetched them itself).  A client that
    wants progress names the pull with ``pull_id`` and polls ``pull_progress``.
    """

    ref: str = _f(max_len=MAX_REF)
    address: str = _f(**_PATH)
    namespace: str = _f(**{**_NAME, "max_len": 76})
    snapshotter: str = _f(**_NAME)
    plain_http: bool = False
    hosts_dir: str | None = _f(None, **_PATH)
    pull_id: str | None = _f(None, pattern=MOUNT_ID_RE, what="pull id")


@dataclass(frozen=True)
class PulledLayer(Message):
    """One layer of a ``pull``: ``mode`` is ``lazy`` (remote snapshot), ``full`` (downloaded
    and applied; ``reason`` says why) or ``present`` (the snapshot existed)."""

    index: int
    digest: str
    size: int
    chain_id: str
    mode: str
    reason: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class PullResult(Message):
    """The image as stored: its record ``image`` points at ``target_digest`` (the index, or
    else the manifest); ``bytes_fetched`` counts the layer bytes downloaded in full."""

    image: str
    target_digest: str
    manifest_digest: str
    config_digest: str
    snapshotter: str
    chain_id: str
    layers: list[PulledLayer] = _f([])
    bytes_fetched: int = 0
    seconds: float = 0.0
    resolved_by: str = "lazyd"


@dataclass(frozen=True)
class PullProgressArgs(Message):
    pull_id: str = _f(pattern=MOUNT_ID_RE, what="pull id")


@dataclass(frozen=True)
class PullProgressResult(Message):
    """``pull_progress``: how far the ``pull`` named ``pull_id`` is.  ``bytes`` grows by a
    layer's size when it is done lazily and by the bytes downloaded of a layer pulled in full."""

    description: str
    layers: int
    layers_done: int
    bytes: int


# -- promotion (snapshotter <-> fetcher) -----------------------------------------

PROMOTE_MODES = ("off", "after_fetch", "manual")
REPORTED_LAYER_STATES = ("lazy", "promoting", "local")
MAX_LAYER_REPORTS = 4096


@dataclass(frozen=True)
class PromoteArgs(Message):
    """``promote``: promote the mounted layers of image ``ref``, or layer ``layer_digest`` (exactly one)."""

    ref: str | None = _f(None, max_len=MAX_REF)
    layer_digest: str | None = _f(None, **_DIGEST)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.ref is None) == (self.layer_digest is None):
            raise ApiError(INVALID_REQUEST, "promote: give exactly one of ref and layer_digest")


@dataclass(frozen=True)
class PromoteResult(Message):
    """The layers marked for promotion (their remaining chunks are being fetched now), and
    those the snapshotter already reports ``local``; ``mode`` is the snapshotter's setting."""

    layers: list[str] = _f([])
    local: list[str] = _f([])
    mode: str = _f("after_fetch", choices=PROMOTE_MODES)


@dataclass(frozen=True)
class LayerReport(Message):
    """One layer in ``layer_state``: ``lazy`` (a remote snapshot not yet promoted), ``promoting``
    or ``local`` (``disk_bytes``: the promoted directory's disk use)."""

    layer_digest: str = _f(**_DIGEST)
    state: str = _f(choices=REPORTED_LAYER_STATES)
    disk_bytes: int = _f(0, min=0)


@dataclass(frozen=True)
class LayerStateArgs(Message):
    """``layer_state``: the snapshotter's promotion setting and the state of its remote layers,
    sent every ``promote_interval`` (so a restarted lazyd learns them again)."""

    mode: str = _f(choices=PROMOTE_MODES)
    layers: list[LayerReport] = _f([], max_items=MAX_LAYER_REPORTS)


@dataclass(frozen=True)
class LayerPromotion(Message):
    """Per reported ``lazy`` layer: ``complete`` (every chunk is in the store, verified) and
    ``requested`` (``promote`` asked for it)."""

    layer_digest: str = _f(**_DIGEST)
    complete: bool = False
    requested: bool = False


@dataclass(frozen=True)
class LayerStateResult(Message):
    layers: list[LayerPromotion] = _f([], max_items=MAX_LAYER_REPORTS)


@dataclass(frozen=True)
class LayerStateInfo(Message):
    """A layer in ``status.local_layers``."""

    layer_digest: str = _f(**_DIGEST)
    state: str = _f(choices=REPORTED_LAYER_STATES)
    disk_bytes: int = 0
    reported_at: float = 0.0


MAX_PROFILE = 4 * 1024 * 1024  # a profile's JSON lines (lazyd.profile.store.MAX_PROFILE_BYTES)


@dataclass(frozen=True)
class ProfilePutArgs(Message):
    """``profile_put``: store ``records`` (JSON lines) as the prefetch profile of image manifest
    ``manifest_digest``, replacing any older one."""

    manifest_digest: str = _f(**_DIGEST)
    records: bytes = _f(max_len=MAX_PROFILE)


@dataclass(frozen=True)
class ProfileDigestArgs(Message):
    """``profile_get`` / ``profile_delete``: the profile of image manifest ``manifest_digest``."""

    manifest_digest: str = _f(**_DIGEST)


@dataclass(frozen=True)
class ProfileSummary(Message):
    """A stored profile: its size, number of records and of layers, and when it was stored."""

    manifest_digest: str
    size: int
    records: int
    layers: int
    stored_at: float


@dataclass(frozen=True)
class ProfileData(Message):
    """``profile_get``: a stored profile's records (JSON lines)."""

    manifest_digest: str
    records: bytes = _f(max_len=MAX_PROFILE)


@dataclass(frozen=True)
class ProfileListResult(Message):
    profiles: list[ProfileSummary] = _f([])


OPS: dict[str, tuple[type[Message], type[Message]]] = {
    "fetch": (FetchArgs, Empty),
    "mount": (MountArgs, MountResult),
    "unmount": (UnmountArgs, Empty),
    "check": (CheckArgs, CheckResult),
    "status": (Empty, StatusResult),
    "mounts": (Empty, MountsResult),
    "cache": (CacheArgs, CacheStats),
    "fallback": (FallbackArgs, Empty),
    "resolve": (ResolveArgs, ResolveResult),
    "pull": (PullArgs, PullResult),
    "pull_progress": (PullProgressArgs, PullProgressResult),
    "shutdown": (Empty, Empty),
    "promote": (PromoteArgs, PromoteResult),
    "layer_state": (LayerStateArgs, LayerStateResult),
    "trace": (TraceArgs, TraceResult),
    "profile_put": (ProfilePutArgs, ProfileSummary),
    "profile_get": (ProfileDigestArgs, ProfileData),
    "profile_list": (Empty, ProfileListResult),
    "profile_delete": (ProfileDigestArgs, Empty),
}
"""Main-socket ops: name -> (args class, result class)."""

WORKER_OPS: dict[str, tuple[type[Message], type[Message]]] = {
    "worker.mount": (WorkerMountArgs, WorkerMountResult),
    "worker.unmount": (WorkerUnmountArgs, Empty),
    "worker.status": (Empty, WorkerStatusResult),
    "worker.shutdown": (Empty, Empty),
    "worker.trace": (WorkerTraceArgs, TraceResult),
}
"""Worker control-socket ops: name -> (args class, result class)."""

ANNOTATION_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ANNOTATION_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
