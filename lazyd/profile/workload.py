"""Record which files a workload opens, per layer: run it once in a container on traced lazy mounts.

Each layer of an eStargz image is mounted through ``lazyd serve``'s ``mount`` op with
``trace`` (so the tracing worker serves it and sees every open), the layers are stacked with
overlayfs (a temporary upper and work dir), and the workload runs there in a real container:
``ctr run --rm --config SPEC ID`` with containerd + runc.  The spec is ``ctr oci spec``'s
default with the image config's Entrypoint/Cmd/Env/WorkingDir/User (or the overrides), the
overlay as the root and no network interface but ``lo`` unless ``network`` is asked for.
It stops when the workload exits or after ``period`` seconds (the task is then killed).
Then each layer's trace (the ``trace`` op) becomes ``Record(path, manifest_digest, layer_index)``:
overlayfs opens a file in the topmost layer that has it, and that layer's mount is the one
that sees the open.  Everything is unmounted and removed again, also on errors and Ctrl-C.

A workload that cannot start or exits non-zero before the period ends is ``WorkloadFailed``
(with its exit code and output), never an empty profile.  See docs/optimize.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazyd import mounttable
from lazyd.api.client import DEFAULT_SOCKET, AsyncClient
from lazyd.api.messages import NOT_FOUND, ApiError, TraceResult
from lazyd.profile.records import Record

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
NAMESPACE = "lazyd-optimize"
OUTPUT_LIMIT = 64 << 10  # bytes of the workload's output kept (the end of it)
KILL_GRACE = 10.0  # seconds ``ctr run`` gets to return after its task was killed
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class WorkloadError(Exception):
    """The workload could not be profiled (lazyd or containerd missing, image not eStargz, mount failed...)."""


class NotEStargzError(WorkloadError):
    """A layer of the image is not eStargz, so it cannot be mounted lazily (convert the image first)."""


class WorkloadFailed(WorkloadError):
    """The workload could not start, or exited non-zero before the period ended."""

    def __init__(self, message: str, exit_code: int, output: str) -> None:
        super().__init__(f"{message} (exit code {exit_code})" + (f"; its output:\n{output.rstrip()}" if output.strip()
                                                                 else "; it printed nothing"))
        self.exit_code = exit_code
        self.output = output


@dataclass
class Workload:
    """What to run: overrides of the image config's Entrypoint/Cmd/Env/WorkingDir, how long, network or not."""

    entrypoint: list[str] | None = None
    args: list[str] | None = None
    env: list[str] = field(default_factory=list)
    cwd: str | None = None
    period: float = 10.0
    network: bool = False


@dataclass
class RecordedProfile:
    """The files the workload opened, per layer, in first-open order."""

    manifest_digest: str
    records: list[Record]
    exit_code: int
    output: str
    layers: list[str]  # layer digests, bottom first (``Record.layer_index`` indexes this)
    stopped: bool = False  # stopped at the end of the period (the workload was still running)
    truncated: bool = False  # a layer's trace hit its bound
    seconds: float = 0.0  # from the first mount to the last unmount
    run_seconds: float = 0.0  # the container alone


def process_spec(config: dict[str, Any], workload: Workload) -> tuple[list[str], list[str], str, str | None]:
    """(args, env, cwd, user) of the container: the image config's, overridden by ``workload``.

    Like ``ctr-remote image optimize``: ``entrypoint`` replaces Entrypoint and ``args`` replaces Cmd,
    each on its own; ``env`` entries replace image variables of the same name.
    """
    cfg = config.get("config") or {}
    entrypoint = workload.entrypoint if workload.entrypoint is not None else list(cfg.get("Entrypoint") or [])
    cmd = workload.args if workload.args is not None else list(cfg.get("Cmd") or [])
    args = [*entrypoint, *cmd]
    if not args:
        raise WorkloadError("nothing to run: the image has no Entrypoint or Cmd; give --entrypoint/--args")
    env: dict[str, str] = {}
    for item in [*(cfg.get("Env") or []), *workload.env]:
        key, sep, _ = item.partition("=")
        if not key or not sep:
            raise WorkloadError(f"environment entry {item!r} is not KEY=VALUE")
        env[key] = item
    if "PATH" not in env:
        env["PATH"] = DEFAULT_PATH
    cwd = workload.cwd or cfg.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise WorkloadError(f"working directory {cwd!r} is not absolute")
    return args, list(env.values()), cwd, cfg.get("User") or None


