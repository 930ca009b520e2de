"""Fixtures of the registry-fault tests.

A real ``docker-registry`` holds an eStargz image of random files; ``lazyd serve`` mounts
its layer through a ``FaultProxy`` (tests/faults/faultproxy.py), with a 2 s registry
``timeout`` and the documented ``retries``/``backoff``.  Reads are demand reads only
(no prefetch, no background fetch), so every registry request a test sees is a reader's.

Every test adds what it measured (what the reader saw, after how long, how long recovery
took) to the session's ``FaultReport``; the table is printed at the end of the run, and
written to ``$LAZYD_FAULTS_RESULTS/faults-<UTC time>.json`` when that variable names a
directory (docs/reliability.md, "Registry faults", is made from such a file).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from lazyd.api.messages import MountInfo
from lazyd.estargz import BuildOptions
from tests.daemon.conftest import DaemonProc
from tests.support.estargz_images import EStargzImage, EStargzLayer, build_layers, push_layers
from tests.support.registry import Registry, running_registry

from .faultproxy import FaultProxy

BIG = "big.bin"
BIG_SIZE = 8 << 20
SMALL_COUNT = 320
SMALL_SIZE = 32 << 10
CHUNK_SIZE = 512 << 10
REGISTRY_TIMEOUT = 2.0
RETRIES = 3
BACKOFF = 0.5
RETRY_BUDGET = sum(BACKOFF * 2 ** i for i in range(RETRIES))
"""Seconds of backoff a request sleeps through before its last attempt (0.5 + 1 + 2)."""
DEMAND_ONLY = "prefetch = false\nbackground_fetch = false"
ONE_REQUEST_PER_READ = "demand_window_min = 0\ndemand_window_max = 0"
"""No neighbour chunks: a read of one small file is one range GET of its own gzip member."""


def small(i: int) -> str:
    return f"small/{i:03d}.bin"


@dataclass(frozen=True)
class FaultImage:
    """The pushed image (one layer) and the bytes of every file in it."""

    image: EStargzImage
    files: dict[str, bytes]

    @property
    def layer(self) -> EStargzLayer:
        return self.image.layers[0]


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("faults-registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def fault_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> FaultImage:
    """``big.bin`` (8 MiB, sixteen 512 KiB chunks) and 320 files of 32 KiB, all random bytes."""
    work = tmp_path_factory.mktemp("faults-image")
    rng = random.Random(13)
    files = {BIG: rng.randbytes(BIG_SIZE)} | {small(i): rng.randbytes(SMALL_SIZE) for i in range(SMALL_COUNT)}
    tar_path = work / "layer.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("small")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    layers = build_layers([tar_path], work / "esgz", BuildOptions(chunk_size=CHUNK_SIZE))
    return FaultImage(push_layers(registry.host, "faults/random:t", layers), files)


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


@dataclass
class Mounted:
    """The fault image's layer mounted by a ``lazyd serve`` through a proxy."""

    daemon: DaemonProc
    path: Path
    mount_id: str
    worker_pid: int

    def info(self) -> MountInfo:
        with self.daemon.client() as c:
            (m,) = [m for m in c.status().mounts if m.mountpoint == str(self.path)]
        return m

    def assert_not_remounted(self) -> MountInfo:
        """The mount is the one made at the start: same id, same worker, ready."""
        m = self.info()
        assert (m.mount_id, m.worker_pid, m.state) == (self.mount_id, self.worker_pid, "ready"), m
        return m


MountFactory = Callable[..., Mounted]


@pytest.fixture
def mount_via(tmp_path: Path, fault_image: FaultImage) -> Iterator[MountFactory]:
    """``mount_via(host, extra="", registry_extra="")``: start a daemon, mount the layer via ``host``."""
    made: list[DaemonProc] = []

    def make(host: str, extra: str = "", registry_extra: str = "") -> Mounted:
        base = tmp_path / f"d{len(made)}"
        base.mkdir()
        config = base / "config.toml"
        config.write_text(f"workers = 1\ncache_size = 1073741824\n{DEMAND_ONLY}\n{extra}\n"
                          f"[registry]\nhosts_dir = \"{base / 'certs.d'}\"\ntimeout = {REGISTRY_TIMEOUT}\n"
                          f"retries = {RETRIES}\nbackoff = {BACKOFF}\n{registry_extra}\n")
        d = DaemonProc(root=base / "root", socket=str(base / "run" / "lazyd.sock"), config=config,
                       log=base / "lazyd.log")
        made.append(d)
        d.start()
        mp = d.mountpoint("layer")
        ref = fault_image.image.ref.replace(fault_image.image.ref.split("/", 1)[0], host, 1)
        with d.client() as c:
            res = c.mount(ref, fault_image.layer.digest, str(mp), fault_image.layer.toc_digest)
        return Mounted(d, mp, res.mount_id, res.worker_pid)

    try:
        yield make
    finally:
        for d in made:
            d.cleanup()


@dataclass(frozen=True)
class Read:
    """One read of a whole file: its bytes or the error, and when it started and ended (monotonic)."""

    result: bytes | OSError
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def timed_read(path: Path) -> Read:
    start = time.monotonic()
    try:
        data: bytes | OSError = path.read_bytes()
    except OSError as exc:
        data = exc
    return Read(data, start, time.monotonic())


# -- measurements ------------------------------------------------------------------------

@dataclass
class Measurement:
    """One row of docs/reliability.md's table, as measured."""

    test: str
    fault: str
    reader_sees: str
    registry_gets: int
    faulted_gets: int
    read_seconds: float
    eio_after_seconds: float | None = None
    recover_seconds: float | None = None
    extra: dict[str, float | int | str] = field(default_factory=dict)


@dataclass
class FaultReport:
    rows: list[Measurement] = field(default_factory=list)

    def add(self, row: Measurement) -> None:
        self.rows.append(row)
        print(f"\n[faults] {json.dumps(asdict(row))}")

    def table(self) -> list[str]:
        out = []
        for r in self.rows:
            eio = f"{r.eio_after_seconds:.2f}" if r.eio_after_seconds is not None else "-"
            rec = f"{r.recover_seconds:.2f}" if r.recover_seconds is not None else "-"
            out.append(f"{r.fault:<34} {r.reader_sees:<22} gets={r.registry_gets:<3} faulted={r.faulted_gets:<3} "
                       f"read={r.read_seconds:6.2f}s eio_after={eio:>6} recover={rec:>6}  {r.test}")
        return out


REPORT_KEY = pytest.StashKey[FaultReport]()


@pytest.fixture(scope="session")
def fault_report(request: pytest.FixtureRequest) -> Iterator[FaultReport]:
    report = FaultReport()
    request.config.stash[REPORT_KEY] = report
    yield report
    out_dir = os.environ.get("LAZYD_FAULTS_RESULTS")
    if out_dir and report.rows:
        path = Path(out_dir) / f"faults-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(r) for r in report.rows], indent=1) + "\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    report = config.stash.get(REPORT_KEY, None)
    if report is not None and report.rows:
        terminalreporter.section("registry faults: what a reader saw (measured)")
        for line in report.table():
            terminalreporter.write_line(line)


# -- a small aiohttp app (the token server) in a thread of its own ------------------------

class AppThread:
    """Serve an aiohttp app on 127.0.0.1 from its own event-loop thread; ``port`` once started."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="app-thread", daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> AppThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # no public accessor
