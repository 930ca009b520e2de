"""Entry names as the reference reads them: Go's ``path.Clean("/" + name)`` without the leading ``/``.

Every place that reads a layer name (TOC entries, hardlink targets, tar members in the
writer, prioritized paths, lookups) goes through ``normalize_name`` so that lazyd and
stargz-snapshotter see the same tree:

* ``/``, ``.``, ``./`` and ``""`` are the layer root ``""``;
* ``/etc/x``, ``./etc//x/`` are ``etc/x``;
* ``a/../b`` is ``b``, and ``..`` never climbs above the root: ``../../x`` is ``x``.

A name is never refused for its shape, only for a NUL byte (no file can be named so).
"""

from __future__ import annotations

from lazyd.estargz.errors import UnsafePathError


def normalize_name(name: str, what: str = "name") -> str:
    """The cleaned, root-relative form of ``name`` (see the module doc); UnsafePathError on a NUL byte."""
    if not (name.startswith((".", "/")) or name.endswith("/") or "/." in name or "//" in name or "\x00" in name):
        return name  # already clean: no empty, "." or ".." component, not absolute
    if "\x00" in name:
        raise UnsafePathError(f"{what} {name!r} contains a NUL byte")
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/".join(parts)


def parent_of(name: str) -> str:
    """Parent of a normalised name (``"a/b"`` -> ``"a"``, ``"a"`` -> ``""``)."""
    return name.rpartition("/")[0]
