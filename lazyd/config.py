"""Settings of ``lazyd serve`` (docs/config.md lists every key with its default)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lazyd.configfile import ConfigError, load_dataclass, read_toml
from lazyd.logsetup import LOG_FORMATS
from lazyd.registry import RegistryConfig
from lazyd.unixsocket import group_exists

DEFAULT_CONFIG = Path("/etc/lazyd/config.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
PROFILE_MODES = ("off", "local", "registry")
FUSE_BACKENDS = ("llfuse", "pyfuse3")
MIN_CACHE_SIZE = 16 * 1024 * 1024
"""Smallest ``cache_size``: four chunks of 4 MiB, the chunk size of lazyd's converter and of the
reference's (the largest chunks of the images lazyd makes).  Reads stay correct below it (a
read pins its chunks), but a sequential read of big files then evicts the chunks fetched ahead
of it before it gets to them and fetches them again (docs/config.md has the measurements)."""


@dataclass(frozen=True)
class MetricsAddress:
    """Where the Prometheus endpoint listens: ``host``:``port`` (an IP address) or a Unix socket ``path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        return f"[{self.host}]:{self.port}" if self.host is not None and ":" in self.host else f"{self.host}:{self.port}"


def parse_metrics_address(text: str) -> MetricsAddress:
    """``127.0.0.1:9101``, ``[::1]:9101`` or an absolute Unix socket path; ValueError saying what is wrong.

    The host must be an IP address, so the endpoint binds exactly what is configured (a host
    name can resolve to several addresses, or to other ones later)."""
    if text.startswith("/"):
        if text.endswith("/") or "\0" in text:
            raise ValueError("is not a file path for a Unix socket")
        if len(text.encode()) > 107:
            raise ValueError("is too long for a Unix socket path (at most 107 bytes)")
        return MetricsAddress(path=text)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT (HOST an IP address) or an absolute Unix socket path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError("brackets are for IPv6 addresses only")
    elif ":" in host:
        raise ValueError("an IPv6 address must be in brackets, e.g. [::1]:9101")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host {host!r} is not an IP address (e.g. 127.0.0.1:9101 or [::1]:9101)") from None
    if not port.isdecimal() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not between 1 and 65535")
    return MetricsAddress(host=host, port=int(port))


