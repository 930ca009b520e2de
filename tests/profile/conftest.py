"""Fixtures of tests/profile come from tests/daemon and tests/e2e (imported by the test modules)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lazyd_config(**keys): settings for the test's lazyd serve config file")
