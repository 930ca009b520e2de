"""Registry credentials from a docker ``config.json`` and ``docker-credential-*`` helpers.

Looked up per registry host: ``credHelpers[host]``, then ``auths[host]`` (``auth`` or
``username``/``password``, plus ``identitytoken``), then ``credsStore``.  Secrets are kept
in a ``Credentials`` object whose ``repr`` hides them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RegistryError

_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io", "docker.io")


class CredentialsError(RegistryError):
    """The docker config file or a credential helper is unusable."""


@dataclass(frozen=True)
class Credentials:
    """A username with a password, or an identity (refresh) token; secrets never printed."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def secrets(self) -> list[str]:
        return [s for s in (self.password, self.identity_token) if s]


def docker_config_path(configured: str | None) -> Path:
    """The config.json to read: the configured path, $DOCKER_CONFIG/config.json or ~/.docker/config.json."""
    if configured:
        return Path(configured)
    if os.environ.get("DOCKER_CONFIG"):
        return Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _keys_for(host: str) -> list[str]:
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        return list(_DOCKER_HUB_KEYS)
    return [host, f"https://{host}", f"http://{host}"]


def _normalise_key(key: str) -> str:
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.split("/", 1)[0]


async def _run_helper(name: str, host: str) -> Credentials | None:
    exe = f"docker-credential-{name}"
    try:
        proc = await asyncio.create_subprocess_exec(
            exe, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError as exc:
        raise CredentialsError(f"credential helper {exe} for {host} is not on PATH") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(host.encode()), 30)
    except asyncio.TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise CredentialsError(f"credential helper {exe} for {host} timed out") from exc
    if proc.returncode != 0:
        if b"credentials not found" in (out + err).lower():
            return None
        raise CredentialsError(f"credential helper {exe} failed for {host} (exit {proc.returncode})")
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise CredentialsError(f"credential helper {exe} printed invalid JSON for {host}") from exc
    user, secret = str(data.get("Username", "")), str(data.get("Secret", ""))
    if not secret:
        return None
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username=user, password=secret)


class CredentialStore:
    """Reads credentials for registry hosts on demand (the file is re-read once per host)."""

    def __init__(self, config_path: str | None) -> None:
        self._path = docker_config_path(config_path)
        self._cache: dict[str, Credentials | None] = {}
        self._lock = asyncio.Lock()

    def _load(self) -> dict:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"docker config {self._path} is unreadable or not JSON") from exc
        if not isinstance(data, dict):
            raise CredentialsError(f"docker config {self._path} is not a JSON object")
        return data

    async def get(self, host: str) -> Credentials | None:
        """Credentials for ``host`` (host[:port]) or None for anonymous access."""
        async with self._lock:
            if host not in self._cache:
                self._cache[host] = await self._lookup(host)
            return self._cache[host]

    async def _lookup(self, host: str) -> Credentials | None:
        data = self._load()
        keys = _keys_for(host)
        helpers = data.get("credHelpers") or {}
        for key in keys:
            if key in helpers:
                return await _run_helper(str(helpers[key]), key)
        auths = data.get("auths") or {}
        by_host = {}
        for key, entry in auths.items():
            by_host.setdefault(key, entry)
            by_host.setdefault(_normalise_key(key), entry)
        for key in keys:
            entry = by_host.get(key)
            if isinstance(entry, dict):
                creds = self._from_entry(entry, key)
                if creds:
                    return creds
        if data.get("credsStore"):
            return await _run_helper(str(data["credsStore"]), keys[0])
        return None

    def _from_entry(self, entry: dict, key: str) -> Credentials | None:
        user, password = str(entry.get("username", "")), str(entry.get("password", ""))
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"])).decode()
            except (ValueError, UnicodeDecodeError) as exc:
                raise CredentialsError(f"docker config {self._path}: auths[{key!r}].auth is not base64 user:password") from exc
            if ":" not in decoded:
                raise CredentialsError(f"docker config {self._path}: auths[{key!r}].auth is not user:password")
            user, password = decoded.split(":", 1)
        token = str(entry.get("identitytoken", ""))
        if not (password or token):
            return None
        return Credentials(username=user, password=password, identity_token=token)