def _lookup_ids(rootfs: Path, user: str) -> tuple[int, int]:
    """uid, gid of ``user`` (``name``, ``uid``, ``name:group``, ``uid:gid``) from the image's /etc/passwd and /etc/group.

    runc reads these files in the container anyway (for HOME and the extra groups), so reading
    them here adds nothing to the profile that the workload's start would not add.
    """
    name, _, group = user.partition(":")

    def table(path: str) -> list[list[str]]:
        try:
            text = (rootfs / path).read_text(errors="replace")
        except OSError:
            return []
        return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]

    uid = gid = None
    if name.isdecimal():
        uid = int(name)
        for row in table("etc/passwd"):
            if len(row) > 3 and row[2] == name and row[3].isdecimal():
                gid = int(row[3])
                break
    else:
        for row in table("etc/passwd"):
            if len(row) > 3 and row[0] == name and row[2].isdecimal() and row[3].isdecimal():
                uid, gid = int(row[2]), int(row[3])
                break
        if uid is None:
            raise WorkloadError(f"user {name!r} of the image config is not in its /etc/passwd")
    if group:
        if group.isdecimal():
            gid = int(group)
        else:
            found = [int(row[2]) for row in table("etc/group") if len(row) > 2 and row[0] == group and row[2].isdecimal()]
            if not found:
                raise WorkloadError(f"group {group!r} of the image config is not in its /etc/group")
            gid = found[0]
    return uid, gid if gid is not None else 0


def container_spec(base: dict[str, Any], rootfs: Path, args: list[str], env: list[str], cwd: str,
                   uid: int, gid: int, network: bool, container_id: str) -> dict[str, Any]:
    """``base`` (``ctr oci spec``) for container ``container_id``: the root, the process, the network namespace."""
    spec = json.loads(json.dumps(base))
    spec["root"] = {"path": str(rootfs), "readonly": False}
    process = spec.setdefault("process", {})
    process.update(args=args, env=env, cwd=cwd, terminal=False)
    process["user"] = {"uid": uid, "gid": gid}
    spec["hostname"] = "lazyd-optimize"
    linux = spec.setdefault("linux", {})
    namespaces = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "network"]
    if not network:
        namespaces.append({"type": "network"})  # a new network namespace: only ``lo``, and it is down
    linux["namespaces"] = namespaces
    linux["cgroupsPath"] = f"/{NAMESPACE}/{container_id}"
    return spec


async def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode or 0, out, err)


async def _check_containerd(address: str) -> None:
    if shutil.which("ctr") is None:
        raise WorkloadError("ctr (containerd's client) is not installed; it runs the workload")
    if not os.path.exists(address):
        raise WorkloadError(f"containerd is not running: no socket at {address} (give its --address)")
    try:
        done = await _run(["ctr", "--address", address, "version"], timeout=15)
    except asyncio.TimeoutError:
        raise WorkloadError(f"containerd at {address} does not answer") from None
    if done.returncode != 0:
        raise WorkloadError(f"containerd at {address} does not answer: {done.stderr.decode(errors='replace').strip()}")


