"""A small Docker token server (JWTs signed with a key the test generates) for ``auth: token`` tests."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from .helpers import make_ca

SERVICE = "lazyd-test-registry"
ISSUER = "lazyd-test-issuer"
# distribution accepts a token up to 60 s after its "exp" (token.Leeway); a token meant to
# live N seconds therefore carries exp = now + N - LEEWAY.
LEEWAY = 60


@dataclass
class TokenServer:
    """Issues tokens to ``users`` (Basic) and to holders of ``identity_tokens`` (refresh grant)."""

    workdir: Path
    users: dict[str, str] = field(default_factory=dict)
    identity_tokens: dict[str, str] = field(default_factory=dict)
    lifetime: float = 300.0          # real validity of a token
    claimed_expires_in: int = 300    # what the answer's expires_in says (lies for short-lived tokens)
    issued: list[str] = field(default_factory=list)
    requests: list[tuple[str, list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        cert_pem, _key_pem, cert, key = make_ca("lazyd token signer")
        self.key = key
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)  # type: ignore[attr-defined]
        self.bundle = self.workdir / "token-signer.pem"
        self.bundle.write_bytes(cert_pem)
        self.port = 0

    def registry_auth(self) -> dict:
        return {"token": {"realm": f"http://127.0.0.1:{self.port}/token", "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": str(self.bundle)}}

    def _sign(self, subject: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "iat": now, "nbf": now - 5,
                  "exp": int(now + self.lifetime - LEEWAY), "jti": uuid.uuid4().hex, "access": access}
        token = jwt.encode(claims, self.key, algorithm="ES256",  # type: ignore[arg-type]
                           headers={"x5c": [base64.b64encode(self.cert_der).decode()]})
        self.issued.append(token)
        return token

    def app(self) -> web.Application:
        async def token(request: web.Request) -> web.Response:
            subject = ""
            if request.method == "POST":
                form = await request.post()
                scopes = str(form.get("scope", "")).split()
                holder = self.identity_tokens.get(str(form.get("refresh_token", "")))
                if form.get("grant_type") != "refresh_token" or holder is None:
                    return web.json_response({"error": "bad refresh token"}, status=401)
                subject = holder
            else:
                scopes = request.query.getall("scope", [])
                header = request.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if self.users.get(user) != password:
                        return web.json_response({"error": "bad credentials"}, status=401)
                    subject = user
            self.requests.append((request.method, scopes))
            if self.users or self.identity_tokens:
                if not subject:
                    scopes = []  # anonymous users get a token without access
            tok = self._sign(subject or "anonymous", scopes)
            return web.json_response({"token": tok, "access_token": tok, "expires_in": self.claimed_expires_in})

        app = web.Application()
        app.router.add_route("*", "/token", token)
        return app
