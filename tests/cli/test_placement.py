"""Global options work before and after the command, for every command of lazyd and lazyctl (parse level)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from lazyd.cli import lazyctl, lazyd
from lazyd.cli.registry import GLOBAL_OPTIONS, LOG_LEVEL_CHOICES, parse
from lazyd.containerd import DEFAULT_ADDRESS, DEFAULT_NAMESPACE

DIGEST = "sha256:" + "a" * 64

# Positionals that make each command parse; a command missing here fails test_every_command_is_covered.
POSITIONALS: dict[str, dict[tuple[str, ...], list[str]]] = {
    "lazyctl": {
        ("layer", "convert"): ["in.tar", "out.esgz"],
        ("layer", "inspect"): ["blob.esgz"],
        ("image", "convert"): ["127.0.0.1:5000/a:1", "127.0.0.1:5000/a:esgz"],
        ("image", "optimize"): ["127.0.0.1:5000/a:1", "127.0.0.1:5000/a:opt"],
        ("status",): [],
        ("mount",): ["127.0.0.1:5000/a:1", DIGEST, "/mnt/x"],
        ("umount",): ["/mnt/x"],
        ("check",): ["/mnt/x"],
        ("cache",): ["stats"],
        ("shutdown",): [],
        ("rpull",): ["127.0.0.1:5000/a:1"],
        ("promote",): ["127.0.0.1:5000/a:1"],
        ("profile", "record"): ["127.0.0.1:5000/a:1"],
        ("profile", "push"): ["127.0.0.1:5000/a:1"],
        ("profile", "pull"): ["127.0.0.1:5000/a:1"],
        ("profile", "import"): ["127.0.0.1:5000/a:1", "record.jsonl"],
        ("profile", "list"): [],
        ("profile", "show"): [DIGEST],
        ("profile", "delete"): [DIGEST],
    },
    "lazyd": {("serve",): [], ("snapshotter",): []},
}

# The global options each command uses, with their defaults when absent (today's defaults, kept).
USES: dict[str, dict[tuple[str, ...], dict[str, object]]] = {
    "lazyctl": {
        ("layer", "convert"): {"json": False, "log_level": None},
        ("layer", "inspect"): {"json": False, "log_level": None},
        ("image", "convert"): {"json": False, "log_level": None},
        ("image", "optimize"): {"socket": lazyctl.DEFAULT_SOCKET, "address": None, "json": False,
                                "log_level": None},
        ("status",): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("mount",): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("umount",): {"socket": lazyctl.DEFAULT_SOCKET, "log_level": None},
        ("check",): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("cache",): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("shutdown",): {"socket": lazyctl.DEFAULT_SOCKET, "log_level": None},
        ("rpull",): {"socket": lazyctl.DEFAULT_SOCKET, "address": DEFAULT_ADDRESS, "namespace": DEFAULT_NAMESPACE,
                     "json": False, "log_level": None},
        ("promote",): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("profile", "record"): {"socket": lazyctl.DEFAULT_SOCKET, "address": None, "json": False, "log_level": None},
        ("profile", "push"): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("profile", "pull"): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("profile", "import"): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("profile", "list"): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("profile", "show"): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
        ("profile", "delete"): {"socket": lazyctl.DEFAULT_SOCKET, "json": False, "log_level": None},
    },
    "lazyd": {
        ("serve",): {"config": None, "root": None, "socket": None, "log_level": None},
        ("snapshotter",): {"config": None, "root": None, "address": None, "lazyd_socket": None, "log_level": None},
    },
}

BUILDERS: dict[str, Callable[[], argparse.ArgumentParser]] = {"lazyctl": lazyctl.build_parser,
                                                              "lazyd": lazyd.build_parser}


def _value(dest: str) -> tuple[list[str], object]:
    """The command-line words that set global option ``dest`` and the value they give."""
    flag = GLOBAL_OPTIONS[dest].flag
    if dest == "json":
        return [flag], True
    if dest == "log_level":
        return [flag, "debug"], "debug"
    value = f"/given/{dest}" if dest != "namespace" else "given-ns"
    return [flag, value], value


def _cases() -> list[tuple[str, tuple[str, ...], str]]:
    return [(tool, path, dest) for tool, commands in USES.items() for path, uses in commands.items() for dest in uses]


def _unused_cases() -> list[tuple[str, tuple[str, ...], str]]:
    out = []
    for tool, commands in USES.items():
        tool_globals = {d for uses in commands.values() for d in uses}
        out += [(tool, path, dest) for path, uses in commands.items() for dest in sorted(tool_globals - set(uses))]
    return out


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    if not subs:
        return {path}
    return set().union(*(_leaves(p, (*path, name)) for name, p in subs[0].choices.items()))


@pytest.mark.parametrize("tool", sorted(BUILDERS))
def test_every_command_is_covered(tool: str) -> None:
    assert _leaves(BUILDERS[tool]()) == set(POSITIONALS[tool]) == set(USES[tool])


@pytest.mark.parametrize("tool", sorted(BUILDERS))
def test_commands_use_the_expected_globals(tool: str) -> None:
    parser = BUILDERS[tool]()
    for path, uses in USES[tool].items():
        args = parse(parser, [*path, *POSITIONALS[tool][path]])
        got = {d: getattr(args, d) for d in GLOBAL_OPTIONS if hasattr(args, d)}
        assert got == uses, path


@pytest.mark.parametrize(("tool", "path", "dest"), _cases())
def test_before_and_after_the_command(tool: str, path: tuple[str, ...], dest: str) -> None:
    parser = BUILDERS[tool]()
    words, value = _value(dest)
    positionals = POSITIONALS[tool][path]
    before = parse(parser, [*words, *path, *positionals])
    after = parse(parser, [*path, *positionals, *words])
    assert getattr(before, dest) == getattr(after, dest) == value
    assert vars(before) == vars(after)
    if len(path) > 1:  # between a group and its command: lazyctl image --json convert ...
        between = parse(parser, [path[0], *words, *path[1:], *positionals])
        assert vars(between) == vars(after)


@pytest.mark.parametrize(("tool", "path", "dest"), [c for c in _cases() if c[2] not in ("json",)])
def test_after_overrides_before(tool: str, path: tuple[str, ...], dest: str) -> None:
    flag = GLOBAL_OPTIONS[dest].flag
    first, second = ("info", "error") if dest == "log_level" else ("/first", "/second")
    args = parse(BUILDERS[tool](), [flag, first, *path, *POSITIONALS[tool][path], flag, second])
    assert getattr(args, dest) == second


@pytest.mark.parametrize(("tool", "path", "dest"), _unused_cases())
def test_unused_option_is_rejected_at_either_place(tool: str, path: tuple[str, ...], dest: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    parser = BUILDERS[tool]()
    words, _ = _value(dest)
    positionals = POSITIONALS[tool][path]
    for argv in ([*words, *path, *positionals], [*path, *positionals, *words]):
        with pytest.raises(SystemExit) as exc:
            parse(parser, argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"{GLOBAL_OPTIONS[dest].flag} does not apply to this command" in err, argv
        assert f"{tool} {' '.join(path)}" in err


@pytest.mark.parametrize(("tool", "path", "dest"), _unused_cases())
def test_help_shows_only_the_options_a_command_uses(tool: str, path: tuple[str, ...], dest: str) -> None:
    parser = BUILDERS[tool]()
    command = parser
    for name in path:
        command = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction)).choices[name]  # noqa: SLF001
    assert GLOBAL_OPTIONS[dest].flag not in command.format_help()
    assert GLOBAL_OPTIONS[dest].flag in parser.format_help()  # the top level lists them all


def test_bad_log_level_is_rejected_at_either_place(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--log-level", "loud", "status"], ["status", "--log-level", "loud"]):
        with pytest.raises(SystemExit):
            parse(lazyctl.build_parser(), argv)
        assert "invalid choice: 'loud'" in capsys.readouterr().err


def test_log_levels_match_the_daemons() -> None:
    from lazyd.config import LOG_LEVELS
    from lazyd.snapshotter.config import LOG_LEVELS as SNAPSHOTTER_LOG_LEVELS

    assert LOG_LEVEL_CHOICES == LOG_LEVELS == SNAPSHOTTER_LOG_LEVELS


def test_snapshotter_config_takes_options_before_the_command(tmp_path: Path) -> None:
    from lazyd.cli.snapshotter_cmd import build_config

    config = tmp_path / "c.toml"
    config.write_text("[snapshotter]\nlog_level = \"info\"\n")
    args = parse(lazyd.build_parser(), ["--config", str(config), "--root", str(tmp_path / "root"),
                                        "--address", str(tmp_path / "s.sock"), "--lazyd-socket", str(tmp_path / "l.sock"),
                                        "snapshotter", "--log-level", "debug"])
    cfg = build_config(args)
    assert (cfg.root, cfg.address, cfg.lazyd_socket, cfg.log_level) == (
        tmp_path / "root", tmp_path / "s.sock", tmp_path / "l.sock", "debug")


def test_an_option_declared_outside_the_registry_is_refused() -> None:
    from lazyd.cli.registry import build_parser

    with pytest.raises(ValueError, match="declares --json itself"):
        build_parser("t", "test", ["tests.cli.rogue_cmd"])


@pytest.mark.parametrize("before", [True, False])
def test_lazyctl_log_level_configures_logging(before: bool) -> None:
    """``lazyctl --log-level debug CMD`` (or after CMD) sets the root logger's level for the run."""
    import subprocess
    import sys

    words = ["--log-level", "debug"]
    argv = [*words, "layer", "inspect", "/nonexistent.esgz"] if before else ["layer", "inspect", "/nonexistent.esgz", *words]
    code = (f"import logging, sys\nfrom lazyd.cli.lazyctl import main\nrc = main({argv!r})\n"
            f"print(rc, logging.getLevelName(logging.getLogger().level))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["1", "DEBUG"], proc.stderr
