"""containerd-style hosts configuration (``<hosts_dir>/<host>/hosts.toml``).

For a registry it yields the ordered endpoints to try: every ``[host."..."]`` mirror in
file order, then the ``server`` (upstream).  Each endpoint carries its capabilities,
TLS settings and extra headers.  Plain HTTP is allowed only for ``http://`` endpoints
written in hosts.toml, for hosts listed in ``plain_http``, and for localhost/127.0.0.1
(which are tried over HTTPS first, falling back to HTTP when the server does not speak TLS).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import RegistryError

CAP_PULL = "pull"
CAP_RESOLVE = "resolve"
CAP_PUSH = "push"
ALL_CAPS = frozenset({CAP_PULL, CAP_RESOLVE, CAP_PUSH})
DOCKER_HUB_SERVER = "https://registry-1.docker.io"


class HostsConfigError(RegistryError):
    """A hosts.toml file is unreadable or malformed."""


@dataclass(frozen=True)
class Endpoint:
    """One place to send requests for a registry (a mirror or the upstream)."""

    host: str                       # host[:port] as in the URL
    scheme: str                     # "https" or "http"
    path: str                       # API root path, normally "/v2"
    capabilities: frozenset[str] = ALL_CAPS
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client_certs: tuple[tuple[str, str | None], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    mirror: bool = False
    http_fallback: bool = False     # localhost without explicit scheme: try https, then http

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    def describe(self) -> str:
        return f"{'mirror ' if self.mirror else ''}{self.host}"


def is_local(host: str) -> bool:
    """True for localhost and loopback addresses (with or without a port)."""
    name = host
    if name.startswith("["):
        name = name[1 : name.index("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _as_list(value: Any, key: str, path: Path) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    if isinstance(value, list):
        return value
    raise HostsConfigError(f"{path}: {key} must be a string or a list")


def _parse_url(url: str, path: Path) -> tuple[str, str, str]:
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HostsConfigError(f"{path}: invalid host URL {url!r} (expected http[s]://host[:port][/path])")
    return parts.scheme, parts.netloc, parts.path.rstrip("/")


def _endpoint(url: str, table: dict[str, Any], path: Path, *, mirror: bool, explicit_scheme: bool) -> Endpoint:
    scheme, netloc, url_path = _parse_url(url, path)
    override = table.get("override_path", False)
    if not isinstance(override, bool):
        raise HostsConfigError(f"{path}: override_path must be true or false")
    api_path = url_path if override else (url_path if url_path.endswith("/v2") else url_path + "/v2")
    caps_raw = table.get("capabilities")
    caps = ALL_CAPS if caps_raw is None else frozenset(str(c) for c in _as_list(caps_raw, "capabilities", path))
    unknown = caps - ALL_CAPS
    if unknown:
        raise HostsConfigError(f"{path}: unknown capability {sorted(unknown)[0]!r} (known: pull, resolve, push)")
    skip_verify = table.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise HostsConfigError(f"{path}: skip_verify must be true or false")
    ca = tuple(str(path.parent / c) for c in _as_list(table.get("ca"), "ca", path))
    certs: list[tuple[str, str | None]] = []
    for item in _as_list(table.get("client"), "client", path):
        if isinstance(item, str):
            certs.append((str(path.parent / item), None))
        elif isinstance(item, list) and len(item) == 2:
            certs.append((str(path.parent / item[0]), str(path.parent / item[1])))
        else:
            raise HostsConfigError(f"{path}: client must be a cert path or [cert, key] pairs")
    header = table.get("header") or {}
    if not isinstance(header, dict):
        raise HostsConfigError(f"{path}: header must be a table")
    headers: list[tuple[str, str]] = []
    for k, v in header.items():
        for item in _as_list(v, f"header.{k}", path):
            headers.append((str(k), str(item)))
    return Endpoint(
        host=netloc, scheme=scheme, path=api_path, capabilities=caps, skip_verify=skip_verify, ca=ca,
        client_certs=tuple(certs), headers=tuple(headers), mirror=mirror,
        http_fallback=(not explicit_scheme and scheme == "https" and is_local(netloc)),
    )


def default_server(registry: str) -> str:
    """The upstream URL of a registry name (``docker.io`` is served by registry-1.docker.io)."""
    return DOCKER_HUB_SERVER if registry == "docker.io" else f"https://{registry}"


def load_endpoints(registry: str, hosts_dir: str | Path | None, plain_http: list[str] | tuple[str, ...] = ()) -> list[Endpoint]:
    """The endpoints to try for ``registry``, mirrors first, from ``hosts_dir`` (may be absent)."""
    table: dict[str, Any] = {}
    path = Path("/nonexistent")
    if hosts_dir:
        for candidate in (registry, "_default"):
            p = Path(hosts_dir) / candidate / "hosts.toml"
            if p.is_file():
                path = p
                try:
                    table = tomllib.loads(p.read_text())
                except (OSError, tomllib.TOMLDecodeError) as exc:
                    raise HostsConfigError(f"{p}: cannot read hosts.toml: {exc}") from exc
                break
    endpoints: list[Endpoint] = []
    hosts = table.get("host") or {}
    if not isinstance(hosts, dict):
        raise HostsConfigError(f"{path}: host must be a table of [host.\"URL\"] entries")
    for url, host_table in hosts.items():
        if not isinstance(host_table, dict):
            raise HostsConfigError(f"{path}: host.{url!r} must be a table")
        endpoints.append(_endpoint(url, host_table, path, mirror=True, explicit_scheme="://" in url))
    server = table.get("server")
    if server is not None and not isinstance(server, str):
        raise HostsConfigError(f"{path}: server must be a string")
    server_url = server or default_server(registry)
    upstream_table = {k: v for k, v in table.items() if k not in ("host", "server")}
    endpoints.append(_endpoint(server_url, upstream_table, path, mirror=False,
                               explicit_scheme=server is not None and "://" in server))
    allowed = set(plain_http)
    out = []
    for ep in endpoints:
        if ep.scheme == "https" and ep.host in allowed:
            ep = dataclasses.replace(ep, scheme="http", http_fallback=False)
        out.append(ep)
    return out
