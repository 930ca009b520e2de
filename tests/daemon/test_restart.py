"""Fetcher crashes and worker deaths must not lose mounts."""

from __future__ import annotations

import os
import signal
from pathlib import Path
import tarfile
import threading
import time

from lazyd.api.messages import ApiError
from tests.daemon.conftest import DaemonProc, via
from tests.support.treecheck import check_tree
from tests.support.estargz_images import EStargzImage
from tests.support.procs import pid_alive, wait_until
from tests.support.tcpproxy import TCPProxy

NO_BACKGROUND = "prefetch = false\nbackground_fetch = false"


def test_kill9_fetcher_during_read_then_restart_adopts(daemon_factory, busybox: EStargzImage,
                                                       proxy: TCPProxy) -> None:
    d: DaemonProc = daemon_factory(extra=NO_BACKGROUND).start()
    layer = busybox.layers[1]
    mp = d.mountpoint("crash")
    with d.client() as c:
        mount = c.mount(via(busybox.ref, proxy), layer.digest, str(mp), layer.toc_digest)
    with tarfile.open(layer.tar) as tar:
        want = tar.extractfile("data/big.bin").read()
    proxy.delay = 0.03  # slow link: the read below takes several seconds
    got: list[bytes | Exception] = []

    def read() -> None:
        try:
            got.append((mp / "data/big.bin").read_bytes())
        except OSError as exc:
            got.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: proxy.range_requests(layer.digest), 10, "the read to reach the registry")
    time.sleep(0.3)
    assert reader.is_alive(), "the read finished before the crash; slow the proxy down"
    d.kill9()
    time.sleep(0.5)
    # The workers survive and keep the mount; cached parts stay readable.
    assert os.path.ismount(mp)
    assert all(pid_alive(pid) for pid in d.worker_pids())
    d.start()
    reader.join(60)
    assert got == [want], "the read must finish with the right bytes once the new fetcher is up"
    proxy.delay = 0.0
    check_tree(mp, layer.tar)
    with d.client() as c:
        st = c.status()
    (m,) = st.mounts
    assert (m.mount_id, m.mountpoint, m.state) == (mount.mount_id, str(mp), "ready")
    assert m.worker_pid == mount.worker_pid, "the worker was adopted, not replaced"


def test_killed_worker_is_restarted_and_mounts_reestablished(daemon_factory, busybox: EStargzImage) -> None:
    d: DaemonProc = daemon_factory(workers=1).start()
    mps = d.mount_layers(busybox, "w")
    with d.client() as c:
        (old_pid,) = d.worker_pids()
        os.kill(old_pid, signal.SIGKILL)
        seen_broken = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                st = c.status()
            except ApiError:
                continue
            states = {m.state for m in st.mounts}
            seen_broken |= "broken" in states
            if states == {"ready"} and st.workers[0].pid != old_pid and st.workers[0].state == "ready":
                break
            time.sleep(0.02)
        assert seen_broken, "status must report the mounts of a dead worker as broken"
        assert st.workers[0].restarts == 1 and st.workers[0].pid != old_pid
        assert {m.worker_pid for m in st.mounts} == {st.workers[0].pid}
        check = c.check(str(mps[0]))
        assert check.served and check.registry_reachable and check.state == "ready"
    for layer, mp in zip(busybox.layers, mps):
        check_tree(mp, layer.tar)


# Mounts spread over every worker by load alone (xattr-free workers would take every layer
# without extended attributes first: docs/design.md, "Workers without extended attributes").
SPREAD = "xattr_free_workers = false"


