"""Hypothesis profiles, per-target case counts and shared guards for the fuzz tests.

Profiles: ``fuzz-ci`` (the default: 200 cases per target, for the test suite) and ``long``
(10,000 cases per target; ``scripts/fuzz``), both without a deadline: a hang is caught by each
case's own time limit (``guarded``, socket timeouts).  The profile is chosen with
``LAZYD_FUZZ_PROFILE`` and applied per test through ``FUZZ`` (never loaded as the default),
so other test packages' hypothesis settings are untouched.

Each fuzz test calls ``cases.hit()`` once per case; the counts and the time of every
target are printed at the end of the run and, with ``LAZYD_FUZZ_REPORT=<file>``, written
there as JSON.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("fuzz-ci", max_examples=200, deadline=None, database=None, suppress_health_check=_HEALTH)
settings.register_profile("long", max_examples=10_000, deadline=None, database=None, suppress_health_check=_HEALTH)

PROFILE = os.environ.get("LAZYD_FUZZ_PROFILE", "fuzz-ci")
if PROFILE not in ("fuzz-ci", "long"):
    raise pytest.UsageError(f"LAZYD_FUZZ_PROFILE={PROFILE!r}: use 'fuzz-ci' or 'long'")
FUZZ = settings(settings.get_profile(PROFILE))
"""The settings of every fuzz target (``@FUZZ`` above ``@given``)."""

CASE_SECONDS = 10.0
"""No single case may take longer than this: a parser that does is treated as hanging."""

T = TypeVar("T")


class CaseCounter:
    """Cases run per test (node id), the time each test took, and measurements."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.seconds: dict[str, float] = {}
        self.measurements: dict[str, str] = {}
        self.current = ""

    def __repr__(self) -> str:  # hypothesis prints it with every failing case
        return "CaseCounter()"

    def hit(self) -> None:
        self.counts[self.current] += 1

    def measure(self, what: str, value: str) -> None:
        """Record a measurement (printed with the counts)."""
        self.measurements[what] = value


_COUNTER = pytest.StashKey[CaseCounter]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_COUNTER] = CaseCounter()


@pytest.fixture(scope="session")
def cases(pytestconfig: pytest.Config) -> CaseCounter:
    """The run's case counter (session-scoped, so hypothesis accepts it)."""
    return pytestconfig.stash[_COUNTER]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    counter = item.config.stash.get(_COUNTER, None)
    if counter is None:
        yield
        return
    counter.current = item.nodeid
    start = time.monotonic()
    try:
        yield
    finally:
        counter.seconds[item.nodeid] = counter.seconds.get(item.nodeid, 0.0) + time.monotonic() - start
        counter.current = ""


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    counter = config.stash.get(_COUNTER, None)
    if counter is None or not (counter.counts or counter.measurements):
        return
    terminalreporter.section(f"fuzz cases (profile {PROFILE})")
    for nodeid in sorted(counter.counts):
        terminalreporter.write_line(f"{counter.counts[nodeid]:>8} cases {counter.seconds.get(nodeid, 0.0):8.1f} s  "
                                    f"{nodeid}")
    for what, value in sorted(counter.measurements.items()):
        terminalreporter.write_line(f"{what}: {value}")
    report = os.environ.get("LAZYD_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({
            "profile": PROFILE,
            "targets": {n: {"cases": counter.counts[n], "seconds": round(counter.seconds.get(n, 0.0), 3)}
                        for n in sorted(counter.counts)},
            "measurements": counter.measurements,
        }, indent=2))


# -- guards ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one guarded call did: its result or the allowed error, its peak allocation and time."""

    result: Any
    error: BaseException | None
    peak: int
    seconds: float


def guarded(fn: Callable[[], T], allowed: tuple[type[BaseException], ...], *, max_bytes: int,
            max_seconds: float = CASE_SECONDS) -> Outcome:
    """Run ``fn``: only the ``allowed`` errors may escape it (any other propagates and fails
    the case), it must allocate at most ``max_bytes`` (tracemalloc peak) and return within
    ``max_seconds``.

    tracemalloc counts every thread of the process (a proxy thread of another test module may
    still be running), so a peak over the limit is measured once more and the smaller one
    counts: ``fn`` is a pure parse, so a real excess shows both times."""
    out = _guarded_once(fn, allowed)
    if out.peak > max_bytes:
        again = _guarded_once(fn, allowed)
        if again.peak < out.peak:
            out = again
    assert out.peak <= max_bytes, f"allocated {out.peak} bytes (limit {max_bytes})"
    assert out.seconds <= max_seconds, f"took {out.seconds:.1f} s (limit {max_seconds} s)"
    return out


def _guarded_once(fn: Callable[[], T], allowed: tuple[type[BaseException], ...]) -> Outcome:
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except allowed as exc:
        error = exc
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - base
        if not was_tracing:
            tracemalloc.stop()
    return Outcome(result, error, peak, seconds)


@pytest.fixture(scope="session")
def fuzz_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session directory for files the fuzz tests build once (session-scoped for hypothesis)."""
    yield tmp_path_factory.mktemp("fuzz")
