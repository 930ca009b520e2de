"""Events worth knowing, in the metrics and in the log (``log_format`` text and json): mounts, a worker
killed and restarted, the fetcher restarted and adopting its worker and mount, unmounts."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.support.estargz_images import EStargzImage
from tests.support.procs import wait_until

from .conftest import DEMAND_ONLY, MetricsFactory
from .scrape import scrape

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (lazyd|worker\d+) (DEBUG|INFO|WARNING|ERROR) \S+: ")
JSON_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def records(path: Path, log_format: str, process: str) -> list[dict[str, object]]:
    """Every line of a log as a record (``message`` and, for json, all fields); a line that is not
    in ``log_format`` fails the test."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if log_format == "json":
            record = json.loads(line)
            assert isinstance(record, dict), line
            assert {"time", "level", "logger", "message", "process"} <= set(record), line
            assert JSON_TIME.match(str(record["time"])) and record["process"] == process, line
            assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR"), line
            out.append(record)
        else:
            m = TEXT_LINE.match(line)
            assert m is not None and m.group(1) == process, f"not a text log line of {process}: {line!r}"
            out.append({"level": m.group(2), "message": line[m.end():]})
    return out


def one(recs: list[dict[str, object]], pattern: str, level: str = "INFO") -> dict[str, object]:
    """The record whose message matches ``pattern`` (exactly one), at ``level``."""
    found = [r for r in recs if re.search(pattern, str(r["message"]))]
    assert len(found) == 1, f"{len(found)} records match {pattern!r}: {found}"
    assert found[0]["level"] == level, found[0]
    return found[0]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_restart_and_adoption_counted_and_logged(metrics_daemon: MetricsFactory, busybox: EStargzImage,
                                                 log_format: str) -> None:
    md = metrics_daemon(extra=f'log_format = "{log_format}"\n{DEMAND_ONLY}')
    d = md.daemon
    layer = busybox.layers[0]
    mp = d.mountpoint("l0")
    with d.client() as c:
        c.mount(busybox.ref, layer.digest, str(mp), layer.toc_digest)
        assert (mp / "etc" / "hello.txt").read_text() == "hello from lazyd\n"
        (worker,) = c.status().workers
    # kill -9 the worker: the fetcher starts another and mounts the layer again
    os.kill(worker.pid, signal.SIGKILL)

    def restarted() -> bool:
        with d.client() as c:
            st = c.status()
        return st.workers[0].restarts == 1 and st.workers[0].state == "ready" and st.mounts[0].state == "ready"

    wait_until(restarted, 30, "the worker to be restarted and the mount re-established")
    s = scrape(md.address)
    assert s.value("lazyd_worker_restarts_total") == 1
    assert s.value("lazyd_mounts_reestablished_total") == 1
    assert (s.value("lazyd_workers_adopted_total"), s.value("lazyd_mounts_adopted_total")) == (0, 0)
    assert (mp / "etc" / "hello.txt").read_text() == "hello from lazyd\n"
    with d.client() as c:
        new_pid = c.status().workers[0].pid

    # The fetcher stops (SIGTERM: the worker and its mount stay) and a new one adopts them.
    assert d.lazyd is not None
    d.lazyd.stop(signal.SIGTERM)
    d.start()
    s = scrape(md.address)
    assert (s.value("lazyd_workers_adopted_total"), s.value("lazyd_mounts_adopted_total")) == (1, 1)
    assert (s.value("lazyd_worker_restarts_total"), s.value("lazyd_mounts_reestablished_total")) == (0, 0)
    assert s.value("lazyd_mounts", state="ready") == 1
    with d.client() as c:
        c.unmount(str(mp))
    d.shutdown()

    recs = records(d.log, log_format, "lazyd")
    digest = re.escape(layer.digest)
    mounted = one(recs, rf"^mounted layer {digest} of {re.escape(busybox.ref)} at {re.escape(str(mp))} ")
    died = one(recs, rf"^worker 0 \(pid {worker.pid}\) died$", "ERROR")
    restart = one(recs, rf"^restarted worker 0 \(pid {new_pid}, was {worker.pid}; restart 1\)")
    again = one(recs, rf"^re-established mount \w+ at {re.escape(str(mp))} on worker 0 \(layer {digest}\)$")
    adopted_worker = one(recs, rf"^adopted worker 0 \(pid {new_pid}\) with 1 mount\(s\)$")
    adopted_mount = one(recs, rf"^adopted mount \w+ at {re.escape(str(mp))} \(layer {digest}, worker 0\)$")
    unmounted = one(recs, rf"^unmounted layer {digest} from {re.escape(str(mp))} ")
    if log_format == "json":
        assert (mounted["event"], mounted["layer"], mounted["mountpoint"]) == ("mount", layer.digest, str(mp))
        assert isinstance(mounted["seconds"], float) and mounted["logger"] == "lazyd.fetcher.daemon"
        assert (died["event"], died["pid"]) == ("worker_death", worker.pid)
        assert (restart["event"], restart["pid"], restart["old_pid"]) == ("worker_restart", new_pid, worker.pid)
        assert (again["event"], again["reestablished"]) == ("mount", True)
        assert (adopted_worker["event"], adopted_worker["mounts"]) == ("adoption", 1)
        assert (adopted_mount["event"], adopted_mount["layer"]) == ("adoption", layer.digest)
        assert unmounted["event"] == "unmount"
    # The workers log in the same format.
    worker_recs = records(d.root / "workers" / "0" / "worker.log", log_format, "worker0")
    assert any(str(r["message"]).startswith("mounted ") for r in worker_recs)
