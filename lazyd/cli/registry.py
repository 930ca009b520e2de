"""The command registry shared by ``lazyd`` and ``lazyctl``.

Each command group lives in its own module exposing ``register(subparsers)``; a
registered command sets ``func`` (returning an exit status) on its parser.

Global options (the daemon socket, containerd's address and namespace, the config,
the state root, ``--json``, ``--log-level``) go before or after the subcommand:
``lazyctl --socket S status`` and ``lazyctl status --socket S`` are the same.  A
command declares the ones it uses with :func:`add_global` (with its own default);
:func:`build_parser` then declares every global option of the tool on the top-level
parser, on each command group and, hidden, on every command, all with
``default=SUPPRESS`` so a later placement overrides an earlier one and an absent
option leaves no trace.  After parsing, :func:`parse` fills in the command's
defaults and rejects a global option the command does not use, naming it, at
either placement.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lazyd.cli.version import VersionAction


@dataclass(frozen=True)
class GlobalOption:
    """One option accepted before and after the subcommand."""

    flag: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


LOG_LEVEL_CHOICES = ("debug", "info", "warning", "error")  # = lazyd.config.LOG_LEVELS (a test checks)

# Every global option either tool knows, by dest.  A command's help may say more.
GLOBAL_OPTIONS: dict[str, GlobalOption] = {o.dest: o for o in (
    GlobalOption("--config", "config file", {"metavar": "FILE"}),
    GlobalOption("--root", "state directory", {"metavar": "DIR"}),
    GlobalOption("--socket", "lazyd's API socket", {"metavar": "PATH"}),
    GlobalOption("--address", "a gRPC socket (see the command's help)", {"metavar": "PATH"}),
    GlobalOption("--namespace", "containerd namespace", {"metavar": "NS"}),
    GlobalOption("--lazyd-socket", "lazyd's API socket, for the snapshotter", {"metavar": "PATH"}),
    GlobalOption("--json", "print one JSON document for scripts", {"action": "store_true"}),
    GlobalOption("--log-level", "log level", {"choices": LOG_LEVEL_CHOICES}),
)}

_USES = "_global_defaults"  # parser default: {dest: default} of the globals a command uses
_LEAF = "_command_parser"   # parser default: the command's own parser, for its error messages


def add_global(p: argparse.ArgumentParser, dest: str, *, default: Any = None, help: str | None = None) -> None:
    """Declare that the command ``p`` uses global option ``dest``, with ``default`` when it is absent.

    ``help`` replaces the generic text; a non-empty, non-boolean default is appended to it.
    """
    if dest not in GLOBAL_OPTIONS:
        raise ValueError(f"{p.prog}: {dest!r} is not a global option (known: {', '.join(sorted(GLOBAL_OPTIONS))})")
    option = GLOBAL_OPTIONS[dest]
    text = help or option.help
    if default is not None and not isinstance(default, bool):
        text = f"{text} (default {default})"
    p.add_argument(option.flag, dest=dest, default=argparse.SUPPRESS, help=text, **option.kwargs)
    uses = dict(p.get_default(_USES) or {})
    uses[dest] = default
    p.set_defaults(**{_USES: uses})


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:  # noqa: SLF001 - argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def _commands(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers of the runnable commands (the leaves) under ``p``."""
    children = _subcommands(p)
    if not children:
        yield p
    seen: set[int] = set()
    for child in children.values():
        if id(child) not in seen:  # aliases map several names to one parser
            seen.add(id(child))
            yield from _commands(child)


def _uses(p: argparse.ArgumentParser) -> dict[str, Any]:
    return dict(p.get_default(_USES) or {})


def _declare(p: argparse.ArgumentParser, dests: Sequence[str], shown: set[str], used_by: dict[str, list[str]],
             helps: dict[str, str]) -> None:
    """Declare ``dests`` on ``p`` (``default=SUPPRESS``); those not in ``shown`` are hidden from its help."""
    for dest in dests:
        if dest in _uses(p) and p.get_default(_LEAF) is p:
            continue  # the command declared it itself
        option = GLOBAL_OPTIONS[dest]
        if option.flag in p._option_string_actions:  # noqa: SLF001
            raise ValueError(f"{p.prog} declares {option.flag} itself; declare it with registry.add_global() "
                             f"so it works before and after the subcommand")
        text = f"{helps[dest]}; used by: {', '.join(used_by[dest])}" if dest in shown else argparse.SUPPRESS
        p.add_argument(option.flag, dest=dest, default=argparse.SUPPRESS, help=text, **option.kwargs)


def build_parser(prog: str, description: str, modules: Sequence[str], *,
                 common: dict[str, tuple[Any, str]] | None = None) -> argparse.ArgumentParser:
    """A parser with one subcommand group per module in ``modules``.

    ``common`` maps global options every command accepts to their (default, help), e.g.
    lazyctl's ``--log-level``; the others are the ones commands declared with :func:`add_global`.
    Above the commands, an option's help is that of the first command using it.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action=VersionAction, help="print lazyd's version and the llfuse build, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).register(sub)
    commands = list(_commands(parser))
    for command in commands:
        command.set_defaults(**{_LEAF: command})
        for dest, (default, text) in (common or {}).items():
            if dest not in _uses(command):
                add_global(command, dest, default=default, help=text)
    used_by: dict[str, list[str]] = {}
    helps: dict[str, str] = {}
    for command in commands:
        for dest in _uses(command):
            used_by.setdefault(dest, []).append(command.prog.removeprefix(prog + " "))
            helps.setdefault(dest, command._option_string_actions[GLOBAL_OPTIONS[dest].flag].help or "")  # noqa: SLF001
    dests = [d for d in GLOBAL_OPTIONS if d in used_by]  # in the catalogue's order
    for dest in dests:
        if len(used_by[dest]) == len(commands):
            used_by[dest] = ["every command"]

    def declare(p: argparse.ArgumentParser) -> set[str]:
        """Declare the globals on ``p`` and below; the set of those its commands use."""
        children = _subcommands(p)
        if not children:
            used = set(_uses(p))
            _declare(p, dests, used, used_by, helps)
            return used
        used = set().union(*(declare(child) for child in {id(c): c for c in children.values()}.values()))
        _declare(p, dests, used, used_by, helps)
        return used

    declare(parser)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; fill in the command's defaults for global options it was not given.

    A global option given to a command that does not use it is an error (exit 2) naming the
    option and the command.
    """
    args = parser.parse_args(argv)
    command: argparse.ArgumentParser = getattr(args, _LEAF)
    uses: dict[str, Any] = getattr(args, _USES, None) or {}
    for dest, option in GLOBAL_OPTIONS.items():
        if dest in uses:
            if not hasattr(args, dest):
                setattr(args, dest, uses[dest])
        elif hasattr(args, dest):
            command.error(f"{option.flag} does not apply to this command")
    delattr(args, _LEAF)
    if hasattr(args, _USES):
        delattr(args, _USES)
    return args


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
        prepare: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parse ``argv`` and run the chosen command (after ``prepare(args)``); 130 on Ctrl-C."""
    args = parse(parser, argv)
    if prepare is not None:
        prepare(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
