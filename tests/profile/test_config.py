"""The ``profiles`` and ``profile_timeout`` config keys are validated like every other key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyd.config import load_config
from lazyd.configfile import ConfigError


def test_default_is_local(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("")
    cfg = load_config(tmp_path / "c.toml")
    assert (cfg.profiles, cfg.profile_timeout) == ("local", 5.0)


@pytest.mark.parametrize("mode", ["off", "local", "registry"])
def test_modes(tmp_path: Path, mode: str) -> None:
    (tmp_path / "c.toml").write_text(f'profiles = "{mode}"\nprofile_timeout = 2.5\n')
    cfg = load_config(tmp_path / "c.toml")
    assert (cfg.profiles, cfg.profile_timeout) == (mode, 2.5)


@pytest.mark.parametrize(("text", "why"), [
    ('profiles = "remote"', "config key profiles: 'remote' must be one of off, local, registry"),
    ("profiles = true", "profiles"),
    ("profile_timeout = 0", "config key profile_timeout: 0.0 must be positive"),
    ('profile_timeout = "5"', "profile_timeout"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / "c.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=why):
        load_config(tmp_path / "c.toml")