class _Session:
    """Mounts, overlay and container of one recording; ``close`` undoes whatever was done."""

    def __init__(self, client: AsyncClient, address: str, work: Path, progress: Callable[[str], None] | None) -> None:
        self.client = client
        self.address = address
        self.work = work
        self.say = progress or (lambda _msg: None)
        self.layer_dirs: list[Path] = []
        self.mounted: list[Path] = []
        self.merged: Path | None = None
        self.container_id: str | None = None

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.address, "--namespace", NAMESPACE, *args]

    async def mount_layers(self, ref: str, layers: list[str]) -> None:
        for i in range(len(layers)):
            d = self.work / "layers" / str(i)
            d.mkdir(parents=True)
            self.layer_dirs.append(d)

        async def one(i: int, digest: str) -> None:
            try:
                await self.client.request("mount", {"ref": ref, "layer_digest": digest,
                                                    "mountpoint": str(self.layer_dirs[i]), "prefetch_wait": False,
                                                    "trace": True})
            except ApiError as exc:
                if "unknown field" in exc.message and "trace" in exc.message:
                    raise WorkloadError("the running lazyd predates traced mounts; restart lazyd serve") from None
                raise WorkloadError(f"mounting layer {i} ({digest}) through lazyd failed: {exc.message}") from None
            self.mounted.append(self.layer_dirs[i])

        results = await asyncio.gather(*(one(i, d) for i, d in enumerate(layers)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def overlay(self) -> Path:
        upper, workdir, merged = self.work / "upper", self.work / "overlay-work", self.work / "merged"
        for d in (upper, workdir, merged):
            d.mkdir()
        lower = ":".join(str(d) for d in reversed(self.layer_dirs))  # topmost layer first
        options = f"lowerdir={lower},upperdir={upper},workdir={workdir}"
        done = await _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)])
        if done.returncode != 0:
            raise WorkloadError(f"overlay mount of the {len(self.layer_dirs)} layer mount(s) failed: "
                                f"{done.stderr.decode(errors='replace').strip()}")
        self.merged = merged
        return merged

    async def run(self, container_id: str, spec: dict[str, Any], period: float) -> tuple[int, str, bool, float]:
        """Run the container; (exit code, output, stopped at the period, seconds)."""
        spec_path = self.work / "config.json"
        spec_path.write_text(json.dumps(spec))
        self.container_id = container_id
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *self.ctr("run", "--rm", "--config", str(spec_path), container_id), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        chunks: list[bytes] = []
        kept = 0

        async def collect() -> None:
            nonlocal kept
            assert proc.stdout is not None
            while piece := await proc.stdout.read(65536):
                chunks.append(piece)
                kept += len(piece)
                while kept - len(chunks[0]) >= OUTPUT_LIMIT and len(chunks) > 1:
                    kept -= len(chunks.pop(0))

        reader = asyncio.create_task(collect())
        stopped = False
        try:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), period)
            except asyncio.TimeoutError:
                stopped = True
                self.say(f"period of {period:g}s over: killing the workload")
                await self.kill_task()
                try:
                    await asyncio.wait_for(proc.wait(), KILL_GRACE)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
            await reader
        except BaseException:
            reader.cancel()
            if proc.returncode is None:
                await self.kill_task()
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), KILL_GRACE)
            raise
        took = time.monotonic() - started
        output = b"".join(chunks)[-OUTPUT_LIMIT:].decode(errors="replace")
        return proc.returncode if proc.returncode is not None else -1, output, stopped, took

    async def kill_task(self) -> None:
        if self.container_id is None:
            return
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            await _run(self.ctr("task", "kill", "--signal", "SIGKILL", self.container_id), timeout=15)

    async def traces(self) -> list[TraceResult]:
        out = []
        for d in self.layer_dirs:
            try:
                out.append(await self.client.request("trace", {"mountpoint": str(d)}))
            except ApiError as exc:
                raise WorkloadError(f"reading the trace of {d} from lazyd failed: {exc.message}") from None
        return out

    async def close(self) -> None:
        """Remove the container (if left), unmount the overlay and the layers, delete the work dir."""
        if self.container_id is not None:
            with contextlib.suppress(asyncio.TimeoutError, OSError):
                listed = await _run(self.ctr("containers", "ls", "-q"), timeout=15)
                if self.container_id in listed.stdout.decode().split():
                    await self.kill_task()
                    await _run(self.ctr("task", "delete", "--force", self.container_id), timeout=15)
                    await _run(self.ctr("containers", "delete", self.container_id), timeout=15)
        errors = []
        if self.merged is not None:
            try:
                await asyncio.to_thread(mounttable.unmount_all_at, str(self.merged))
            except mounttable.MountError as exc:
                errors.append(str(exc))
        for d in self.layer_dirs:  # also those whose mount request was cut short (Ctrl-C)
            try:
                await self.client.request("unmount", {"mountpoint": str(d)})
            except ApiError as exc:
                if d in self.mounted or exc.code != NOT_FOUND:
                    errors.append(f"unmounting {d}: {exc.message}")
        if errors:
            log.warning("cleaning up %s: %s", self.work, "; ".join(errors))
            self.say(f"warning: {'; '.join(errors)} (left {self.work})")
            return
        await asyncio.to_thread(shutil.rmtree, self.work, True)


async def check_environment(socket: str | None = None, address: str | None = None) -> None:
    """WorkloadError naming what is missing unless ``lazyd serve`` answers at ``socket`` and containerd
    at ``address`` (the defaults as ``record_workload``'s), so a caller can fail before any work."""
    socket = socket or DEFAULT_SOCKET
    address = address or os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS
    if not os.path.exists(socket):
        raise WorkloadError(f"lazyd is not running: no socket at {socket} (start `lazyd serve`, or give --socket)")
    client = AsyncClient(socket, timeout=30.0, connect_timeout=5.0)
    try:
        await client.call("status", None, 30.0)
    except ApiError as exc:
        raise WorkloadError(f"lazyd at {socket} does not answer: {exc.message}") from None
    finally:
        await client.close()
    await _check_containerd(address)


