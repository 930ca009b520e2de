"""The data flows one way (registry -> fetcher -> cache -> FUSE); the imports must too.

* the format layer (``lazyd.estargz``) knows nothing of HTTP, registries, the fetcher or FUSE;
* the fetcher does not import the FUSE package (it starts workers as processes);
* the FUSE layer knows nothing of registries or the fetcher's internals.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAZYD = Path(__file__).resolve().parents[1] / "lazyd"

RULES = {
    "estargz": ("aiohttp", "lazyd.registry", "lazyd.fetcher", "lazyd.fuse", "lazyd.cache", "lazyd.snapshotter"),
    "fetcher": ("lazyd.fuse", "llfuse"),
    "fuse": ("aiohttp", "lazyd.registry", "lazyd.fetcher", "lazyd.snapshotter"),
    "cache": ("aiohttp", "lazyd.registry", "lazyd.fetcher", "lazyd.fuse"),
    "registry": ("lazyd.fetcher", "lazyd.fuse", "lazyd.cache", "lazyd.snapshotter", "llfuse"),
}


def imported(path: Path) -> set[str]:
    """Every module a file imports (also inside functions and TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_follow_the_data_flow(package: str) -> None:
    bad = []
    for path in sorted((LAZYD / package).rglob("*.py")):
        for name in sorted(imported(path)):
            if any(name == f or name.startswith(f + ".") for f in RULES[package]):
                bad.append(f"{path.relative_to(LAZYD.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_imports_are_seen_wherever_they_are(tmp_path: Path) -> None:
    """The check finds imports inside functions and TYPE_CHECKING blocks, and from-imports."""
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llfuse\n"
                 "def g():\n    from lazyd.fuse import worker\n")
    assert {"llfuse", "lazyd.fuse", "lazyd.fuse.worker"} <= imported(f)
