"""Project-wide pytest configuration.

Every test here runs real components (registry, containerd, FUSE), so the suite
needs root; helper processes are started by the tests themselves.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("lazyd's tests start FUSE mounts, containerd and overlayfs: run them as root")
