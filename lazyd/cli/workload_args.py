"""The workload options shared by ``lazyctl image optimize`` and ``lazyctl profile record``."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from lazyd.cli.args import path_arg

if TYPE_CHECKING:
    from lazyd.profile.workload import Workload


class WorkloadUsageError(ValueError):
    """A workload option with a bad value (exit status 2); the message names the option."""


def add_workload_args(p: argparse.ArgumentParser, record_out_help: str) -> None:
    """``--entrypoint --args --env --cwd --period --network --record-out``."""
    p.add_argument("--entrypoint", metavar="JSON", help='entrypoint of the workload, e.g. \'["python3"]\' '
                                                         "(default: the image's Entrypoint)")
    p.add_argument("--args", metavar="JSON", help="arguments of the workload, e.g. '[\"-c\", \"print(1)\"]' "
                                                  "(default: the image's Cmd)")
    p.add_argument("--env", metavar="K=V", action="append", default=[],
                   help="environment variable for the workload (repeatable; replaces the image's of that name)")
    p.add_argument("--cwd", metavar="DIR", help="working directory of the workload (default: the image's)")
    p.add_argument("--period", metavar="SECONDS", type=float, default=10.0,
                   help="stop the workload after this long (default 10); what it opened until then counts")
    p.add_argument("--network", action="store_true", help="give the workload the host's network (default: none)")
    p.add_argument("--record-out", metavar="FILE", type=path_arg, help=record_out_help)


def _json_list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkloadUsageError(f"{option}: not JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WorkloadUsageError(f"{option}: expected a JSON list of strings, got {text!r}")
    return value


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The Workload the options describe; WorkloadUsageError naming a bad one."""
    from lazyd.profile.workload import Workload

    if args.period <= 0:
        raise WorkloadUsageError("--period must be a positive number of seconds")
    for item in args.env:
        if "=" not in item or item.startswith("="):
            raise WorkloadUsageError(f"--env {item!r}: expected KEY=VALUE")
    return Workload(entrypoint=_json_list(args.entrypoint, "--entrypoint"), args=_json_list(args.args, "--args"),
                    env=list(args.env), cwd=args.cwd, period=args.period, network=args.network)
