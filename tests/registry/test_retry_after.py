"""``Retry-After`` parsing and the ``max_retry_after`` limit (the waiting itself: tests/faults)."""

from __future__ import annotations

import email.utils

import pytest

from lazyd.configfile import ConfigError
from lazyd.registry.client import retry_after
from lazyd.registry.config import RegistryConfig


@pytest.mark.parametrize(("value", "seconds"), [(None, 0.0), ("", 0.0), ("5", 5.0), (" 120 ", 120.0),
                                                ("-3", 0.0), ("soon", 0.0), ("1.5", 0.0)])
def test_delta_seconds(value: str | None, seconds: float) -> None:
    assert retry_after(value) == seconds


def test_http_date_is_relative_to_now() -> None:
    now = 1_800_000_000.0
    assert retry_after(email.utils.formatdate(now + 42, usegmt=True), now=now) == 42.0
    assert retry_after(email.utils.formatdate(now - 42, usegmt=True), now=now) == 0.0  # in the past: no wait


def test_max_retry_after_is_validated() -> None:
    assert RegistryConfig(max_retry_after=0).max_retry_after == 0
    with pytest.raises(ConfigError, match="registry.max_retry_after"):
        RegistryConfig(max_retry_after=-1.0)
    with pytest.raises(ConfigError, match="registry.max_retry_after"):
        RegistryConfig(max_retry_after=float("inf"))
