"""Settings of the registry client: the ``[registry]`` table of the daemon config."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lazyd.configfile import ConfigError

MAX_RETRIES = 10
"""Largest ``retries``: the backoff doubles per retry, so the last wait is ``backoff * 2**(retries-1)``."""

MIN_UPLOAD_CHUNK = 64 * 1024
MAX_UPLOAD_CHUNK = 1024 * 1024 * 1024
"""Bounds of ``upload_chunk_size``: each chunk (and a blob up to that size) is held in memory."""

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True)
class RegistryConfig:
    """How lazyd talks to registries (loaded with ``lazyd.configfile.load_dataclass``)."""

    hosts_dir: str = "/etc/containerd/certs.d"
    """containerd-style ``certs.d`` directory: ``<hosts_dir>/<host>/hosts.toml`` (mirrors, CA, headers)."""

    timeout: float = 30.0
    """Seconds a request may wait for the next bytes of an answer before it fails."""

    connect_timeout: float = 10.0
    """Seconds to establish a TCP (and TLS) connection."""

    retries: int = 3
    """Extra attempts for idempotent requests (GET/HEAD) after a connection error, timeout or 5xx/429."""

    backoff: float = 0.5
    """Seconds before the first retry; doubled for each further retry."""

    docker_config: str | None = None
    """Path of a docker ``config.json`` with credentials; None means ``$DOCKER_CONFIG/config.json``
    or ``~/.docker/config.json``."""

    plain_http: list[str] = field(default_factory=list)
    """``host[:port]`` entries reachable over plain HTTP, besides localhost and 127.0.0.1."""

    max_connections_per_host: int = 16
    """Concurrent connections to one registry endpoint."""

    upload_chunk_size: int = 64 * 1024 * 1024
    """Blobs larger than this are pushed in chunked PATCH requests of this size."""

    max_ranges_per_request: int = 64
    """Ranges sent in one multi-range GET; more are split over several requests."""

    max_retry_after: float = 30.0
    """Longest ``Retry-After`` (of a 429 or 503) waited out before a retry; a registry that asks
    for longer fails the request at once, with the wait it asked for in the error."""

    def __post_init__(self) -> None:
        _check_type("hosts_dir", self.hosts_dir, str)
        _check_type("timeout", self.timeout, float)
        _check_type("connect_timeout", self.connect_timeout, float)
        _check_type("retries", self.retries, int)
        _check_type("backoff", self.backoff, float)
        if self.docker_config is not None:
            _check_type("docker_config", self.docker_config, str)
        _check_type("max_connections_per_host", self.max_connections_per_host, int)
        _check_type("upload_chunk_size", self.upload_chunk_size, int)
        _check_type("max_ranges_per_request", self.max_ranges_per_request, int)
        _check_type("max_retry_after", self.max_retry_after, float)
        if not isinstance(self.plain_http, (list, tuple)):
            raise ConfigError(f"config key registry.plain_http: expected a list of host[:port] strings, "
                              f"got {type(self.plain_http).__name__} {self.plain_http!r}")
        for i, entry in enumerate(self.plain_http):
            if not isinstance(entry, str) or not is_host_port(entry):
                raise ConfigError(f"config key registry.plain_http[{i}]: {entry!r} is not a host[:port] "
                                  "(a host name or IP address, optionally with a port 1-65535; no scheme or path)")
        checks: list[tuple[str, bool, str]] = [
            ("hosts_dir", self.hosts_dir != "", "must not be empty"),
            ("timeout", math.isfinite(self.timeout) and self.timeout > 0, "must be a positive number of seconds"),
            ("connect_timeout", math.isfinite(self.connect_timeout) and self.connect_timeout > 0,
             "must be a positive number of seconds"),
            ("retries", 0 <= self.retries <= MAX_RETRIES, f"must be between 0 and {MAX_RETRIES}"),
            ("backoff", math.isfinite(self.backoff) and self.backoff >= 0, "must be a number of seconds >= 0"),
            ("docker_config", self.docker_config != "", "must not be empty (leave it unset for the default)"),
            ("max_connections_per_host", self.max_connections_per_host >= 1, "must be at least 1"),
            ("upload_chunk_size", MIN_UPLOAD_CHUNK <= self.upload_chunk_size <= MAX_UPLOAD_CHUNK,
             f"must be between {MIN_UPLOAD_CHUNK} and {MAX_UPLOAD_CHUNK} bytes"),
            ("max_ranges_per_request", self.max_ranges_per_request >= 1, "must be at least 1"),
            ("max_retry_after", math.isfinite(self.max_retry_after) and self.max_retry_after >= 0,
             "must be a number of seconds >= 0"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key registry.{key}: {getattr(self, key)!r} {why}")


def is_host_port(entry: str) -> bool:
    """True for ``host``, ``host:port``, ``1.2.3.4:port`` or ``[v6]:port`` (port 1-65535)."""
    host, port = entry, None
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            return False
        host, rest = entry[1:end], entry[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
    else:
        if entry.count(":") == 1:
            host, port = entry.split(":")
        if not _HOSTNAME.fullmatch(host):
            return False
    return port is None or (port.isdigit() and port.isascii() and 1 <= int(port) <= 65535)


def _check_type(key: str, value: Any, tp: type) -> None:
    """``value`` must be a ``tp`` (an int passes for a float; a bool passes for neither)."""
    ok = not isinstance(value, bool) and (isinstance(value, (int, float)) if tp is float else isinstance(value, tp))
    if not ok:
        want = {float: "a number", int: "an integer", str: "a string"}[tp]
        raise ConfigError(f"config key registry.{key}: expected {want}, got {type(value).__name__} {value!r}")
