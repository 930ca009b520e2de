"""Settings of the registry client: the ``[registry]`` table of the daemon config."""

from __future__ import annotations

from dataclasses import dataclass, field


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
