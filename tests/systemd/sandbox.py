"""A real systemd (Debian's 252) as PID 1 of a throwaway sandbox, to test lazyd's units under it.

``start_sandbox(workdir, files)`` runs ``tests/systemd/boot.sh`` in new PID, mount, UTS and
cgroup namespaces: it makes the root an overlay of this machine's ``/`` and a tmpfs (``files``
copied on top), mounts fresh /proc, /sys (read only), /dev, /run and /tmp and execs
``/usr/lib/systemd/systemd`` as PID 1 with ``container=lazyd-test``.  The network namespace is
the machine's, so a registry on 127.0.0.1 is reachable from the units.

systemd gets a cgroup2 subtree of its own (``/sys/fs/cgroup/unified/<name>``; the machine has a
hybrid v1/v2 layout and no systemd), boots only ``lazyd-sandbox.target`` (empty) and has the
units masked that would reach outside the sandbox (timers, time sync, udev, sysctl, binfmt,
kernel modules, network) or start the machine's other services.  ``close()`` SIGKILLs that PID 1, which ends
every process of the sandbox; its mounts (FUSE ones included) go with its mount namespace.

``Sandbox.run`` runs a command inside (``nsenter``); ``Sandbox.path`` is a path of the sandbox
as seen from here (``/proc/<pid>/root/...``), which also reaches its Unix sockets and mounts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SYSTEMD = Path("/usr/lib/systemd/systemd")
BOOT = Path(__file__).with_name("boot.sh")
SOURCE = Path(__file__).resolve().parents[2]
"""The checkout under test (the venv's editable install points at it): bound into the sandbox."""
CGROUP2 = Path("/sys/fs/cgroup/unified")
TARGET = "lazyd-sandbox.target"
MASKED = (
    # timers and what they run (apt, fstrim of the machine's disk, e2scrub, ...)
    "timers.target", "apt-daily.timer", "apt-daily-upgrade.timer", "fstrim.timer", "e2scrub_all.timer",
    "man-db.timer", "dpkg-db-backup.timer", "e2scrub_reap.service",
    # what acts on the kernel or the network the sandbox shares with the machine
    "systemd-timesyncd.service", "systemd-pstore.service", "systemd-udevd.service", "systemd-udev-trigger.service",
    "systemd-udev-settle.service", "systemd-sysctl.service", "systemd-binfmt.service", "systemd-networkd.service",
    "systemd-resolved.service", "systemd-hwdb-update.service", "systemd-random-seed.service",
    "systemd-firstboot.service", "systemd-modules-load.service", "modprobe@.service", "kmod-static-nodes.service",
    "systemd-remount-fs.service", "proc-sys-fs-binfmt_misc.automount", "getty.target",
    # the machine's own services
    "docker-registry.service", "postgresql.service",
)


class SandboxError(RuntimeError):
    """The sandbox did not boot, or a command in it failed."""


@dataclass
class Sandbox:
    """A running sandbox: ``pid`` is its systemd (PID 1 inside) as seen from this machine."""

    workdir: Path
    proc: subprocess.Popen[bytes]
    pid: int
    cgroup: Path

    def path(self, inside: str | os.PathLike[str]) -> Path:
        """``inside`` (an absolute path in the sandbox) as seen from this machine."""
        return Path(f"/proc/{self.pid}/root") / Path(inside).relative_to("/")

    def run(self, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the sandbox; SandboxError with its output when ``check`` and it fails."""
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-C", "--root", "--wd", "--", *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise SandboxError(f"{' '.join(argv)} exited {done.returncode} in the sandbox:\n{done.stdout}\n"
                               f"{done.stderr}\n--- journal ---\n{self.journal()[-6000:]}")
        return done

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        """One property of ``unit`` (``systemctl show -p PROP --value``)."""
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID"))

    def journal(self, *units: str) -> str:
        """The sandbox's journal (systemd's own messages and the units' output), of ``units`` if given."""
        argv = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "--root", "--wd", "--", "journalctl",
                "--no-pager", "-o", "short-monotonic", *(a for u in units for a in ("-u", u))]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr

    def close(self) -> None:
        """End the sandbox: SIGKILL its PID 1 (the kernel then kills every process in it), remove its cgroup."""
        if self.pid > 0:  # 0 (systemd never started) would signal this process's own group
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # unshare and boot.sh: their own session (start_new_session)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        _remove_cgroup(self.cgroup)


def start_sandbox(workdir: Path, files: dict[str, str], timeout: float = 60) -> Sandbox:
    """Boot systemd in a new sandbox with ``files`` (path inside -> text) on top of this machine's root.

    Returns once ``systemctl is-system-running`` says the (empty) boot target is reached.
    """
    for tool in (SYSTEMD, Path("/usr/bin/unshare"), Path("/usr/bin/nsenter")):
        if not tool.exists():
            raise SandboxError(f"{tool} is missing: the systemd sandbox needs Debian's systemd and util-linux")
    if not (CGROUP2 / "cgroup.procs").exists():
        raise SandboxError(f"no cgroup2 hierarchy at {CGROUP2}: systemd in the sandbox needs one")
    _write_files(workdir / "files", {
        **files,
        f"etc/systemd/system/{TARGET}": "[Unit]\nDescription=lazyd test sandbox (boots nothing else)\n",
    })
    (workdir / "t").mkdir()
    cgroup = CGROUP2 / f"lazyd-systemd-test-{uuid.uuid4().hex[:12]}"
    cgroup.mkdir()
    log = open(workdir / "boot.log", "wb")  # noqa: SIM115 - the child writes it for as long as it runs
    try:
        # The shell moves itself into the sandbox's cgroup, then becomes unshare: --cgroup makes that cgroup
        # the sandbox's root, --fork makes boot.sh PID 1 of the new PID namespace.
        proc = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec unshare --mount --pid --fork --uts --cgroup '
                         '--propagation private -- "$2" "$3" "$4" "$5"',
             "sh", str(cgroup), str(BOOT), str(workdir), TARGET, str(SOURCE)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except BaseException:
        cgroup.rmdir()
        raise
    finally:
        log.close()
    sandbox = Sandbox(workdir, proc, 0, cgroup)
    try:
        sandbox.pid = _wait_for_systemd(proc, workdir, timeout)
        private = sandbox.path("/run/systemd/private")  # systemctl's socket: there once the manager is up
        deadline = time.monotonic() + timeout
        while not private.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SandboxError(f"systemd in the sandbox did not open {private} within {timeout}s "
                                   f"(exit status {proc.returncode}):\n"
                                   f"{(workdir / 'boot.log').read_text(errors='replace')[-4000:]}")
            time.sleep(0.05)
        state = sandbox.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout).stdout.strip()
        if state not in ("running", "degraded"):
            raise SandboxError(f"systemd in the sandbox is {state!r}, not running:\n{sandbox.journal()[-6000:]}")
    except BaseException:
        sandbox.close()
        raise
    return sandbox


def _write_files(top: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    masks = top / "etc/systemd/system"
    masks.mkdir(parents=True, exist_ok=True)
    for unit in MASKED:
        (masks / unit).symlink_to("/dev/null")


def _wait_for_systemd(proc: subprocess.Popen[bytes], workdir: Path, timeout: float) -> int:
    """The pid (here) of unshare's child once it is systemd: boot.sh execs it after building the root."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SandboxError(f"the sandbox exited ({proc.returncode}) while booting:\n"
                               f"{(workdir / 'boot.log').read_text(errors='replace')[-4000:]}")
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "systemd":
                return int(children[0])
        except OSError:
            pass
        time.sleep(0.05)
    raise SandboxError(f"systemd did not start in the sandbox within {timeout}s:\n"
                       f"{(workdir / 'boot.log').read_text(errors='replace')[-4000:]}")


def _remove_cgroup(cgroup: Path, timeout: float = 10) -> None:
    """Remove ``cgroup`` and the cgroups systemd made below it, deepest first, once their processes are gone."""
    if not cgroup.exists():
        return
    deadline = time.monotonic() + timeout
    while "populated 1" in (cgroup / "cgroup.events").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    for d in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    cgroup.rmdir()
