"""contrib/systemd passes systemd's own checks: ``systemd-analyze verify`` and ``systemd-tmpfiles``.

``systemd-analyze verify`` loads each unit with its dependencies and reports unknown keys, bad
values and missing executables on stderr (some only as warnings, with exit status 0), so both
the exit status and stderr are checked.  The units' ExecStart, /usr/local/bin/lazyd, is linked
by scripts/setup.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib" / "systemd"
UNITS = ("lazyd.service", "lazyd-snapshotter.service")
EXEC = Path("/usr/local/bin/lazyd")
CONTAINERD_UNIT = Path("/lib/systemd/system/containerd.service")


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze (Debian's systemd package) is missing"
    return subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True,
                          text=True, timeout=120)


def _complaints(stderr: str, *names: str) -> list[str]:
    """The lines of ``stderr`` about any of ``names`` (unit or file names)."""
    return [line for line in stderr.splitlines() if any(name in line for name in names)]


def test_units_verify_clean() -> None:
    assert EXEC.exists(), f"{EXEC} (the units' ExecStart) is missing: scripts/setup links it"
    done = _verify(*(CONTRIB / u for u in UNITS))
    assert done.returncode == 0, done.stderr
    assert _complaints(done.stderr, *UNITS, str(CONTRIB)) == [], done.stderr


def test_verify_check_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: the same call flags a misspelt key and a missing ExecStart."""
    bad = tmp_path / "lazyd.service"
    text = (CONTRIB / "lazyd.service").read_text()
    bad.write_text(text.replace("KillMode=process", "KillMod=process").replace(str(EXEC), "/nonexistent/lazyd"))
    done = _verify(bad)
    assert done.returncode != 0
    complaints = _complaints(done.stderr, "lazyd.service")
    assert any("Unknown key 'KillMod'" in line for line in complaints), done.stderr
    assert any("/nonexistent/lazyd" in line for line in complaints), done.stderr


def test_containerd_drop_in_verifies_clean(tmp_path: Path) -> None:
    """Debian's containerd.service with contrib/systemd/containerd-lazyd.conf as a drop-in."""
    assert CONTAINERD_UNIT.exists(), f"{CONTAINERD_UNIT} is missing: scripts/setup installs containerd"
    unit = tmp_path / "containerd.service"
    shutil.copy(CONTAINERD_UNIT, unit)
    (tmp_path / "containerd.service.d").mkdir()
    shutil.copy(CONTRIB / "containerd-lazyd.conf", tmp_path / "containerd.service.d" / "lazyd.conf")
    for name in UNITS:  # the units it names, next to it
        shutil.copy(CONTRIB / name, tmp_path / name)
    done = _verify(unit)
    assert done.returncode == 0, done.stderr
    assert _complaints(done.stderr, "lazyd", "containerd.service") == [], done.stderr


def test_tmpfiles_entry_creates_the_socket_directory(tmp_path: Path) -> None:
    done = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(CONTRIB / "lazyd.tmpfiles.conf")],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    st = os.stat(tmp_path / "run" / "lazyd")
    assert stat.S_ISDIR(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 0, 0)


def _settings(unit: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit (all sections), each key's values in order."""
    out: dict[str, list[str]] = {}
    for line in (CONTRIB / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_notify_ordered_before_containerd_and_restarted(unit: str) -> None:
    """What the sandbox test (test_real_systemd.py) relies on, stated per unit."""
    s = _settings(unit)
    assert s["Type"] == ["notify"]
    assert "containerd.service" in " ".join(s["Before"]).split()
    assert s["Restart"] == ["on-failure"]
    assert s["ExecStart"][0].split()[:2] == [str(EXEC), "serve" if unit == "lazyd.service" else "snapshotter"]


def test_lazyd_keeps_its_workers_and_the_snapshotter_only_wants_lazyd() -> None:
    lazyd, snapshotter = _settings("lazyd.service"), _settings("lazyd-snapshotter.service")
    assert lazyd["KillMode"] == ["process"]
    assert "KillMode" not in snapshotter  # control-group: it starts no process that must outlive it
    assert snapshotter["Wants"] == ["lazyd.service"]
    assert "lazyd.service" in " ".join(snapshotter["After"]).split()
    assert not {"Requires", "BindsTo", "PartOf", "Requisite"} & snapshotter.keys()
    for settings in (lazyd, snapshotter):  # a private mount namespace would hide the FUSE mounts from containerd
        assert not {"PrivateTmp", "PrivateMounts", "ProtectSystem", "ProtectHome", "MountFlags"} & settings.keys()
