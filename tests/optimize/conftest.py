"""Fixtures of the ``lazyctl image optimize`` tests, shared by the whole directory (built once).

One registry; one lazyd stack (``lazyd serve`` + ``lazyd snapshotter`` + containerd, tests/e2e's
``Stack``) whose containerd also runs the profiled workloads; the debian+python3 image made by
debootstrap + umoci (python3 in the upper layer, whose parent directories that layer leaves
out) pushed plain and as eStargz.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.images import cached_estargz, lazyd_builder
from tests.support.images import debian_python_layout, push
from tests.support.procs import prefer_this_interpreters_tools
from tests.support.registry import Registry, running_registry


def pytest_configure(config: pytest.Config) -> None:
    prefer_this_interpreters_tools()  # lazyd/lazyctl started by name are the ones under test


@dataclass(frozen=True)
class OptImages:
    debian_plain: str  # the umoci layout as is (gzip layers, not eStargz)
    debian_esgz: str   # the same layers converted by lazyd's writer, unprioritized
    layout: Path       # the umoci layout (tag ``latest``)


@pytest.fixture(scope="session")
def opt_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("opt-registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def opt_images(opt_registry: Registry) -> OptImages:
    layout = debian_python_layout()
    esgz = cached_estargz(layout, "latest", lazyd_builder)
    return OptImages(debian_plain=push(f"oci:{layout}:latest", opt_registry.host, "debian-python:plain"),
                     debian_esgz=push(esgz, opt_registry.host, "debian-python:esgz"), layout=layout)


@pytest.fixture(scope="session")
def opt_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Mounts wait for their prefetch, and nothing is fetched in the background: every byte that
    # reaches the registry is either prefetched or read on demand, so the counters say which.
    s = Stack(tmp_path_factory.mktemp("opt-stack"), config={"prefetch_wait": True, "background_fetch": False})
    try:
        yield s.start()
    finally:
        s.close()


PY_CMD = ["python3", "-c", "import json, email, http.server"]


def lazyctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["lazyctl", *args], capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"lazyctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass(frozen=True)
class Optimized:
    ref: str                 # the pushed DST
    summary: dict[str, Any]  # lazyctl image optimize --json
    record: Path             # its --record-out
    seconds: float           # wall time of the command


@pytest.fixture(scope="session")
def optimized(opt_stack: Stack, opt_images: OptImages, tmp_path_factory: pytest.TempPathFactory) -> Optimized:
    """``lazyctl image optimize`` of the plain (not eStargz) debian+python3 image for PY_CMD."""
    record = tmp_path_factory.mktemp("opt-record") / "record.jsonl"
    dst = opt_images.debian_plain.rsplit(":", 1)[0] + ":optimized"
    started = time.monotonic()
    out = lazyctl("image", "optimize", "--plain-http", "--json", "--socket", str(opt_stack.lazyd_socket),
                  "--address", opt_stack.address, "--entrypoint", json.dumps(PY_CMD[:1]),
                  "--args", json.dumps(PY_CMD[1:]), "--record-out", str(record), opt_images.debian_plain, dst)
    return Optimized(dst, json.loads(out.stdout), record, time.monotonic() - started)
