"""Registry authentication: WWW-Authenticate challenges, Bearer tokens and Basic.

Tokens are cached per (host, scope): expired ones are dropped, and at most
``MAX_TOKENS`` are kept (the least recently used goes first).  A 401 on a request that
carried a token drops that token, fetches a new one and lets the caller retry once.
Nothing here logs a header, password or token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .credentials import Credentials, CredentialStore
from .errors import ResponseTooLargeError, UnauthorizedError, UnreachableError

log = logging.getLogger(__name__)

MAX_TOKENS = 256
"""Bearer tokens an ``Authorizer`` keeps (one per host and scope set); the least recently used
one is dropped beyond this.  A pull uses one scope set per repository, so this covers 256
repositories in use at once; a dropped token is simply fetched again."""

MAX_TOKEN_RESPONSE = 1024 * 1024
"""Largest token-server answer read (tokens are a few KiB); a larger one is a ResponseTooLargeError."""

_PARAM = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    """A parsed WWW-Authenticate challenge: scheme (lowercase) and parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse ``Bearer realm="...",service="..."`` (possibly several challenges) from a header."""
    out: list[Challenge] = []
    for m in re.finditer(r"(?:^|,)\s*([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)(?=\s+[A-Za-z0-9_.-]+\s*=|\s*$|\s*,)", header):
        scheme = m.group(1).lower()
        start = m.end()
        nxt = re.search(r",\s*[A-Za-z][A-Za-z0-9_-]*\s+[A-Za-z0-9_.-]+\s*=", header[start:])
        body = header[start : start + nxt.start()] if nxt else header[start:]
        params = {k.lower(): (q.replace('\\"', '"') if q or v == "" else v) for k, q, v in _PARAM.findall(body)}
        out.append(Challenge(scheme, params))
    return [c for c in out if c.scheme in ("bearer", "basic")]


@dataclass
class _Token:
    value: str
    expires_at: float


def scope_for(repository: str, actions: str) -> str:
    return f"repository:{repository}:{actions}"


class Authorizer:
    """Authorization headers for registry hosts, learned from their challenges."""

    def __init__(self, credentials: CredentialStore, plain_http_allowed: Callable[[str], bool]) -> None:
        self._creds = credentials
        self._plain_ok = plain_http_allowed
        self._challenges: dict[str, Challenge] = {}
        self._tokens: OrderedDict[tuple[str, str], _Token] = OrderedDict()  # least recently used first
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._secrets: set[str] = set()

    def secrets(self) -> set[str]:
        """The credentials seen so far and the tokens held now (to scrub from error text)."""
        return self._secrets | {t.value for t in self._tokens.values()}

    def token_count(self) -> int:
        """Bearer tokens held now (at most ``MAX_TOKENS``)."""
        return len(self._tokens)

    def _store(self, key: tuple[str, str], token: _Token) -> None:
        """Keep ``token`` as the most recently used; drop expired tokens, then the oldest beyond MAX_TOKENS."""
        self._tokens[key] = token
        self._tokens.move_to_end(key)
        now = time.monotonic()
        for k in [k for k, t in self._tokens.items() if t.expires_at <= now]:
            self._drop(k)
        while len(self._tokens) > MAX_TOKENS:
            self._drop(next(iter(self._tokens)))

    def _drop(self, key: tuple[str, str]) -> None:
        self._tokens.pop(key, None)
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]

    async def header(self, session: aiohttp.ClientSession, host: str, scopes: tuple[str, ...], ssl: Any) -> str | None:
        """The Authorization header for a request to ``host`` needing ``scopes``, if one is known to be needed."""
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = await self._creds.get(host)
            if creds is None or not creds.password:
                raise UnauthorizedError(f"registry {host} requires Basic credentials for {' '.join(scopes)} and none are configured")
            self._remember(creds)
            raw = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            return f"Basic {raw}"
        key = (host, " ".join(sorted(scopes)))
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                token = self._tokens.get(key)
                if token is None or token.expires_at <= time.monotonic():
                    token = await self._fetch_token(session, host, challenge, scopes, ssl)
                    self._store(key, token)
                else:
                    self._tokens.move_to_end(key)
                return f"Bearer {token.value}"
        finally:
            if key not in self._tokens and not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]  # a failed fetch leaves no lock behind

    async def unauthorized(self, session: aiohttp.ClientSession, host: str, scopes: tuple[str, ...],
                           www_authenticate: str, sent: str | None, ssl: Any) -> str:
        """Handle a 401: learn the challenge, drop the stale token, return a new header to retry with."""
        challenges = parse_challenges(www_authenticate)
        if not challenges:
            raise UnauthorizedError(f"registry {host} refused access to {' '.join(scopes)} without a usable challenge")
        challenge = next((c for c in challenges if c.scheme == "bearer"), challenges[0])
        if challenge.scheme == "bearer" and challenge.params.get("scope"):
            extra = tuple(s for s in challenge.params["scope"].split(" ") if s)
            scopes = tuple(sorted(set(scopes) | set(extra)))
        self._challenges[host] = Challenge(challenge.scheme, {k: v for k, v in challenge.params.items() if k != "scope"})
        key = (host, " ".join(sorted(scopes)))
        token = self._tokens.get(key)
        if token is not None and sent == f"Bearer {token.value}":
            self._drop(key)
        if challenge.scheme == "basic" and sent and sent.startswith("Basic "):
            raise UnauthorizedError(f"registry {host} rejected the configured credentials for {' '.join(scopes)}")
        header = await self.header(session, host, scopes, ssl)
        if header is None:  # pragma: no cover - header() returns a value once a challenge is known
            raise UnauthorizedError(f"registry {host} refused access to {' '.join(scopes)}")
        return header

    def _remember(self, creds: Credentials | None) -> None:
        if creds:
            self._secrets.update(creds.secrets())

    async def _fetch_token(self, session: aiohttp.ClientSession, host: str, challenge: Challenge,
                           scopes: tuple[str, ...], ssl: Any) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise UnauthorizedError(f"registry {host} sent a Bearer challenge without a realm")
        service = challenge.params.get("service", "")
        realm_url = urlsplit(realm)
        if realm_url.scheme not in ("http", "https") or not realm_url.netloc:
            raise UnauthorizedError(f"registry {host} sent an invalid token realm")
        if realm_url.scheme == "http" and not self._plain_ok(realm_url.netloc):
            raise UnauthorizedError(f"registry {host} wants tokens from plain-HTTP {realm_url.netloc}, "
                                    "which is not allowed (not local, not in plain_http)")
        # An https realm is always verified (with the endpoint's CAs when it has its own).
        ssl = (ssl if not isinstance(ssl, bool) else True) if realm_url.scheme == "https" else False
        creds = await self._creds.get(host)
        self._remember(creds)
        what = f"registry {host} (service {service or '-'}, scope {' '.join(scopes)})"
        try:
            if creds and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token, "service": service,
                        "scope": " ".join(scopes), "client_id": "lazyd"}
                resp_ctx = session.post(realm, data=form, ssl=ssl)
            else:
                params = [("service", service)] if service else []
                params += [("scope", s) for s in scopes]
                headers = {}
                if creds and creds.password:
                    raw = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
                    headers["Authorization"] = f"Basic {raw}"
                resp_ctx = session.get(realm, params=params, headers=headers, ssl=ssl)
            async with resp_ctx as resp:
                if resp.status in (401, 403):
                    raise UnauthorizedError(f"token server refused {'the configured credentials' if creds else 'anonymous access'} for {what}")
                if resp.status != 200:
                    raise UnauthorizedError(f"token server answered HTTP {resp.status} for {what}")
                data = json.loads(await _read_bounded(resp, f"token server {realm_url.netloc} for {what}"))
        except aiohttp.ClientError as exc:
            raise UnreachableError(f"token server for {what} is unreachable: {type(exc).__name__}") from exc
        except ValueError as exc:
            raise UnauthorizedError(f"token server sent invalid JSON for {what}") from exc
        value = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(value, str) or not value:
            raise UnauthorizedError(f"token server sent no token for {what}")
        try:
            expires_in = float(data.get("expires_in") or 60)
        except (TypeError, ValueError):
            expires_in = 60.0
        log.debug("got a token for %s, valid %.0fs", what, expires_in)
        # Refresh a little early; a token that expires anyway is refreshed on the 401.
        return _Token(value, time.monotonic() + max(1.0, expires_in - min(10.0, expires_in / 10)))


async def _read_bounded(resp: aiohttp.ClientResponse, who: str) -> bytes:
    """A token answer's body, at most ``MAX_TOKEN_RESPONSE`` bytes."""
    if resp.content_length is not None and resp.content_length > MAX_TOKEN_RESPONSE:
        resp.close()
        raise ResponseTooLargeError(f"{who} announced {resp.content_length} bytes (Content-Length); "
                                    f"at most {MAX_TOKEN_RESPONSE} are allowed (MAX_TOKEN_RESPONSE)")
    body = bytearray()
    while len(body) <= MAX_TOKEN_RESPONSE:
        chunk = await resp.content.read(MAX_TOKEN_RESPONSE + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    resp.close()
    raise ResponseTooLargeError(f"{who} sent more than {MAX_TOKEN_RESPONSE} bytes; "
                                f"at most {MAX_TOKEN_RESPONSE} are allowed (MAX_TOKEN_RESPONSE)")
