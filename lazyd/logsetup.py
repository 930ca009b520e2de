"""Log output of ``lazyd serve`` and its FUSE workers: ``text`` lines or ``json`` objects, one per line.

``text``: ``<time> <process> <LEVEL> <logger>: <message>``.  ``json``: an object with ``time``
(UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``process`` and ``message``, then
the record's structured fields (what the call passed with ``extra=``, e.g. ``event``,
``layer``, ``mountpoint``) and ``exc`` (the traceback) when there is one.  The message is
the same text in both formats; neither carries anything the other does not (so neither
can carry a credential the other would not).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")

# Attributes every LogRecord has: everything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped by JSON)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        when = time.gmtime(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", when) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": self.process,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


def formatter(log_format: str, process: str) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` or ``json``) for records of ``process``."""
    if log_format == "json":
        return JsonFormatter(process)
    if log_format == "text":
        return logging.Formatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s")
    raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")


def configure(level: str, log_format: str, process: str, stream: TextIO | None = None) -> None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr) in ``log_format``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(log_format, process))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
