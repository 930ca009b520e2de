"""Crashes under containers that are reading (issue 13): ``kill -9`` of ``lazyd serve``, and of a FUSE worker.

Each container runs a read loop: ``sha256sum`` of every file of the python library (1140
files, all in the image's second layer), eight files per process. The registry is reached
through a slow proxy and background fetch is off, so the loops really wait for fetches
when the crash comes. Every hash is checked against the layer tars.

What a container sees, as measured here (and asserted below):

* ``lazyd serve`` killed: nothing fails. Reads of cached chunks go on; a read that needs
  the network blocks (for at most ``fetch_timeout``) and completes with the right bytes
  once a new ``lazyd serve`` has adopted the workers: same mount ids, same worker pids.
  A read still waiting after ``fetch_timeout`` fails with EIO; the same read works once
  the fetcher is back, without a remount. The ``read()`` a program makes waits *twice*
  ``fetch_timeout``: the kernel retries a failed readahead READ with a one-page READ.
* A FUSE worker killed: the fetcher starts a new worker and re-establishes the mounts
  (same mount ids, new worker pid) within about a second, and new containers work. A
  container that was running keeps the dead FUSE superblock in its overlay: from the
  kill on, every read of file data not already in the page cache fails with ENOTCONN
  ("Transport endpoint is not connected"), and so does every path lookup that reaches
  the dead layer, even for files of the *other*, healthy layer (overlay looks a name up
  in each lower layer that has the parent directory, and a lookup error other than
  ENOENT fails the whole lookup): ``/etc/debian_version``, which only the first layer
  holds, fails because the second layer has an ``/etc``. Exec of a binary whose path
  was never looked up fails the same way. Only cached dentries and page-cached data
  (and empty files) still work.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.images import _blob, manifest_of
from tests.support.procs import pid_alive, wait_until
from tests.support.registry import Registry
from tests.support.tcpproxy import TCPProxy

from .conftest import HELLO, SNAPSHOTTER, Images, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PYLIB = "/usr/lib/python3"  # /usr/lib/python3 and /usr/lib/python3.11: all in the image's second layer
PROBE = "/usr/bin/python3.11"  # 6.8 MB in the second layer that no read loop touches
BASE_ONLY = "/etc/debian_version"  # only the first layer has it; the second layer has an /etc too
PROXY_DELAY = 0.15  # seconds per 64 KiB forwarded per connection: the loops take about 20 s
KILL_AFTER = 100  # files each loop has hashed when the crash comes (of 1140)
GAP = 3.0  # seconds without a lazyd serve
FETCH_TIMEOUT = 3.0
ORDERS = {  # how each container's loop orders the files (find prints "size<TAB>path")
    "name": "sort -k2",
    "reverse": "sort -r -k2",
    "size": "sort -n",
}
ENOTCONN_TEXT = os.strerror(errno.ENOTCONN)  # "Transport endpoint is not connected"
EIO_TEXT = os.strerror(errno.EIO)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
HASH_LINE = re.compile(r"^(?P<sha>[0-9a-f]{64})  (?P<path>/.+)$")
ERROR_LINE = re.compile(r"^sha256sum: (?P<path>/.+): (?P<error>[^:]+)$")
EXIT_LINE = re.compile(r"^exit (?P<rc>\d+)$")


def image_hashes(layout: Path, wanted: Callable[[str], bool]) -> dict[str, str]:
    """sha256 of every regular file of the image (layers applied in order, whiteouts too) whose path is ``wanted``."""
    _, manifest = manifest_of(layout, "latest")
    files: dict[str, str] = {}
    for desc in manifest["layers"]:
        with tarfile.open(_blob(layout, desc["digest"]), "r:gz") as tar:
            for member in tar:
                name = "/" + member.name.lstrip("./").rstrip("/")
                parent, base = name.rsplit("/", 1)
                if base.startswith(".wh."):
                    gone = parent if base == ".wh..wh..opq" else f"{parent}/{base[4:]}"
                    files = {p: h for p, h in files.items() if not (p == gone or p.startswith(gone + "/"))}
                    continue
                files.pop(name, None)
                if wanted(name) and (member.isfile() or member.islnk()):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    files[name] = hashlib.sha256(data).hexdigest()
    return files


def python_lib_hashes(layout: Path) -> dict[str, str]:
    files = image_hashes(layout, lambda name: name.startswith(PYLIB))
    assert len(files) > 500, f"the image has only {len(files)} files below {PYLIB}*"
    return files


def task_pid(stack: Stack, container: str) -> int:
    """The host pid of ``container``'s init process (``ctr tasks ls``)."""
    for line in stack.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container:
            return int(fields[1])
    raise AssertionError(f"container {container} has no task")


