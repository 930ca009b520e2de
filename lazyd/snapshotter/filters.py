"""containerd's filter syntax, as used by snapshot Walk (``ListSnapshotsRequest.filters``).

A filter is ``selector[,selector...]`` (all must match); several filters are OR-ed.
A selector is ``fieldpath`` (present and non-empty) or ``fieldpath OP value`` with
OP one of ``==``, ``!=``, ``~=`` (regular expression).  Field path parts are
identifiers or double-quoted strings: ``labels."containerd.io/snapshot.ref"``.
Values are quoted strings or bare words.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

Getter = Callable[[tuple[str, ...]], str | None]
"""Returns the value at a field path, or None when the field is absent."""

_FIELD = re.compile(r"[A-Za-z0-9_-]+")
_OPS = ("==", "!=", "~=")


class FilterError(ValueError):
    """A filter string could not be parsed; the message shows where."""


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None = None
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, get: Getter) -> bool:
        actual = get(self.path)
        if self.op is None:
            return bool(actual)
        if self.op == "==":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.regex is not None
        return actual is not None and self.regex.search(actual) is not None


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> FilterError:
        return FilterError(f"invalid filter {self.text!r} at position {self.pos}: {what}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def quoted(self) -> str:
        end = self.pos + 1
        while end < len(self.text):
            if self.text[end] == "\\":
                end += 2
                continue
            if self.text[end] == '"':
                try:
                    value = json.loads(self.text[self.pos:end + 1])
                except json.JSONDecodeError as exc:
                    raise self.error(f"bad quoted string ({exc.msg})") from None
                self.pos = end + 1
                return str(value)
            end += 1
        raise self.error("unterminated quoted string")

    def field(self) -> str:
        self.skip_ws()
        if self.pos < len(self.text) and self.text[self.pos] == '"':
            return self.quoted()
        m = _FIELD.match(self.text, self.pos)
        if not m:
            raise self.error("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        self.skip_ws()
        if self.pos < len(self.text) and self.text[self.pos] == '"':
            return self.quoted()
        end = self.text.find(",", self.pos)
        end = len(self.text) if end < 0 else end
        value = self.text[self.pos:end].strip()
        if not value:
            raise self.error("expected a value")
        self.pos = end
        return value

    def selector(self) -> Selector:
        path = [self.field()]
        while self.pos < len(self.text) and self.text[self.pos] == ".":
            self.pos += 1
            path.append(self.field())
        self.skip_ws()
        op = self.text[self.pos:self.pos + 2]
        if op not in _OPS:
            return Selector(tuple(path))
        self.pos += 2
        value = self.value()
        regex = None
        if op == "~=":
            try:
                regex = re.compile(value)
            except re.error as exc:
                raise self.error(f"bad regular expression {value!r}: {exc}") from None
        return Selector(tuple(path), op, value, regex)

    def parse(self) -> list[Selector]:
        selectors = [self.selector()]
        self.skip_ws()
        while self.pos < len(self.text):
            if self.text[self.pos] != ",":
                raise self.error(f"unexpected {self.text[self.pos]!r}")
            self.pos += 1
            selectors.append(self.selector())
            self.skip_ws()
        return selectors


@dataclass(frozen=True)
class Filter:
    """One or more OR-ed filter strings; an empty list matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...]

    @classmethod
    def parse(cls, filters: list[str]) -> Filter:
        alternatives = []
        for text in filters:
            if not text.strip():
                continue
            alternatives.append(tuple(_Parser(text).parse()))
        return cls(tuple(alternatives))

    def match(self, get: Getter) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(get) for s in selectors) for selectors in self.alternatives)