async def record_workload(ref: str, workload: Workload, *, socket: str | None = None, plain_http: bool = False,
                          hosts_dir: str | None = None, progress: Callable[[str], None] | None = None,
                          address: str | None = None, work_dir: str | None = None) -> RecordedProfile:
    """Run ``workload`` once on the eStargz image ``ref`` and record the files it opened, per layer.

    Needs ``lazyd serve`` (at ``socket``) and containerd (at ``address``, default
    ``$CONTAINERD_ADDRESS`` or /run/containerd/containerd.sock).  ``plain_http``/``hosts_dir``
    apply to resolving ``ref`` here; lazyd mounts the layers with its own registry settings.
    """
    import dataclasses

    from lazyd.convert.layer import is_estargz
    from lazyd.registry import Reference, RegistryClient, RegistryConfig, RegistryError

    if workload.period <= 0:
        raise WorkloadError(f"period must be positive, not {workload.period}")
    say = progress or (lambda _msg: None)
    address = address or os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS
    socket = socket or DEFAULT_SOCKET
    try:
        parsed = Reference.parse(ref)
    except (RegistryError, ValueError) as exc:
        raise WorkloadError(f"image reference {ref!r}: {exc}") from None
    cfg = RegistryConfig()
    if hosts_dir:
        cfg = dataclasses.replace(cfg, hosts_dir=hosts_dir)
    if plain_http:
        cfg = dataclasses.replace(cfg, plain_http=[*cfg.plain_http, parsed.registry])
    try:
        async with RegistryClient(cfg) as registry:
            image = await registry.resolve(parsed)
            checks = await asyncio.gather(*(is_estargz(registry, image.ref, d) for d in image.layers))
    except RegistryError as exc:
        raise WorkloadError(f"resolving {ref}: {exc}") from None
    plain = [i for i, ok in enumerate(checks) if not ok]
    if plain:
        raise NotEStargzError(f"layer(s) {', '.join(map(str, plain))} of {ref} are not eStargz, so they cannot be "
                              "mounted lazily for profiling; convert the image first")
    args, env, cwd, user = process_spec(image.config, workload)
    layers = [d.digest for d in image.layers]
    pinned = str(image.ref.with_digest(image.manifest_digest)) if not image.ref.digest else str(image.ref)
    client = AsyncClient(socket, timeout=120.0, connect_timeout=5.0)
    work = Path(tempfile.mkdtemp(prefix="lazyd-optimize-", dir=work_dir))
    session = _Session(client, address, work, progress)
    started = time.monotonic()
    try:
        await check_environment(socket, address)
        base = await _run(["ctr", "oci", "spec"])
        if base.returncode != 0:
            raise WorkloadError(f"ctr oci spec failed: {base.stderr.decode(errors='replace').strip()}")
        say(f"mounting {len(layers)} layer(s) of {ref} with tracing")
        await session.mount_layers(pinned, layers)
        rootfs = await session.overlay()
        uid, gid = _lookup_ids(rootfs, user) if user else (0, 0)
        container_id = f"lazyd-optimize-{uuid.uuid4().hex[:12]}"
        spec = container_spec(json.loads(base.stdout), rootfs, args, env, cwd, uid, gid, workload.network,
                              container_id)
        say(f"running {json.dumps(args)} for up to {workload.period:g}s")
        exit_code, output, stopped, run_seconds = await session.run(container_id, spec, workload.period)
        if not stopped and exit_code != 0:
            raise WorkloadFailed(f"the workload {json.dumps(args)} failed", exit_code, output)
        traces = await session.traces()
    finally:
        try:
            await asyncio.shield(session.close())
        finally:
            await client.close()
    # One first-access order across the layers (the tracing worker numbers every open it sees).
    opened = sorted((seq, i, path) for i, t in enumerate(traces)
                    for path, seq in zip(t.paths, t.seqs if len(t.seqs) == len(t.paths)
                                         else range(i << 40, (i << 40) + len(t.paths))))
    records = [Record(path, image.manifest_digest, i) for _, i, path in opened]
    if not records:
        raise WorkloadFailed(f"the workload {json.dumps(args)} opened no file of the image", exit_code, output)
    return RecordedProfile(image.manifest_digest, records, exit_code, output, layers, stopped,
                           any(t.truncated for t in traces), round(time.monotonic() - started, 3),
                           round(run_seconds, 3))