@dataclass
class ReadLoop:
    """A shell loop hashing the python library in ``container`` (``ctr tasks exec``), eight files per ``sha256sum``.

    Its output goes to a file in the container: ``ctr tasks exec`` lost up to a quarter of
    the lines of such a stream here (it stops copying once the process has exited). The
    test tails that file through ``/proc/<task pid>/root`` and timestamps each line as it appears.
    """

    stack: Stack
    container: str
    exec_id: str
    order: str
    lines: list[tuple[float, str]] = field(default_factory=list)
    popen: subprocess.Popen[str] | None = None
    _root: Path | None = None
    _tail: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def listing(self) -> str:
        return f"/tmp/files-{self.exec_id}"

    @property
    def output(self) -> str:
        return f"/tmp/out-{self.exec_id}"

    def script(self) -> str:
        return (f"find {PYLIB}* -type f -printf '%s\\t%p\\n' | {ORDERS[self.order]} | cut -f2 > {self.listing} && "
                f"xargs -d '\\n' -n 8 sha256sum < {self.listing} >> {self.output} 2>&1; echo exit $? >> {self.output}")

    def start(self) -> "ReadLoop":
        self._root = Path(f"/proc/{task_pid(self.stack, self.container)}/root")
        self.popen = subprocess.Popen(
            ["ctr", "--address", self.stack.address, "tasks", "exec", "--exec-id", self.exec_id, self.container,
             "sh", "-c", self.script()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._tail = threading.Thread(target=self._follow, name=f"readloop-{self.exec_id}", daemon=True)
        self._tail.start()
        return self

    def _follow(self) -> None:
        assert self.popen is not None and self._root is not None
        out = self._root / self.output.lstrip("/")
        pos, partial = 0, b""
        while True:
            finished = self.popen.poll() is not None
            try:
                with open(out, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            pos += len(data)
            now = time.monotonic()
            *complete, partial = (partial + data).split(b"\n")
            with self._lock:
                self.lines.extend((now, line.decode(errors="replace")) for line in complete)
            if finished:
                return
            time.sleep(0.05)

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def done_count(self) -> int:
        return sum(1 for _, line in self.snapshot() if HASH_LINE.match(line) or ERROR_LINE.match(line))

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def files(self) -> list[str]:
        """The files in the order the loop reads them."""
        assert self._root is not None
        return (self._root / self.listing.lstrip("/")).read_text().splitlines()

    def wait(self, timeout: float) -> None:
        assert self.popen is not None and self._tail is not None
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
            raise AssertionError(f"read loop {self.exec_id} in {self.container} did not finish in {timeout:.0f}s; "
                                 f"{self.done_count()} files done; last lines {self.snapshot()[-3:]}") from None
        self._tail.join(10)
        assert self.popen.returncode == 0, f"ctr tasks exec {self.exec_id} exited {self.popen.returncode}: {out}{err}"

    def result(self) -> tuple[dict[str, str], dict[str, str], int | None]:
        """(hashes by path, error texts by path, the loop's exit status); raises on a line that is neither."""
        hashes: dict[str, str] = {}
        errors: dict[str, str] = {}
        rc: int | None = None
        for _, line in self.snapshot():
            if m := HASH_LINE.match(line):
                hashes[m["path"]] = m["sha"]
            elif m := ERROR_LINE.match(line):
                errors[m["path"]] = m["error"]
            elif m := EXIT_LINE.match(line):
                rc = int(m["rc"])
            else:
                raise AssertionError(f"unexpected line from read loop {self.exec_id}: {line!r}")
        return hashes, errors, rc


def _proxied(ref: str, registry: Registry, proxy: TCPProxy) -> str:
    assert ref.startswith(registry.host + "/"), ref
    return proxy.host + ref[len(registry.host):]


def _mounts(stack: Stack) -> dict[str, tuple[int, str, str]]:
    """mount_id -> (worker_pid, state, layer digest), from ``lazyctl status --json``."""
    return {m["mount_id"]: (m["worker_pid"], m["state"], m["layer_digest"]) for m in stack.status()["mounts"]}


def _progress(loops: list[ReadLoop]) -> dict[str, int]:
    return {loop.container: loop.done_count() for loop in loops}


def _sha256_in(stack: Stack, container: str, exec_id: str, path: str) -> subprocess.CompletedProcess[str]:
    return stack.ctr("tasks", "exec", "--exec-id", exec_id, container, "sha256sum", path, check=False)


@pytest.mark.lazyd_config(background_fetch=False, prefetch=False)
def test_kill9_fetcher_while_containers_read(stack: Stack, images: Images, registry: Registry) -> None:
    expected = python_lib_hashes(images.debian_esgz_layout)
    (probe_sha,) = image_hashes(images.debian_esgz_layout, lambda name: name == PROBE).values()
    with TCPProxy(registry.port) as proxy:
        ref = _proxied(images.debian_esgz, registry, proxy)
        assert {layer["mode"] for layer in stack.rpull(ref)["layers"]} == {"lazy"}
        for name in ORDERS:
            stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, name, "sleep", "600")
        before = _mounts(stack)
        assert {state for _, state, _ in before.values()} == {"ready"}, before
        proxy.delay = PROXY_DELAY
        loops = [ReadLoop(stack, name, f"read-{name}", name).start() for name in ORDERS]
        wait_until(lambda: min(_progress(loops).values()) >= KILL_AFTER, 90, f"every loop to hash {KILL_AFTER} files")
        at_kill = _progress(loops)
        assert all(loop.running() for loop in loops) and max(at_kill.values()) < len(expected), at_kill

        t_kill = time.monotonic()
        stack.lazyd.stop(signal.SIGKILL)
        # A file nothing has read yet, read in a running container while no fetcher runs.
        probe = subprocess.Popen(["ctr", "--address", stack.address, "tasks", "exec", "--exec-id", "probe", "name",
                                  "sha256sum", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        timeline = []
        while time.monotonic() < t_kill + GAP:
            time.sleep(0.5)
            timeline.append((round(time.monotonic() - t_kill, 1), _progress(loops)))
        assert all(pid_alive(pid) for pid, _, _ in before.values()), "the FUSE workers must outlive lazyd serve"
        assert probe.poll() is None, f"a read that needs the registry finished without a fetcher: {probe.communicate()}"
        assert all(loop.running() for loop in loops), f"a loop finished without a fetcher: {timeline}"
        for loop in loops:
            _, errors, _ = loop.result()
            assert not errors, f"reads failed while lazyd serve was down: {errors}"

        t_restart = time.monotonic()
        stack.start_lazyd()
        t_up = time.monotonic()
        out, err = probe.communicate(timeout=120)
        t_probe = time.monotonic()
        assert probe.returncode == 0, f"the read waiting during the outage failed: {out}{err}"
        assert out.split()[0] == probe_sha
        for loop in loops:
            loop.wait(120)
        t_end = time.monotonic()
        for loop in loops:
            hashes, errors, rc = loop.result()
            assert not errors and rc == 0, f"{loop.container}: {errors} (exit {rc})"
            assert hashes == expected, f"{loop.container}: {len(set(expected) - set(hashes))} files missing, " \
                f"{sum(hashes.get(p) != h for p, h in expected.items() if p in hashes)} with wrong bytes"

        after = _mounts(stack)
        assert after == before, "the new lazyd serve adopts every mount: same ids, same worker pids, ready"
        assert stack.run(ref, "new", "python3", "-c", f"print({HELLO!r})").stdout == HELLO + "\n"
        resumed = {loop.container: round(min(t for t, _ in loop.snapshot() if t > t_restart) - t_restart, 2)
                   for loop in loops}
        print(f"\nkill at {at_kill} files; progress while down {timeline}; restart took {t_up - t_restart:.2f}s; "
              f"loops resumed {resumed}s after the restart began; probe waited {t_probe - t_kill:.1f}s; "
              f"loops done {t_end - t_kill:.1f}s after the kill; {proxy.bytes_down} bytes through the proxy")


@pytest.mark.lazyd_config(background_fetch=False, prefetch=False, fetch_timeout=FETCH_TIMEOUT)
def test_read_waiting_for_a_dead_fetcher_fails_with_eio_after_fetch_timeout(stack: Stack, images: Images) -> None:
    (probe_sha,) = image_hashes(images.debian_esgz_layout, lambda name: name == PROBE).values()
    stack.rpull(images.debian_esgz)
    stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, images.debian_esgz, "c", "sleep", "600")
    cached = "/usr/lib/python3.11/os.py"
    first = _sha256_in(stack, "c", "e0", cached)
    assert first.returncode == 0, first
    before = _mounts(stack)
    stack.lazyd.stop(signal.SIGKILL)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")  # so the cached file's read really reaches the worker
    assert _sha256_in(stack, "c", "e1", cached).stdout == first.stdout, "cached chunks are served without a fetcher"
    t0 = time.monotonic()
    failed = _sha256_in(stack, "c", "e2", PROBE)
    waited = time.monotonic() - t0
    assert failed.returncode != 0 and f"{PROBE}: {EIO_TEXT}" in failed.stderr, failed
    # The kernel retries a failed readahead READ with a one-page READ, which waits fetch_timeout again.
    assert 2 * FETCH_TIMEOUT <= waited < 2 * FETCH_TIMEOUT + 3, \
        f"the read failed after {waited:.1f}s, not after twice fetch_timeout ({FETCH_TIMEOUT} s)"
    stack.start_lazyd()
    again = _sha256_in(stack, "c", "e3", PROBE)
    assert again.returncode == 0 and again.stdout.split()[0] == probe_sha, again
    assert _mounts(stack) == before
    print(f"\nread failed with EIO after {waited:.2f}s (fetch_timeout {FETCH_TIMEOUT} s)")


# xattr_free_workers off: the layers spread over the two workers by load alone (docs/design.md).
@pytest.mark.lazyd_config(background_fetch=False, prefetch=False, workers=2, xattr_free_workers=False)
def test_kill9_worker_while_container_reads(stack: Stack, images: Images, registry: Registry) -> None:
    expected = python_lib_hashes(images.debian_esgz_layout)
    (base_only_sha,) = image_hashes(images.debian_esgz_layout, lambda name: name == BASE_ONLY).values()
    _, manifest = manifest_of(images.debian_esgz_layout, "latest")
    base_digest, python_digest = (layer["digest"] for layer in manifest["layers"])
    with TCPProxy(registry.port) as proxy:
        ref = _proxied(images.debian_esgz, registry, proxy)
        assert {layer["mode"] for layer in stack.rpull(ref)["layers"]} == {"lazy"}
        stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "old", "sleep", "600")
        before = _mounts(stack)
        ((victim_mount, (victim, _, _)),) = [(k, v) for k, v in before.items() if v[2] == python_digest]
        ((base_mount, base_entry),) = [(k, v) for k, v in before.items() if v[2] == base_digest]
        # The loop's tools (sh, find, xargs, sha256sum) come from the first layer: it must not share the worker.
        assert base_entry[0] != victim, before

        proxy.delay = PROXY_DELAY
        loop = ReadLoop(stack, "old", "read-old", "name").start()
        wait_until(lambda: loop.done_count() >= KILL_AFTER, 90, f"the loop to hash {KILL_AFTER} files")
        at_kill = loop.done_count()
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        states: list[str] = []

        def reestablished() -> bool:
            pid, state, _ = _mounts(stack)[victim_mount]
            states.append(state)
            return state == "ready" and pid != victim

        wait_until(reestablished, 60, "the mount of the killed worker to be re-established", interval=0.1)
        t_back = time.monotonic()
        loop.wait(120)
        proxy.delay = 0.0
        after = _mounts(stack)
        assert after[base_mount] == base_entry, "the other worker's mount is untouched"
        assert after[victim_mount][1:] == ("ready", python_digest) and pid_alive(after[victim_mount][0])

        # What the running container saw: the bytes it read are right, and from the kill on every
        # read that had to reach the worker failed with ENOTCONN (empty files need no read).
        hashes, errors, rc = loop.result()
        assert rc == 123, f"xargs exits 123 when a sha256sum failed, here {rc}"
        assert set(hashes) | set(errors) == set(expected)
        assert all(hashes[p] == expected[p] for p in hashes), "a file read before the kill has wrong bytes"
        assert set(errors.values()) == {ENOTCONN_TEXT}, set(errors.values())
        order = loop.files()
        first_failed = min(i for i, p in enumerate(order) if p in errors)
        read_after = [p for p in order[first_failed:] if p in hashes and expected[p] != EMPTY_SHA256]
        assert not read_after, f"files with content were read after the first ENOTCONN: {read_after[:5]}"

        # After the re-establishment the running container still has the dead superblock in its overlay.
        read_before = next(p for p in order if p in hashes and expected[p] != EMPTY_SHA256)
        reread = _sha256_in(stack, "old", "reread", read_before)
        # Page-cached data is still served; were the page cache dropped meanwhile, ENOTCONN.
        assert (reread.returncode == 0 and reread.stdout.split()[0] == expected[read_before]) or \
            f"{read_before}: {ENOTCONN_TEXT}" in reread.stderr, reread
        never_read = next(p for p in order if p in errors and expected[p] != EMPTY_SHA256)
        unread = _sha256_in(stack, "old", "unread", never_read)
        assert unread.returncode != 0 and f"{never_read}: {ENOTCONN_TEXT}" in unread.stderr, unread
        # A file of the healthy layer: its lookup goes through /etc of the dead layer, and fails.
        other_layer = _sha256_in(stack, "old", "other-layer", BASE_ONLY)
        assert other_layer.returncode != 0 and f"{BASE_ONLY}: {ENOTCONN_TEXT}" in other_layer.stderr, other_layer
        python = stack.ctr("tasks", "exec", "--exec-id", "python", "old", "python3", "-c", "print(1)", check=False)
        assert python.returncode != 0, f"python3 started in the container with the dead layer: {python}"

        # New containers get the re-established mount and read every byte right.
        assert stack.run(ref, "new-hello", "python3", "-c", f"print({HELLO!r})").stdout == HELLO + "\n"
        stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "new", "sleep", "600")
        fresh = ReadLoop(stack, "new", "read-new", "reverse").start()
        fresh.wait(120)
        fresh_hashes, fresh_errors, fresh_rc = fresh.result()
        assert (fresh_errors, fresh_rc) == ({}, 0) and fresh_hashes == expected
        assert _sha256_in(stack, "new", "other-layer", BASE_ONLY).stdout.split()[0] == base_only_sha
        print(f"\nkilled worker {victim} after {at_kill} files; states seen {sorted(set(states))}; ready again on "
              f"pid {after[victim_mount][0]} {t_back - t_kill:.2f}s later; in the old container {len(hashes)} files "
              f"read, {len(errors)} failed with ENOTCONN; python3 exec: {python.stderr.strip()[-120:]}")
