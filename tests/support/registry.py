"""A real Debian ``docker-registry`` (distribution 2.8) on 127.0.0.1 for tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import Proc, free_port, port_open, wait_until

REGISTRY_BIN = "docker-registry"


@dataclass
class Registry:
    """A running registry; ``host`` is ``127.0.0.1:PORT``."""

    port: int
    root: Path
    proc: Proc
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if "tls" in self.config.get("http", {}) else "http"
        return f"{scheme}://{self.host}"

    def stop(self) -> None:
        self.proc.stop()

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob on disk (for corruption tests)."""
        algo, hexd = digest.split(":", 1)
        return self.root / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"


def start_registry(
    workdir: Path,
    *,
    name: str = "registry",
    port: int | None = None,
    auth: dict[str, Any] | None = None,
    proxy_remote: str | None = None,
    tls: dict[str, str] | None = None,
    storage_root: Path | None = None,
) -> Registry:
    """Start ``docker-registry serve`` with a generated config and wait until it listens.

    ``auth`` is the registry's ``auth:`` section (htpasswd or token), ``proxy_remote``
    makes it a pull-through mirror of that URL, ``tls`` is ``{certificate, key}``.
    """
    port = port or free_port()
    root = storage_root or (workdir / f"{name}-data")
    root.mkdir(parents=True, exist_ok=True)
    http: dict[str, Any] = {"addr": f"127.0.0.1:{port}"}
    if tls:
        http["tls"] = tls
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": http,
    }
    if auth:
        config["auth"] = auth
    if proxy_remote:
        config["proxy"] = {"remoteurl": proxy_remote}
    cfg_path = workdir / f"{name}-config.yml"
    # YAML is a superset of JSON, so the config is written as JSON.
    cfg_path.write_text(json.dumps(config))
    proc = Proc([REGISTRY_BIN, "serve", str(cfg_path)], workdir / f"{name}.log")
    try:
        wait_until(lambda: port_open(port) or not proc.alive(), 20, f"registry on port {port}")
    except TimeoutError:
        proc.stop()
        raise
    if not proc.alive():
        raise RuntimeError(f"registry exited at start:\n{proc.log_text()}")
    return Registry(port=port, root=root, proc=proc, config=config)


@contextmanager
def running_registry(workdir: Path, **options: Any) -> Iterator[Registry]:
    """``start_registry(workdir, **options)``, stopped on leaving the block."""
    reg = start_registry(workdir, **options)
    try:
        yield reg
    finally:
        reg.stop()
