"""``[snapshotter]`` config loading and ``lazyd snapshotter`` flag overrides."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lazyd.cli.lazyd import build_parser
from lazyd.cli.registry import parse
from lazyd.cli.snapshotter_cmd import build_config
from lazyd.configfile import ConfigError
from lazyd.snapshotter.config import SnapshotterConfig, load_config


def test_defaults() -> None:
    c = SnapshotterConfig()
    assert c.root == Path("/var/lib/lazyd/snapshotter")
    assert c.address == Path("/run/lazyd/snapshotter.sock")
    assert c.lazyd_socket == Path("/run/lazyd/lazyd.sock")


def test_file_table_and_flags_override(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('workers = 2\n[snapshotter]\nroot = "/srv/sn"\naddress = "/srv/sn.sock"\nmount_timeout = 5\n'
                   'log_level = "debug"\n')
    assert load_config(cfg).mount_timeout == 5.0
    args = parse(build_parser(), ["snapshotter", "--config", str(cfg), "--root", str(tmp_path / "r"),
                                  "--lazyd-socket", "rel.sock"])
    c = build_config(args)
    assert c.root == tmp_path / "r"                     # flag wins
    assert c.address == Path("/srv/sn.sock")            # file value kept
    assert c.lazyd_socket == Path.cwd() / "rel.sock"    # made absolute
    assert c.log_level == "debug" and c.mount_timeout == 5.0


def test_bad_keys_are_named(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[snapshotter]\nrooot = \"/x\"\n")
    with pytest.raises(ConfigError, match="snapshotter.rooot"):
        load_config(cfg)
    cfg.write_text("[snapshotter]\nmount_timeout = \"soon\"\n")
    with pytest.raises(ConfigError, match="snapshotter.mount_timeout"):
        load_config(cfg)
    cfg.write_text("[snapshotter]\nlog_level = \"loud\"\n")
    with pytest.raises(ConfigError, match="log_level"):
        load_config(cfg)


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[snapshotter]\ncheck_timeout = -1\n")
    args = parse(build_parser(), ["snapshotter", "--config", str(cfg)])
    assert args.func(args) == 2
    assert "check_timeout" in capsys.readouterr().err


def test_too_long_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    address = tmp_path / ("x" * 120) / "snapshotter.sock"
    proc = subprocess.run(["lazyd", "snapshotter", "--root", str(tmp_path / "root"), "--address", str(address)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "too long for a Unix socket" in proc.stderr and str(address) in proc.stderr
