"""The ``[snapshotter]`` configuration table of ``lazyd snapshotter``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lazyd.configfile import ConfigError, load_dataclass, read_toml
from lazyd.unixsocket import group_exists

LOG_LEVELS = ("debug", "info", "warning", "error")
PROMOTE_MODES = ("off", "after_fetch", "manual")


@dataclass(frozen=True)
class SnapshotterConfig:
    """Settings of the proxy snapshotter (file table ``[snapshotter]``; flags override)."""

    root: Path = Path("/var/lib/lazyd/snapshotter")
    """Directory holding ``metadata.db`` and ``snapshots/<id>/{fs,work}``."""
    address: Path = Path("/run/lazyd/snapshotter.sock")
    """Unix socket containerd's ``[proxy_plugins.lazyd]`` points at (created with mode 0600, or 0660 with
    ``socket_group``)."""
    socket_group: str | None = None
    """Group that may use ``address`` (mode 0660, owner root:group); unset: root only (0600)."""
    lazyd_socket: Path = Path("/run/lazyd/lazyd.sock")
    """lazyd's msgpack API socket (``lazyd serve``)."""
    remote: bool = True
    """Try lazy (remote) mounts for layers that carry the remote-snapshot labels."""
    mount_timeout: float = 120.0
    """Seconds to wait for lazyd to answer a ``mount`` request before falling back."""
    check_timeout: float = 10.0
    """Seconds to wait for lazyd to answer a ``check`` of a remote lower layer."""
    connect_timeout: float = 2.0
    """Seconds to keep trying to connect to lazyd's socket before treating it as down."""
    premount: bool = True
    """On Prepare of a remote layer, also ask lazyd to mount the image's later layers (named in the
    ``stargz.layers``/``cri.image-layers`` label) at once, so their mounts overlap instead of
    running one per Prepare (like the reference, which resolves the other layers in the background)."""
    premount_ttl: float = 60.0
    """Seconds an early mount waits for its Prepare before it is unmounted again."""
    require_registry: bool = True
    """Answer UNAVAILABLE on Mounts when lazyd reports a remote layer's registry unreachable
    and the layer is not wholly in lazyd's cache (a wholly cached layer needs no registry)."""
    promote: str = "after_fetch"
    """When a remote layer whose every chunk is in lazyd's cache becomes a plain local directory
    (``snapshots/<id>/local``) that new containers use without lazyd or the registry:
    ``after_fetch`` (once background fetch has brought it all), ``manual`` (only after
    ``lazyctl promote``) or ``off`` (never)."""
    promote_interval: float = 2.0
    """Seconds between the snapshotter's promotion passes (ask lazyd which layers are complete,
    promote one, release FUSE mounts no overlay uses any more, report layer states)."""
    promote_retry: float = 60.0
    """Seconds before a failed promotion of a layer (e.g. a full disk) is tried again."""
    grpc_workers: int = 8
    """Threads serving gRPC requests."""
    log_level: str = "info"
    """debug, info, warning or error."""

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"snapshotter.log_level: expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.promote not in PROMOTE_MODES:
            raise ConfigError(f"snapshotter.promote: expected one of {', '.join(PROMOTE_MODES)}, got {self.promote!r}")
        for name in ("mount_timeout", "check_timeout", "connect_timeout", "premount_ttl", "promote_interval",
                     "promote_retry"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"snapshotter.{name}: must be positive, got {getattr(self, name)!r}")
        if self.socket_group is not None and not group_exists(self.socket_group):
            raise ConfigError(f"snapshotter.socket_group: {self.socket_group!r} is not a group on this host "
                              "(see 'getent group')")
        if self.grpc_workers < 1:
            raise ConfigError(f"snapshotter.grpc_workers: must be at least 1, got {self.grpc_workers!r}")

    def with_overrides(self, **values: Any) -> SnapshotterConfig:
        """A copy with the given (non-None) fields replaced, e.g. from command-line flags."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def load_config(path: str | Path | None) -> SnapshotterConfig:
    """Read the ``[snapshotter]`` table of a TOML file (defaults when ``path`` is None or the table is absent)."""
    if path is None:
        return SnapshotterConfig()
    table = read_toml(path).get("snapshotter", {})
    return load_dataclass(SnapshotterConfig, table, prefix="snapshotter.")