@dataclass(frozen=True)
class DaemonConfig:
    """The daemon's settings; ``[registry]`` holds the registry client's."""

    root: str = "/var/lib/lazyd"
    """State directory: chunk cache, layer metadata, worker state."""

    socket: str = "/run/lazyd/lazyd.sock"
    """API socket (created mode 0600, or 0660 with ``socket_group``)."""

    socket_group: str | None = None
    """Group that may use the API socket (mode 0660, owner root:group); unset: root only (0600)."""

    workers: int = 2
    """Number of FUSE worker processes; mounts are spread over them."""

    fuse_backend: str = "pyfuse3"
    """The workers' FUSE binding: ``pyfuse3`` (libfuse 3: listings carry attributes, and a
    directory's small stored files are pushed into the page cache) or ``llfuse`` (libfuse 2)."""

    xattr_free_workers: bool = True
    """Every worker but the last starts undecided about extended attributes: at the kernel's first
    GETXATTR, a worker none of whose layers has any answers ENOSYS, and the kernel asks it for none
    again (overlayfs asks for two or three a file; LISTXATTR is still answered).  Layers with extended attributes then go to
    the other workers.  False: every worker serves them (one round trip for each request)."""

    cache_size: int = 10 * 1024**3
    """Chunk cache cap in bytes; least-recently-used chunks are evicted above it."""

    prefetch: bool = True
    """On mount, fetch everything before ``.prefetch.landmark`` in one request."""

    prefetch_wait: bool = False
    """Default for a mount's ``prefetch_wait``: the mount reply waits for the prefetch.  Off by
    default: the prefetch is streamed, so reads wait only for their own members, and the
    prefetch overlaps with the rest of the pull and with creating the container."""

    prefetch_timeout: float = 10.0
    """Longest a mount waits for its prefetch (the prefetch itself continues)."""

    background_fetch: bool = True
    """After the prefetch, fetch the rest of each layer at the lowest priority."""

    profiles: str = "local"
    """Prefetch profiles (docs/profiles.md): ``off``; ``local`` (use the profiles in
    ``<root>/profiles``); ``registry`` (also look for one in the registry on mount)."""

    profile_timeout: float = 5.0
    """Longest a mount waits for a profile from the registry (``profiles = "registry"``)."""

    background_delay: float = 2.0
    """Seconds without mounts, on-demand or prefetch fetches before each background request,
    so the background fetch never competes with a starting container for the link."""

    background_batch_size: int = 4 * 1024 * 1024
    """Compressed bytes per background range request."""

    background_share: int = 1
    """Background requests that may be in flight while foreground activity has gone on without a
    ``background_delay`` pause for ``background_share_after`` seconds (a long scan of a big
    layer), so the background fetch keeps a share of the link; 0: background waits for a pause."""

    background_share_after: float = 10.0
    """Seconds of foreground activity without a ``background_delay`` pause before background
    requests get their ``background_share``: longer than a container's start, which the
    background fetch would slow down (measured: docs/design.md, "Small-file read path")."""

    demand_window_min: int = 64 * 1024
    """Compressed bytes an on-demand fetch covers at least: the members next to the demanded
    ones in the blob come along in the same request (0: only what was asked)."""

    demand_window_max: int = 2 * 1024 * 1024
    """Largest neighbour window; it doubles from ``demand_window_min`` while on-demand misses
    land within half of this of one of the layer's recent on-demand ranges (misses cluster)."""

    max_range_size: int = 16 * 1024 * 1024
    """Largest coalesced range of adjacent chunks in one request."""

    max_concurrent_requests: int = 8
    """Registry requests in flight at once (demand first, then prefetch, then background)."""

    fetch_timeout: float = 30.0
    """Longest a worker's read waits for the fetcher before it fails with EIO."""

    mount_timeout: float = 60.0
    """Longest a mount waits for the layer's footer and TOC."""

    worker_start_timeout: float = 20.0
    """Longest a new worker may take to write its worker.json."""

    health_interval: float = 0.5
    """Seconds between worker liveness checks."""

    check_interval: float = 10.0
    """``check`` reports a registry reachable without asking it again when a request to it
    succeeded this many seconds ago or less (0: ask on every check)."""

    log_level: str = "info"
    """debug, info, warning or error."""

    log_format: str = "text"
    """``text`` (one line per record) or ``json`` (one JSON object per line); the workers' logs too."""

    metrics_address: str | None = None
    """Prometheus endpoint (``/metrics``): ``IP:PORT`` or an absolute Unix socket path; unset: none."""

    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """The ``[registry]`` table (see docs/config.md)."""

    snapshotter: dict[str, Any] = field(default_factory=dict)
    """The ``[snapshotter]`` table of the shared file; ``lazyd snapshotter`` validates it."""

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("workers", 1 <= self.workers <= 64, "must be between 1 and 64"),
            ("fuse_backend", self.fuse_backend in FUSE_BACKENDS, f"must be one of {', '.join(FUSE_BACKENDS)}"),
            ("cache_size", self.cache_size >= MIN_CACHE_SIZE,
             f"must be at least {MIN_CACHE_SIZE} bytes (16 MiB: room for four 4 MiB chunks, the default chunk size, "
             "so chunks fetched ahead of a read are not evicted before it gets to them)"),
            ("prefetch_timeout", self.prefetch_timeout >= 0, "must not be negative"),
            ("profiles", self.profiles in PROFILE_MODES, f"must be one of {', '.join(PROFILE_MODES)}"),
            ("profile_timeout", self.profile_timeout > 0, "must be positive"),
            ("background_batch_size", self.background_batch_size >= 4096, "must be at least 4096"),
            ("background_delay", self.background_delay >= 0, "must not be negative"),
            ("max_range_size", self.max_range_size >= 4096, "must be at least 4096"),
            ("max_concurrent_requests", self.max_concurrent_requests >= 1, "must be at least 1"),
            ("background_share", 0 <= self.background_share <= self.max_concurrent_requests,
             "must be between 0 and max_concurrent_requests"),
            ("background_share_after", self.background_share_after >= 0, "must not be negative"),
            ("demand_window_min", 0 <= self.demand_window_min <= self.max_range_size,
             "must be between 0 and max_range_size"),
            ("demand_window_max", self.demand_window_min <= self.demand_window_max <= self.max_range_size,
             "must be between demand_window_min and max_range_size"),
            ("fetch_timeout", self.fetch_timeout > 0, "must be positive"),
            ("mount_timeout", self.mount_timeout > 0, "must be positive"),
            ("worker_start_timeout", self.worker_start_timeout > 0, "must be positive"),
            ("health_interval", self.health_interval > 0, "must be positive"),
            ("check_interval", self.check_interval >= 0, "must not be negative"),
            ("log_level", self.log_level in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}"),
            ("log_format", self.log_format in LOG_FORMATS, f"must be one of {', '.join(LOG_FORMATS)}"),
            ("root", self.root.startswith("/"), "must be an absolute path"),
            ("socket", self.socket.startswith("/"), "must be an absolute path"),
            ("socket_group", self.socket_group is None or group_exists(self.socket_group),
             "is not a group on this host (see 'getent group')"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key {key}: {getattr(self, key)!r} {why}")
        if self.metrics_address is not None:
            try:
                parse_metrics_address(self.metrics_address)
            except ValueError as exc:
                raise ConfigError(f"config key metrics_address: {self.metrics_address!r} {exc}") from None
            if self.metrics_address == self.socket:
                raise ConfigError(f"config key metrics_address: {self.metrics_address!r} is the API socket's path")

    @property
    def metrics(self) -> MetricsAddress | None:
        """The parsed ``metrics_address`` (None: no metrics endpoint)."""
        return parse_metrics_address(self.metrics_address) if self.metrics_address is not None else None

    @property
    def root_path(self) -> Path:
        return Path(self.root)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DaemonConfig:
    """Read the config file (``path``, else /etc/lazyd/config.toml if present) and apply overrides.

    ``overrides`` maps top-level keys (and ``hosts_dir`` for the registry) to values
    from the command line; None values are ignored.
    """
    if path is not None:
        table = read_toml(path)
    elif DEFAULT_CONFIG.exists():
        table = read_toml(DEFAULT_CONFIG)
    else:
        table = {}
    config = load_dataclass(DaemonConfig, table)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "hosts_dir":
            config = replace(config, registry=replace(config.registry, hosts_dir=str(value)))
        else:
            config = replace(config, **{key: value})
    return config
