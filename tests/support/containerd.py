"""A real containerd 1.6 for tests, with its own root, state, sockets and config in a temp dir.

``start_containerd(workdir, snapshotter_address=SOCK)`` registers ``lazyd`` as a proxy
snapshotter (``[proxy_plugins.lazyd]``); ``cri=True`` enables the CRI plugin (with
``cri_snapshotter`` as its snapshotter and snapshot annotations on).  Plugins the tests
never use (aufs, btrfs, zfs, devmapper, tracing, ...) are disabled so it starts fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .procs import Proc, wait_until

CONTAINERD_BIN = "containerd"
PROXY_NAME = "lazyd"
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; keep room for the ".ttrpc" suffix and NUL

DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


class ContainerdError(RuntimeError):
    """containerd did not start, or a ``ctr`` command failed (the message has its output)."""


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))


def _config(root: Path, state: Path, grpc: Path, ttrpc: Path, snapshotter_address: str | None, cri: bool,
            cri_snapshotter: str, cni_dir: Path, proxy_name: str = PROXY_NAME) -> str:
    disabled = list(DISABLED_PLUGINS)
    if not cri:
        disabled.append("io.containerd.grpc.v1.cri")
    lines = [
        "version = 2",
        f"root = {_toml_str(root)}",
        f"state = {_toml_str(state)}",
        f"disabled_plugins = {json.dumps(disabled)}",
        "[grpc]",
        f"  address = {_toml_str(grpc)}",
        "[ttrpc]",
        f"  address = {_toml_str(ttrpc)}",
        "[debug]",
        '  level = "info"',
    ]
    if snapshotter_address is not None:
        lines += [
            f"[proxy_plugins.{proxy_name}]",
            '  type = "snapshot"',
            f"  address = {_toml_str(snapshotter_address)}",
        ]
    if cri:
        lines += [
            '[plugins."io.containerd.grpc.v1.cri"]',
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_selinux = false",
            "  disable_apparmor = true",
            '[plugins."io.containerd.grpc.v1.cri".containerd]',
            f"  snapshotter = {_toml_str(cri_snapshotter)}",
            "  disable_snapshot_annotations = false",
            '[plugins."io.containerd.grpc.v1.cri".cni]',
            f"  bin_dir = {_toml_str(cni_dir / 'bin')}",
            f"  conf_dir = {_toml_str(cni_dir / 'conf')}",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Containerd:
    """A running containerd; ``address`` is its gRPC socket (for ``ctr -a`` and our clients)."""

    workdir: Path
    root: Path
    state: Path
    address: str
    ttrpc_address: str
    config_path: Path
    proc: Proc
    snapshotter_address: str | None = None
    _socket_dir: Path | None = None
    _namespaces: set[str] = field(default_factory=lambda: {"default"})

    def _run(self, tool: str, args: tuple[str, ...], namespace: str, check: bool, timeout: float,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        self._namespaces.add(namespace)
        argv = [tool, "--address", self.address, "--namespace", namespace, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise ContainerdError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def ctr(self, *args: str, namespace: str = "default", check: bool = True, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address SOCK --namespace NS ARGS...``; raise ``ContainerdError`` on failure if ``check``."""
        return self._run("ctr", args, namespace, check, timeout, input)

    def ctr_remote(self, *args: str, namespace: str = "default", check: bool = True, timeout: float = 300
                   ) -> subprocess.CompletedProcess[str]:
        """Run the reference client ``ctr-remote`` against this containerd."""
        return self._run("ctr-remote", args, namespace, check, timeout)

    def alive(self) -> bool:
        return self.proc.alive()

    def log_text(self) -> str:
        return self.proc.log_text()

    def _remove_tasks_and_containers(self) -> None:
        listed = self.ctr("namespaces", "ls", "-q", check=False, timeout=30)
        namespaces = set(listed.stdout.split()) | self._namespaces
        for ns in sorted(namespaces):
            for task in self.ctr("tasks", "ls", "-q", namespace=ns, check=False, timeout=30).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False, timeout=30)
                self.ctr("tasks", "delete", "-f", task, namespace=ns, check=False, timeout=30)
            for container in self.ctr("containers", "ls", "-q", namespace=ns, check=False, timeout=30).stdout.split():
                self.ctr("containers", "delete", container, namespace=ns, check=False, timeout=30)

    def stop(self, *, cleanup: bool = True) -> None:
        """Kill leftover tasks (``cleanup``), stop containerd and wait on its pid, unmount leftovers."""
        if self.proc.alive() and cleanup:
            try:
                self._remove_tasks_and_containers()
            except (subprocess.TimeoutExpired, OSError):
                pass
        self.proc.stop(timeout=20)
        _unmount_under(self.root, self.state)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)


def _unmount_under(*dirs: Path) -> None:
    """Lazily unmount anything still mounted below ``dirs`` (deepest first)."""
    prefixes = tuple(str(d.resolve()) + "/" for d in dirs)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted({p for p in points if p.startswith(prefixes)}, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def start_containerd(
    workdir: Path,
    *,
    snapshotter_address: str | None = None,
    cri: bool = False,
    cri_snapshotter: str | None = None,
    timeout: float = 30.0,
    proxy_name: str = PROXY_NAME,
) -> Containerd:
    """Start containerd with a generated config under ``workdir`` and wait until its socket answers.

    ``snapshotter_address`` registers the proxy snapshotter ``proxy_name`` (default ``lazyd``) at that socket;
    ``cri`` enables the CRI plugin with ``cri_snapshotter`` (default ``lazyd`` when a
    proxy is configured, else ``overlayfs``).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root, state, cni = workdir / "root", workdir / "state", workdir / "cni"
    for d in (root, state, cni / "bin", cni / "conf"):
        d.mkdir(parents=True, exist_ok=True)
    socket_dir: Path | None = None
    sock_base = workdir
    if len(str(workdir / "containerd.sock.ttrpc")) > MAX_SOCKET_PATH:
        socket_dir = Path(tempfile.mkdtemp(prefix="cd-", dir="/tmp"))
        sock_base = socket_dir
    grpc, ttrpc = sock_base / "containerd.sock", sock_base / "containerd.sock.ttrpc"
    if cri_snapshotter is None:
        cri_snapshotter = proxy_name if snapshotter_address else "overlayfs"
    config_path = workdir / "config.toml"
    config_path.write_text(_config(root, state, grpc, ttrpc, snapshotter_address, cri, cri_snapshotter, cni,
                                   proxy_name))
    proc = Proc([CONTAINERD_BIN, "--config", str(config_path)], workdir / "containerd.log",
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")})
    cd = Containerd(workdir=workdir, root=root, state=state, address=str(grpc), ttrpc_address=str(ttrpc),
                    config_path=config_path, proc=proc, snapshotter_address=snapshotter_address,
                    _socket_dir=socket_dir)

    def answers() -> bool:
        if not proc.alive():
            return True
        if not grpc.exists():
            return False
        return subprocess.run(["ctr", "--address", str(grpc), "version"], capture_output=True,
                              timeout=10).returncode == 0

    try:
        wait_until(answers, timeout, "containerd to answer on its socket", interval=0.1)
        if not proc.alive():
            raise ContainerdError(f"containerd exited {proc.popen.returncode}:\n{proc.log_text()[-4000:]}")
    except BaseException:
        cd.stop(cleanup=False)
        raise
    return cd
