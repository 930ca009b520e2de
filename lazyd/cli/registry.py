"""The command registry shared by ``lazyd`` and ``lazyctl``.

Each command group lives in its own module exposing ``register(subparsers)``; a
registered command sets ``func`` (returning an exit status) on its parser.

Global options (the daemon socket, containerd's address and namespace, the config,
the state root, ``--json``, ``--log-level``) go before or after the subcommand:
``lazyctl --socket S status`` and ``lazyctl status --socket S`` are the same.  A
command declares the ones it uses with :func:`add_global` (with its own default);
:func:`build_parser` then declares every global option of the tool on the top-level
parser and on each command group, all with ``default=SUPPRESS`` (also on the
commands) so a later placement overrides an earlier one and an absent option
leaves no trace.  After parsing, :func:`parse` fills in the command's
defaults and rejects a global option the command does not use, naming it, at
either placement.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class GlobalOption:
    """One option accepted before and after the subcommand (a plain class: a dataclass costs start-up time)."""

    __slots__ = ("flag", "dest", "help", "kwargs")

    def __init__(self, flag: str, help: str, kwargs: dict[str, Any] | None = None) -> None:  # noqa: A002
        self.flag = flag
        self.dest = flag.lstrip("-").replace("-", "_")
        self.help = help
        self.kwargs = kwargs or {}


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


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with the terminal width looked up once per process and only when
    help is formatted: argparse makes a formatter for every ``add_argument`` (to check its
    metavar), and the look-up (``shutil``) cost every lazyctl start a few ms."""

    _columns: int | None = None  # the terminal's, less 2 (what HelpFormatter computes)

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        self._asked_width = width
        self._asked_max_help_position = max_help_position
        super().__init__(prog, indent_increment, max_help_position, 0 if width is None else width)

    @property  # type: ignore[override]
    def _width(self) -> int:
        if self._asked_width is not None:
            return self._asked_width
        if _HelpFormatter._columns is None:
            import shutil

            _HelpFormatter._columns = shutil.get_terminal_size().columns - 2
        return _HelpFormatter._columns

    @_width.setter
    def _width(self, _value: int) -> None:
        pass  # derived from the asked width or the terminal's

    @property  # type: ignore[override]
    def _max_help_position(self) -> int:
        return min(self._asked_max_help_position, max(self._width - 20, self._indent_increment * 2))

    @_max_help_position.setter
    def _max_help_position(self, _value: int) -> None:
        pass  # derived from the width, as HelpFormatter computes it


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser using :class:`_HelpFormatter`; its subcommand parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class VersionAction(argparse.Action):
    """``--version``: print lazyd's version and the llfuse build, then exit 0 (imports only then)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:  # noqa: A002
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        import sys

        from lazyd.cli.version import version_text

        sys.stdout.write(version_text(parser.prog))
        parser.exit(0)


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


def _check_command(p: argparse.ArgumentParser, dests: Sequence[str]) -> None:
    """Refuse a command that declares a global option with add_argument (it would break placement)."""
    for dest in dests:
        flag = GLOBAL_OPTIONS[dest].flag
        if dest not in _uses(p) and flag in p._option_string_actions:  # noqa: SLF001
            raise ValueError(f"{p.prog} declares {flag} itself; declare it with registry.add_global() "
                             f"so it works before and after the subcommand")


def _declare(p: argparse.ArgumentParser, dests: Sequence[str], shown: set[str], used_by: dict[str, list[str]],
             helps: dict[str, str]) -> None:
    """Declare ``dests`` on the top-level or group parser ``p``; those not in ``shown`` are hidden from its help."""
    for dest in dests:
        option = GLOBAL_OPTIONS[dest]
        text = f"{helps[dest]}; used by: {', '.join(used_by[dest])}" if dest in shown else argparse.SUPPRESS
        p.add_argument(option.flag, dest=dest, default=argparse.SUPPRESS, help=text, **option.kwargs)


def build_parser(prog: str, description: str, modules: Sequence[str], *,
                 common: dict[str, tuple[Any, str]] | None = None) -> argparse.ArgumentParser:
    """A parser with one subcommand group per module in ``modules``.

    ``common`` maps global options every command accepts to their (default, help), e.g.
    lazyctl's ``--log-level``; the others are the ones commands declared with :func:`add_global`.
    Above the commands, an option's help is that of the first command using it.
    """
    parser = _Parser(prog=prog, description=description)
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
            _check_command(p, dests)
            return set(_uses(p))
        used = set().union(*(declare(child) for child in {id(c): c for c in children.values()}.values()))
        _declare(p, dests, used, used_by, helps)
        return used

    declare(parser)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; fill in the command's defaults for global options it was not given.

    A global option given to a command that does not use it is an error (exit 2) naming the
    option, at either placement: before the command the top-level parser took it; after
    it the command's parser (which does not declare it) left it over.
    """
    args, extras = parser.parse_known_args(argv)
    command: argparse.ArgumentParser = getattr(args, _LEAF)
    uses: dict[str, Any] = getattr(args, _USES, None) or {}
    flags = {o.flag: o for o in GLOBAL_OPTIONS.values()}
    for word in extras:
        option = flags.get(word.split("=", 1)[0])
        if option is not None:
            command.error(f"{option.flag} does not apply to this command")
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
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
