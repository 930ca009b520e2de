"""Output helpers shared by the command-line tools: tables, JSON and progress bars.

Human output is a table; ``--json`` output is one JSON document for scripts.
Progress bars appear only when stderr is a terminal and ``--json`` is off (only then is
tqdm imported).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TextIO


def print_json(value: Any, stream: TextIO | None = None) -> None:
    """Print one JSON document."""
    json.dump(value, stream or sys.stdout, indent=2, sort_keys=False, default=str)
    (stream or sys.stdout).write("\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned plain-text table with a header rule."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], stream: TextIO | None = None) -> None:
    print(format_table(headers, rows), file=stream or sys.stdout)


def human_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class Progress(Protocol):
    def update(self, n: int) -> None: ...
    def set_description(self, text: str) -> None: ...


class _Quiet:
    def update(self, n: int) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass


@contextmanager
def progress(total: int | None, desc: str, *, enabled: bool = True, unit: str = "B") -> Iterator[Progress]:
    """A progress bar on stderr when it is a terminal and ``enabled``; silent otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield _Quiet()
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def fail(message: str, code: int = 1) -> int:
    """Print an error for humans and return the exit status to use."""
    print(f"error: {message}", file=sys.stderr)
    return code
