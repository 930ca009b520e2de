"""Fixtures of the metrics tests: the daemon tests' registry and busybox image, and ``lazyd serve``
with a metrics endpoint (a free TCP port on 127.0.0.1, or a Unix socket)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon.conftest import DaemonProc, busybox, busybox_tars, registry  # noqa: F401 - fixtures
from tests.support.procs import free_port

DEMAND_ONLY = "prefetch = false\nbackground_fetch = false"


@dataclass
class MetricsDaemon:
    """A ``lazyd serve`` (``daemon``) whose metrics endpoint is at ``address``."""

    daemon: DaemonProc
    address: str
    base: Path

    def log_lines(self) -> list[str]:
        return self.daemon.log.read_text(errors="replace").splitlines()


MetricsFactory = Callable[..., MetricsDaemon]


@pytest.fixture
def metrics_daemon(tmp_path: Path) -> Iterator[MetricsFactory]:
    """``metrics_daemon(name, extra="", registry_keys="", unix=False, workers=1, cache_size=1 GiB, start=True)``:
    a daemon with ``metrics_address`` set; ``registry_keys`` holds ``[registry]`` keys (default: no retries)."""
    made: list[DaemonProc] = []

    def make(name: str = "d", extra: str = "", registry_keys: str = "retries = 0", unix: bool = False,
             workers: int = 1, cache_size: int = 1 << 30, start: bool = True) -> MetricsDaemon:
        base = tmp_path / name
        base.mkdir()
        address = str(base / "run" / "metrics.sock") if unix else f"127.0.0.1:{free_port()}"
        config = base / "config.toml"
        config.write_text(f"workers = {workers}\ncache_size = {cache_size}\nfetch_timeout = 10.0\n"
                          f"metrics_address = \"{address}\"\n{extra}\n"
                          f"[registry]\nhosts_dir = \"{base / 'certs.d'}\"\n{registry_keys}\n")
        d = DaemonProc(root=base / "root", socket=str(base / "run" / "lazyd.sock"), config=config,
                       log=base / "lazyd.log", workers=workers)
        made.append(d)
        if start:
            d.start()
        return MetricsDaemon(d, address, base)

    try:
        yield make
    finally:
        for d in made:
            d.cleanup()
