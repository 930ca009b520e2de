"""Fixtures for the eStargz format tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.estargz.trees import every_type_specs, ensure_reference_tools, python_tree_tar, write_tar


@pytest.fixture(scope="session")
def reference_tools() -> None:
    ensure_reference_tools()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("estargz")


@pytest.fixture(scope="session")
def python_tar(session_dir: Path) -> Path:
    return python_tree_tar(session_dir / "python-tree.tar")


@pytest.fixture(scope="session")
def every_type_tar(session_dir: Path) -> Path:
    return write_tar(session_dir / "every-type.tar", every_type_specs())