def test_sigterm_keeps_mounts_and_restart_replaces_a_worker_that_died_meanwhile(
        daemon_factory, busybox: EStargzImage) -> None:
    d: DaemonProc = daemon_factory(workers=2, extra=SPREAD).start()
    mps = d.mount_layers(busybox, "t")
    with d.client() as c:
        st = c.status()
    assert {m.worker_id for m in st.mounts} == {0, 1}, "mounts are spread over the workers"
    # Read once so the chunk is in the store, then drop the page cache so the read after
    # SIGTERM really goes to the worker (background fetch waits for idle, so it may not have).
    assert (mps[0] / "etc/hello.txt").read_text() == "hello from lazyd\n"
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    with d.client() as c:
        before = {m.layer_digest: m.layer for m in c.status().mounts}
    assert all(stats.registry_requests > 0 for stats in before.values())
    assert any(stats.fetched_bytes > 0 for stats in before.values())  # at least hello.txt's chunk
    d.proc.stop(signal.SIGTERM)  # stops the fetcher only
    assert all(os.path.ismount(mp) for mp in mps)
    assert (mps[0] / "etc/hello.txt").read_text() == "hello from lazyd\n"  # cached: served without a fetcher
    victim = next(m for m in st.mounts if m.mountpoint == str(mps[1]))
    os.kill(victim.worker_pid, signal.SIGKILL)
    time.sleep(0.3)
    d.start()
    with d.client() as c:
        st2 = c.status()
    assert {m.state for m in st2.mounts} == {"ready"}
    pids = {m.mountpoint: m.worker_pid for m in st2.mounts}
    assert pids[str(mps[1])] != victim.worker_pid
    survivor = next(m for m in st.mounts if m.mountpoint == str(mps[0]))
    assert pids[str(mps[0])] == survivor.worker_pid, "the live worker is adopted"
    # Per-layer counters carry over the restart (counters.json), like the cache itself.
    for m in st2.mounts:
        old, new = before[m.layer_digest], m.layer
        assert new.fetched_bytes >= old.fetched_bytes and new.registry_requests >= old.registry_requests, (old, new)
        assert new.demand_bytes >= old.demand_bytes and new.prefetch_bytes >= old.prefetch_bytes
    for layer, mp in zip(busybox.layers, mps):
        check_tree(mp, layer.tar)


def test_lowering_workers_adopts_the_extra_worker_which_drains_and_stops(
        daemon_factory, busybox: EStargzImage) -> None:
    """After ``workers`` is lowered, a restarted fetcher adopts every live worker: the extra
    one keeps serving its mounts (not reported broken), gets no new mount, and stops once it
    serves nothing."""
    d: DaemonProc = daemon_factory(workers=2, extra=f"{NO_BACKGROUND}\n{SPREAD}").start()
    mps = d.mount_layers(busybox, "w")
    with d.client() as c:
        st = c.status()
    extra = [m for m in st.mounts if m.worker_id == 1]
    assert extra, "mounts are spread over both workers"
    extra_pid = extra[0].worker_pid
    d.proc.stop(signal.SIGTERM)  # the fetcher only: the workers and their mounts stay
    d.config.write_text(d.config.read_text().replace("workers = 2", "workers = 1"))
    d.workers = None  # status lists the draining worker beside the configured one
    d.start()
    with d.client() as c:
        wait_until(lambda: c.status().workers and all(m.state == "ready" for m in c.status().mounts), 30,
                   "the mounts to be restored")
        st2 = c.status()
        assert {(w.worker_id, w.state) for w in st2.workers} == {(0, "ready"), (1, "draining")}
        assert {m.mount_id: m.worker_pid for m in st2.mounts if m.worker_id == 1} == \
            {m.mount_id: extra_pid for m in extra}, "the extra worker's mounts are adopted, not moved"
        for layer, mp in zip(busybox.layers, mps):
            check_tree(mp, layer.tar)
        # A new mount goes to a configured worker, never to the draining one.
        mp = d.mountpoint("new")
        c.mount(busybox.ref, busybox.layers[0].digest, str(mp),
                busybox.layers[0].toc_digest)
        assert next(m for m in c.status().mounts if m.mountpoint == str(mp)).worker_id == 0
        for m in extra:
            c.unmount(m.mountpoint)
        st3 = c.status()
        assert [w.worker_id for w in st3.workers] == [0]
        assert all(m.worker_id == 0 and m.state == "ready" for m in st3.mounts)
    wait_until(lambda: not Path(f"/proc/{extra_pid}").exists() or
               Path(f"/proc/{extra_pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z",
               15, "the drained worker to exit")
    for mp_ in mps:
        if str(mp_) not in {m.mountpoint for m in extra}:
            assert os.path.ismount(mp_)
