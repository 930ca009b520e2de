"""The OCI distribution client (aiohttp): manifests, blobs, range GETs and push.

One ``RegistryClient`` holds one connection pool and the auth state of every registry
it talks to.  Requests go to the endpoints from hosts.toml in order (mirrors, then the
upstream); GET/HEAD are retried with exponential backoff on the last endpoint.
Redirects are followed by hand so that ``Authorization`` never reaches another host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from .auth import Authorizer, scope_for
from .config import RegistryConfig
from .credentials import CredentialStore
from .errors import (DigestMismatchError, ManifestError, NotFoundError, RangeNotSupportedError, RegistryError,
                     ResponseTooLargeError, UnauthorizedError, UnreachableError)
from .hosts import CAP_PULL, CAP_PUSH, CAP_RESOLVE, Endpoint, is_local, load_endpoints
from .platforms import Platform
from .reference import Reference, validate_digest
from .types import (INDEX_TYPES, MANIFEST_TYPES, MEDIA_OCI_INDEX, Descriptor, Image, ManifestPush,
                    RegistryStats, digest_of, hasher)

log = logging.getLogger(__name__)

ACCEPT_MANIFESTS = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_REDIRECTS = (301, 302, 303, 307, 308)
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date); 0 if absent or bad."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils  # only for the rare HTTP-date form

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:
        return 0.0
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_DOWN_SECONDS = 30.0
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MULTIPART_PART_OVERHEAD = 1024
"""Bytes a multipart/byteranges answer may carry per part besides the part's data (delimiter and
part headers; distribution sends about 100), and once more for the preamble and closing delimiter."""
WRITE_BATCH = 4 * 1024 * 1024
"""Bytes ``fetch_blob`` gathers before handing them to a worker thread to hash and write."""
_READ_CHUNK = 1 << 20
ProgressFn = Callable[[int], None]
ERROR_KINDS = ("unreachable", "tls", "unauthorized", "not_found", "throttled", "server", "range", "body",
               "too_large", "digest", "http")
"""Kinds of failed attempts a ``RegistryObserver`` hears of: no answer (connection, timeout), TLS,
401/403, 404, 429, other retryable status (408, 5xx), an unusable range answer, a body that broke
off, an answer bigger than asked for, content not matching its digest, any other HTTP status."""


class RegistryObserver:
    """What the client reports for metrics (lazyd.metrics); this base class ignores it all.

    The registry package counts nothing itself and imports no metrics library: the fetcher
    passes an observer in.  Calls come from the event loop and must not block.
    """

    def request(self, method: str, path: str, status: int | None, seconds: float) -> None:
        """A request to a registry endpoint got its answer's headers (``status``), or failed
        (None), ``seconds`` after it was sent (auth and redirects included); ``path`` is the
        distribution API path after ``/v2``, e.g. ``/<repo>/blobs/<digest>``."""

    def error(self, kind: str) -> None:
        """One attempt failed with an error of ``kind`` (one of ``ERROR_KINDS``)."""

    def retry(self, kind: str) -> None:
        """A request is tried again (or its body resumed) after an error of ``kind``."""


def _status_kind(status: int) -> str:
    """The ``ERROR_KINDS`` entry of an HTTP error status."""
    if status in (401, 403):
        return "unauthorized"
    if status == 404:
        return "not_found"
    if status == 429:
        return "throttled"
    if status in _RETRY_STATUS:
        return "server"
    if status == 416:
        return "range"
    return "http"


class _Response:
    """An open response plus the endpoint it came from; release it with ``close``."""

    def __init__(self, resp: aiohttp.ClientResponse, endpoint: Endpoint, client: "RegistryClient") -> None:
        self.resp = resp
        self.endpoint = endpoint
        self._client = client

    @property
    def status(self) -> int:
        return self.resp.status

    @property
    def headers(self) -> Any:
        return self.resp.headers

    def check_length(self, limit: int, what: str, allowed: str = "") -> None:
        """Raise ResponseTooLargeError (dropping the connection) if Content-Length announces more than ``limit``."""
        announced = self.resp.content_length
        if announced is not None and announced > limit:
            self.resp.close()
            self._client.observer.error("too_large")
            raise ResponseTooLargeError(f"{self.endpoint.describe()} answered {what} with {announced} bytes "
                                        f"(Content-Length); at most {limit} are allowed{allowed}")

    async def read(self, limit: int, what: str, allowed: str = "") -> bytes:
        """The whole body, which must be at most ``limit`` bytes.

        A longer body raises ResponseTooLargeError naming the host, ``what`` and the sizes (plus
        ``allowed``, what the limit is made of) once ``limit`` is passed; at most ``limit + 1``
        bytes are ever held.  Content-Length is not trusted here (a body cut short is retried as
        such): call ``check_length`` first to refuse an announced oversize body unread.
        """
        buf = bytearray()
        while True:
            chunk = await self.resp.content.read(min(_READ_CHUNK, limit + 1 - len(buf)))
            if not chunk:
                return bytes(buf)
            buf += chunk
            self._client._received(len(chunk))
            if len(buf) > limit:
                self.resp.close()
                self._client.observer.error("too_large")
                raise ResponseTooLargeError(f"{self.endpoint.describe()} answered {what} with more than {limit} "
                                            f"bytes; at most {limit} are allowed{allowed}")

    async def collect(self, base: int, ranges: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Pick ``(offset, length)`` ranges of the blob out of a body that starts at blob offset ``base``.

        For a registry that ignores ``Range`` (200, ``base`` 0) or sends one span for several
        ranges: bytes before and between the ranges are discarded as they arrive, and the read
        stops after the last byte wanted (dropping the connection), so memory is the sum of the
        lengths, not the last offset.  A range the body ends inside comes back short; one
        starting before ``base`` is left out.
        """
        todo = sorted(r for r in set(ranges) if r[0] >= base)
        bufs = {r: bytearray() for r in todo}
        stop = max((o + n for o, n in todo), default=base)
        at, first = base, 0  # todo[:first] are complete
        while at < stop:
            data = await self.resp.content.read(min(_READ_CHUNK, stop - at))
            if not data:
                break
            self._client._received(len(data))
            end = at + len(data)
            view = memoryview(data)
            for i in range(first, len(todo)):
                off, length = todo[i]
                if off >= end:
                    break
                if off + length > at:
                    bufs[todo[i]] += view[max(off, at) - at : min(off + length, end) - at]
            at = end
            while first < len(todo) and sum(todo[first]) <= at:
                first += 1
        if not self.resp.content.at_eof():
            self.resp.close()  # the rest is not wanted: do not read it to reuse the connection
        return {r: bytes(buf) for r, buf in bufs.items()}

    def close(self) -> None:
        self.resp.release()


class RegistryClient:
    """Async OCI distribution client; use as ``async with RegistryClient(config) as client``."""

    def __init__(self, config: RegistryConfig | None = None, observer: RegistryObserver | None = None) -> None:
        self.config = config or RegistryConfig()
        self.observer = observer or RegistryObserver()
        self._session: aiohttp.ClientSession | None = None
        self._auth = Authorizer(CredentialStore(self.config.docker_config), self._plain_http_allowed)
        self._endpoints: dict[str, list[Endpoint]] = {}
        self._ssl: dict[Endpoint, ssl.SSLContext | bool] = {}
        self._scheme: dict[Endpoint, str] = {}
        self._scheme_lock = asyncio.Lock()
        self._down_until: dict[Endpoint, float] = {}
        self._single_range_only: set[str] = set()
        self._requests = 0
        self._bytes = 0
        self._in_flight = 0
        self._answered: dict[str, float] = {}  # endpoint host -> monotonic time of its last non-5xx answer

    async def __aenter__(self) -> "RegistryClient":
        self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout,
                                            sock_read=self.config.timeout)
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.config.max_connections_per_host)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                                                  headers={"User-Agent": "lazyd/0.1"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def stats(self) -> RegistryStats:
        """Request counters since the client was created."""
        return RegistryStats(self._requests, self._bytes, self._in_flight)

    def _received(self, n: int) -> None:
        self._bytes += n

    # -- endpoints and TLS -------------------------------------------------------------

    def _plain_http_allowed(self, host: str) -> bool:
        return is_local(host) or host in self.config.plain_http

    def endpoints(self, registry: str) -> list[Endpoint]:
        """The endpoints for ``registry`` from hosts.toml, mirrors first."""
        if registry not in self._endpoints:
            self._endpoints[registry] = load_endpoints(registry, self.config.hosts_dir, self.config.plain_http)
        return self._endpoints[registry]

    def _ssl_for(self, ep: Endpoint) -> ssl.SSLContext | bool:
        if ep not in self._ssl:
            ctx = ssl.create_default_context()
            try:
                for ca in ep.ca:
                    ctx.load_verify_locations(cafile=ca)
                for cert, key in ep.client_certs:
                    ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise UnreachableError(f"TLS settings for {ep.describe()} are unusable: {exc}") from exc
            if ep.skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl[ep] = ctx
        return self._ssl[ep]

    async def _scheme_of(self, ep: Endpoint) -> str:
        """https, or http for a local endpoint whose server does not speak TLS."""
        if not ep.http_fallback:
            return ep.scheme
        async with self._scheme_lock:
            if ep in self._scheme:
                return self._scheme[ep]
            scheme = await self._probe_tls(ep)
            if scheme is None:
                return "https"  # unreachable either way (the request reports it); probe again next time
            self._scheme[ep] = scheme
            return scheme

    async def _probe_tls(self, ep: Endpoint) -> str | None:
        """``https`` or ``http`` by a TLS handshake with a local endpoint; None when it is unreachable."""
        parts = urlsplit(f"https://{ep.host}")
        host, port = parts.hostname or ep.host, parts.port or 443
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA bundle to load (~35 ms): nothing is verified here
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), self.config.connect_timeout)
        except ssl.SSLError:
            log.debug("%s does not speak TLS; using plain HTTP (local host)", ep.host)
            return "http"
        except (OSError, asyncio.TimeoutError):
            return None
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
        return "https"

    # -- requests ----------------------------------------------------------------------

    async def _send(self, ep: Endpoint, method: str, url: str, scopes: tuple[str, ...], headers: dict[str, str],
                    data: bytes | None) -> aiohttp.ClientResponse:
        """One request with auth (one retry after a 401) and redirects without leaking credentials."""
        session = self._open()
        sslctx: ssl.SSLContext | bool = self._ssl_for(ep) if url.startswith("https:") else False
        host = ep.host
        auth = await self._auth.header(session, host, scopes, sslctx)
        tried_refresh = False
        while True:
            hdrs = dict(ep.headers)
            hdrs.update(headers)
            if auth:
                hdrs["Authorization"] = auth
            resp = await self._raw(session, method, url, hdrs, data, sslctx)
            if resp.status == 401 and not tried_refresh:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                tried_refresh = True
                auth = await self._auth.unauthorized(session, host, scopes, challenge, auth, sslctx)
                continue
            break
        redirects = 0
        origin = (urlsplit(url).scheme, urlsplit(url).netloc)
        while resp.status in _REDIRECTS and "Location" in resp.headers:
            redirects += 1
            if redirects > 10:
                resp.release()
                raise UnreachableError(f"too many redirects from {ep.describe()} for {method} {urlsplit(url).path}")
            target = urljoin(str(resp.url), resp.headers["Location"])
            resp.release()
            parts = urlsplit(target)
            if parts.scheme == "http" and not self._plain_http_allowed(parts.netloc):
                raise UnreachableError(f"{ep.describe()} redirected to plain-HTTP host {parts.netloc}, which is not allowed")
            same_origin = (parts.scheme, parts.netloc) == origin
            hdrs = dict(headers)
            if same_origin:
                hdrs.update(dict(ep.headers))
                if auth:
                    hdrs["Authorization"] = auth
            sslctx = (self._ssl_for(ep) if same_origin else True) if parts.scheme == "https" else False
            if resp.status == 303:
                method, data = "GET", None
            log.debug("redirect to %s://%s%s", parts.scheme, parts.netloc, parts.path)
            resp = await self._raw(session, method, target, hdrs, data, sslctx)
        return resp

    async def _raw(self, session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
                   data: bytes | None, sslctx: ssl.SSLContext | bool) -> aiohttp.ClientResponse:
        self._requests += 1
        self._in_flight += 1
        netloc = urlsplit(url).netloc
        try:
            resp = await session.request(method, url, headers=headers, data=data, ssl=sslctx, allow_redirects=False)
        except BaseException:
            self._answered.pop(netloc, None)  # the next ping asks again
            raise
        finally:
            self._in_flight -= 1
        log.debug("%s %s -> %d", method, url.split("?", 1)[0], resp.status)
        if resp.status < 500:
            self._answered[netloc] = time.monotonic()
        else:
            self._answered.pop(netloc, None)
        return resp

    async def _timed(self, method: str, path: str, send: Awaitable[aiohttp.ClientResponse]) -> aiohttp.ClientResponse:
        """Await ``send`` (one ``_send``), reporting it to the observer with its duration."""
        started = time.monotonic()
        status: int | None = None
        try:
            resp = await send
            status = resp.status
            return resp
        finally:
            self.observer.request(method, path, status, time.monotonic() - started)

    def _retrying(self, kind: str, why: str, delay: float, retry: int, retries: int, registry: str) -> None:
        """Report and log (INFO) that a request is about to be tried again."""
        self.observer.retry(kind)
        log.info("registry %s: %s; retrying in %.2fs (retry %d of %d)", registry, why, delay, retry, retries,
                 extra={"event": "retry", "registry": registry, "kind": kind, "retry": retry})

    async def _call(self, registry: str, repository: str, method: str, path: str, *, capability: str,
                    actions: str = "pull", headers: dict[str, str] | None = None, data: bytes | None = None,
                    ok: tuple[int, ...] = (200,), what: str = "", extra_scopes: tuple[str, ...] = ()) -> _Response:
        """Send to each endpoint in turn until one answers with a status in ``ok``."""
        idempotent = method in ("GET", "HEAD")
        endpoints = [ep for ep in self.endpoints(registry) if capability in ep.capabilities]
        if not endpoints:
            raise RegistryError(f"no endpoint of registry {registry} has the {capability!r} capability (hosts.toml)")
        scopes = (scope_for(repository, actions), *extra_scopes) if repository else extra_scopes
        what = what or f"{method} {path}"
        last: RegistryError | None = None
        kind = ""  # of ``last`` (ERROR_KINDS)
        for i, ep in enumerate(endpoints):
            final = i == len(endpoints) - 1
            where = ep.describe()
            if not final and self._down_until.get(ep, 0) > time.monotonic():
                continue
            attempts = 1 + (self.config.retries if idempotent and final else 0)
            asked = 0.0  # the Retry-After of the last answer
            for attempt in range(attempts):
                if attempt:
                    delay = max(self.config.backoff * (2 ** (attempt - 1)), asked)
                    self._retrying(kind, f"{last}", delay, attempt, attempts - 1, registry)
                    await asyncio.sleep(delay)
                asked = 0.0
                try:
                    scheme = await self._scheme_of(ep)
                    where = f"{'mirror ' if ep.mirror else ''}{scheme}://{ep.host}"
                    url = f"{scheme}://{ep.host}{ep.path}{path}"
                    resp = await self._timed(method, path, self._send(ep, method, url, scopes, headers or {}, data))
                except aiohttp.ClientConnectorCertificateError as exc:
                    last, kind = UnreachableError(f"TLS certificate of {ep.describe()} ({registry}) is not trusted: "
                                                  f"{exc.certificate_error}"), "tls"
                    self.observer.error(kind)
                    break
                except aiohttp.ClientSSLError as exc:
                    last, kind = UnreachableError(f"TLS handshake with {ep.describe()} ({registry}) failed: {exc}"), "tls"
                    self.observer.error(kind)
                    break
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    last, kind = UnreachableError(f"{where} ({registry}) is unreachable for {what}: "
                                                  f"{type(exc).__name__}: {exc}"), "unreachable"
                    self.observer.error(kind)
                    self._down_until[ep] = time.monotonic() + _DOWN_SECONDS
                    continue
                except UnauthorizedError as exc:
                    last, kind = exc, "unauthorized"
                    self.observer.error(kind)
                    break
                if resp.status in ok:
                    self._down_until.pop(ep, None)
                    return _Response(resp, ep, self)
                status = resp.status
                kind = _status_kind(status)
                self.observer.error(kind)
                body = (await resp.content.read(4096)) if method != "HEAD" else b""
                resp.release()
                detail = _error_detail(body)
                if status in (401, 403):
                    sent = resp.request_info.headers.get("Authorization", "")
                    why = ("it rejected the configured credentials" if sent.startswith("Basic ") else
                           "the token it issued does not grant access" if sent.startswith("Bearer ") else
                           "no credentials are configured")
                    last = UnauthorizedError(f"registry {registry} ({where}) denied {what} for scope "
                                             f"{' '.join(scopes)}: HTTP {status}, {why}{detail}")
                    break
                if status == 404:
                    last = NotFoundError(f"{what} not found in {registry}/{repository} ({where}){detail}")
                    break
                if status in _RETRY_STATUS:
                    last = UnreachableError(f"{where} ({registry}) answered HTTP {status} for {what}{detail}")
                    if status in (429, 503) and (asked := retry_after(resp.headers.get("Retry-After"))):
                        if asked > self.config.max_retry_after:
                            last = UnreachableError(
                                f"{where} ({registry}) answered HTTP {status} for {what} and asks to retry after "
                                f"{asked:.0f}s, longer than max_retry_after ({self.config.max_retry_after:g}s){detail}")
                            break
                    continue
                if status == 416:
                    raise RangeNotSupportedError(f"{where} ({registry}) cannot serve the range asked for in {what}{detail}")
                raise RegistryError(f"{where} ({registry}) answered HTTP {status} for {what}{detail}")
        assert last is not None
        raise last

    # -- public API: pull --------------------------------------------------------------

    async def ping(self, ref: Reference, fresh_within: float = 0.0) -> None:
        """Raise UnreachableError unless some endpoint of the registry answers ``/v2/``.

        With ``fresh_within`` > 0, an endpoint that answered any request that many seconds
        ago or less counts as reachable without a new request.
        """
        if fresh_within > 0:
            now = time.monotonic()
            for ep in self.endpoints(ref.registry):
                answered = self._answered.get(ep.host)
                if answered is not None and now - answered <= fresh_within:
                    return
        errors = []
        for ep in self.endpoints(ref.registry):
            try:
                scheme = await self._scheme_of(ep)
                resp = await self._raw(self._open(), "GET", f"{scheme}://{ep.host}{ep.path}/", dict(ep.headers), None,
                                       self._ssl_for(ep) if scheme == "https" else False)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                errors.append(f"{ep.describe()}: {type(exc).__name__}")
                continue
            resp.release()
            if resp.status in (200, 401):
                return
            errors.append(f"{ep.describe()}: HTTP {resp.status}")
        raise UnreachableError(f"registry {ref.registry} is unreachable ({'; '.join(errors)})")

    async def get_manifest(self, ref: Reference, digest: str | None = None) -> tuple[bytes, str, str]:
        """Fetch a manifest or index: (body, media type, verified digest)."""
        obj = digest or ref.object

        async def attempt() -> tuple[bytes, str | None, str]:
            resp = await self._call(ref.registry, ref.repository, "GET", f"/{ref.repository}/manifests/{obj}",
                                    capability=CAP_RESOLVE if not digest and not ref.digest else CAP_PULL,
                                    headers={"Accept": ACCEPT_MANIFESTS}, what=f"manifest {obj}")
            try:
                resp.check_length(MAX_MANIFEST_SIZE, f"manifest {obj} of {ref.name}", " (MAX_MANIFEST_SIZE)")
                return (await resp.read(MAX_MANIFEST_SIZE, f"manifest {obj} of {ref.name}", " (MAX_MANIFEST_SIZE)"),
                        resp.headers.get("Docker-Content-Digest"),
                        resp.headers.get("Content-Type", "").split(";")[0].strip())
            finally:
                resp.close()

        body, header_digest, content_type = await self._with_body_retries(f"manifest {obj} of {ref.name}", attempt,
                                                                          ref.registry)
        expected = digest or ref.digest or header_digest
        actual = digest_of(body, expected.split(":", 1)[0] if expected else "sha256")
        if expected and actual != expected:
            self.observer.error("digest")
            raise DigestMismatchError(f"manifest {obj} of {ref.name} has digest {actual}, expected {expected}")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ManifestError(f"manifest {obj} of {ref.name} is not JSON") from exc
        media_type = doc.get("mediaType") if isinstance(doc, dict) else None
        media_type = media_type or content_type
        if media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
            if isinstance(doc, dict) and "manifests" in doc:
                media_type = INDEX_TYPES[0]
            elif isinstance(doc, dict) and doc.get("schemaVersion") == 2 and "layers" in doc:
                media_type = MANIFEST_TYPES[0]
            else:
                raise ManifestError(f"manifest {obj} of {ref.name} has unsupported media type {media_type or '?'}"
                                    " (schema 1 manifests are not supported)")
        return body, media_type, actual

    async def resolve(self, ref: Reference, platform: str | Platform | None = None,
                      on_manifest: Callable[[Reference, list[Descriptor]], None] | None = None) -> Image:
        """Resolve ``ref`` to one platform's manifest and config (host platform by default).

        ``on_manifest(ref pinned to the manifest digest, layers)`` is called as soon as the
        manifest is in, before the config is fetched (lazyd starts opening layers then).
        """
        body, media_type, digest = await self.get_manifest(ref)
        index: tuple[bytes, str, str] | None = None
        if media_type in INDEX_TYPES:
            index = (body, media_type, digest)
            child = select_platform(json.loads(body), platform, f"{ref}")
            body, media_type, digest = await self.get_manifest(ref, child.digest)
            if media_type not in MANIFEST_TYPES:
                raise ManifestError(f"index entry {child.digest} of {ref} is not an image manifest ({media_type})")
        return await self._image(ref, body, media_type, digest, index, on_manifest)

    async def _image(self, ref: Reference, body: bytes, media_type: str, digest: str,
                     index: tuple[bytes, str, str] | None,
                     on_manifest: Callable[[Reference, list[Descriptor]], None] | None = None) -> Image:
        """The image of manifest ``body``; ``index`` is (body, media type, digest) of the index it came from."""
        try:
            manifest = json.loads(body)
            config_desc = Descriptor.from_json(manifest.get("config"), f"manifest {digest} of {ref.name} config")
        except (ValueError, AttributeError):
            raise ManifestError(f"manifest {digest} of {ref.name} has no config descriptor") from None
        if on_manifest is not None and isinstance(manifest.get("layers"), list):
            where = f"manifest {digest} of {ref.name}"
            layers = [Descriptor.from_json(d, f"{where} layer {i}") for i, d in enumerate(manifest["layers"])]
            on_manifest(ref if ref.digest else ref.with_digest(digest), layers)
        config_bytes = await self.fetch_bytes(ref, config_desc.digest, max_size=MAX_MANIFEST_SIZE)
        return Image.from_raw(ref, body, media_type, digest, config_bytes, index)

    async def blob_size(self, ref: Reference, digest: str) -> int:
        """The size of a blob from a HEAD request."""
        validate_digest(digest)
        resp = await self._call(ref.registry, ref.repository, "HEAD", f"/{ref.repository}/blobs/{digest}",
                                capability=CAP_PULL, what=f"blob {digest}")
        resp.close()
        length = resp.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RegistryError(f"{resp.endpoint.describe()} sent no Content-Length for blob {digest} of {ref.name}")
        return int(length)

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        """True when the repository has the blob (HEAD 200), False on 404."""
        try:
            await self.blob_size(ref, digest)
            return True
        except NotFoundError:
            return False

    async def fetch_bytes(self, ref: Reference, digest: str, max_size: int = 64 * 1024 * 1024) -> bytes:
        """A small blob in memory, digest verified; one of more than ``max_size`` bytes is a ResponseTooLargeError."""
        async def attempt() -> tuple[bytes, _Response]:
            resp = await self._call(ref.registry, ref.repository, "GET", f"/{ref.repository}/blobs/{digest}",
                                    capability=CAP_PULL, what=f"blob {digest}")
            try:
                return await resp.read(max_size, f"blob {digest} of {ref.name}"), resp
            finally:
                resp.close()

        data, resp = await self._with_body_retries(f"blob {digest} of {ref.name}", attempt, ref.registry)
        h = hasher(digest)
        h.update(data)
        if f"{digest.split(':')[0]}:{h.hexdigest()}" != digest:
            self.observer.error("digest")
            raise DigestMismatchError(f"blob {digest} of {ref.name} downloaded from "
                                      f"{resp.endpoint.describe()} does not match its digest")
        return data

    async def fetch_blob(self, ref: Reference, digest: str, path: str | os.PathLike[str],
                         progress: ProgressFn | None = None, size: int | None = None) -> int:
        """Download a whole blob to ``path`` (atomically), verifying its digest; returns its size.

        With ``size`` (the descriptor's), an answer announcing or carrying more bytes is a
        ResponseTooLargeError as soon as it shows; without it only the digest check at the end
        bounds the body.  Hashing and file writes run in a worker thread, ``WRITE_BATCH`` bytes
        at a time and overlapping the download, so the event loop never waits on the disk.
        """
        validate_digest(digest)
        dst = Path(path)
        tmp = dst.with_name(f".{dst.name}.part-{os.getpid()}")
        what = f"blob {digest} of {ref.name}"
        attempts = 1 + self.config.retries
        for attempt in range(attempts):
            h = hasher(digest)
            received = [0]
            resp = await self._call(ref.registry, ref.repository, "GET", f"/{ref.repository}/blobs/{digest}",
                                    capability=CAP_PULL, what=f"blob {digest}")
            try:
                if size is not None:
                    resp.check_length(size, what, " (the descriptor's size)")
                f = await asyncio.to_thread(open, tmp, "wb")
                try:
                    await self._write_body(resp, f, h, size, what, progress, received)
                finally:
                    await asyncio.to_thread(f.close)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                await asyncio.to_thread(tmp.unlink, missing_ok=True)
                if progress and received[0]:
                    progress(-received[0])
                self.observer.error("body")
                if attempt + 1 < attempts:
                    delay = self.config.backoff * (2 ** attempt)
                    self._retrying("body", f"download of {what} failed ({type(exc).__name__})", delay, attempt + 1,
                                   attempts - 1, ref.registry)
                    await asyncio.sleep(delay)
                    continue
                raise UnreachableError(f"download of {what} failed: {type(exc).__name__}") from exc
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finally:
                resp.close()
            actual = f"{digest.split(':')[0]}:{h.hexdigest()}"
            if actual != digest:
                await asyncio.to_thread(tmp.unlink, missing_ok=True)
                self.observer.error("digest")
                raise DigestMismatchError(f"{what} from {resp.endpoint.describe()} hashes to {actual}")
            await asyncio.to_thread(os.replace, tmp, dst)
            return received[0]
        raise AssertionError("unreachable")

    async def _write_body(self, resp: _Response, f: Any, h: Any, limit: int | None, what: str,
                          progress: ProgressFn | None, received: list[int]) -> None:
        """Hash and write the body to ``f`` in a worker thread, one batch while the next arrives.

        ``received[0]`` counts the bytes taken from the network (and reported to ``progress``);
        more than ``limit`` raises ResponseTooLargeError.
        """
        def write(chunks: list[bytes]) -> None:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)

        pending: asyncio.Future[None] | None = None
        batch: list[bytes] = []
        batched = 0
        try:
            while True:
                chunk = await resp.resp.content.read(_READ_CHUNK)
                if chunk:
                    received[0] += len(chunk)
                    self._received(len(chunk))
                    if limit is not None and received[0] > limit:
                        resp.resp.close()
                        raise ResponseTooLargeError(f"{resp.endpoint.describe()} answered {what} with more than "
                                                    f"{limit} bytes; at most {limit} are allowed "
                                                    "(the descriptor's size)")
                    if progress:
                        progress(len(chunk))
                    batch.append(chunk)
                    batched += len(chunk)
                if batched and (batched >= WRITE_BATCH or not chunk):
                    if pending is not None:
                        await asyncio.shield(pending)  # a cancel must not detach a running write
                    pending = asyncio.ensure_future(asyncio.to_thread(write, batch))
                    batch, batched = [], 0
                if not chunk:
                    break
            if pending is not None:
                await asyncio.shield(pending)
        finally:
            if pending is not None and not pending.done():
                await asyncio.wait([pending])  # never close the file under a running write
            if pending is not None and pending.done() and not pending.cancelled():
                pending.exception()  # retrieved: the error that matters is already propagating

    async def fetch_ranges(self, ref: Reference, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Bytes of each ``(offset, length)`` range of a blob, in the order asked.

        Several ranges go in one multi-range request when the registry supports it;
        otherwise (or when it ignores ``Range`` and sends the whole blob) the client
        falls back to single ranges, reading no further than the last byte needed.
        """
        validate_digest(digest)
        for off, length in ranges:
            if off < 0 or length <= 0:
                raise ValueError(f"invalid range (offset={off}, length={length}) for blob {digest}")
        if not ranges:
            return []
        wanted = sorted(set(ranges))
        got: dict[tuple[int, int], bytes] = {}
        if len(wanted) == 1 or ref.registry in self._single_range_only:
            await self._fetch_singles(ref, digest, wanted, got)
        else:
            n = max(1, self.config.max_ranges_per_request)
            batches = [wanted[i : i + n] for i in range(0, len(wanted), n)]
            await asyncio.gather(*(self._fetch_multi(ref, digest, b, got) for b in batches))
        return [got[r] for r in ranges]

    async def _fetch_singles(self, ref: Reference, digest: str, wanted: list[tuple[int, int]],
                             got: dict[tuple[int, int], bytes]) -> None:
        sem = asyncio.Semaphore(max(1, self.config.max_connections_per_host))

        async def one(r: tuple[int, int]) -> None:
            async with sem:
                got[r] = await self._fetch_single(ref, digest, r)

        await asyncio.gather(*(one(r) for r in wanted))

    async def _with_body_retries(self, what: str, fn: Callable[[], Awaitable[Any]], registry: str) -> Any:
        """Run ``fn`` (a request plus body read); retry when the body breaks off mid-way."""
        attempts = 1 + self.config.retries
        for attempt in range(attempts):
            try:
                return await fn()
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                    asyncio.TimeoutError) as exc:
                self.observer.error("body")
                if attempt + 1 >= attempts:
                    raise UnreachableError(f"reading {what} failed after {attempts} attempts: "
                                           f"{type(exc).__name__}") from exc
                delay = self.config.backoff * (2 ** attempt)
                self._retrying("body", f"reading {what} failed ({type(exc).__name__})", delay, attempt + 1,
                               attempts - 1, registry)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _fetch_single(self, ref: Reference, digest: str, r: tuple[int, int]) -> bytes:
        off, length = r
        what = f"range {off}+{length} of blob {digest} in {ref.name}"

        async def attempt() -> bytes:
            resp = await self._call(ref.registry, ref.repository, "GET", f"/{ref.repository}/blobs/{digest}",
                                    capability=CAP_PULL, headers={"Range": f"bytes={off}-{off + length - 1}"},
                                    ok=(200, 206), what=what)
            try:
                # 200: the registry ignored Range; skip to ``off`` without keeping what comes before.
                start = 0 if resp.status == 200 else _content_range_start(resp.headers.get("Content-Range"), what)
                if start > off:
                    self.observer.error("range")
                    raise RangeNotSupportedError(f"{resp.endpoint.describe()} answered {what} with bytes from {start}")
                return (await resp.collect(start, [r]))[r]
            finally:
                resp.close()

        data = await self._with_body_retries(what, attempt, ref.registry)
        if len(data) != length:
            self.observer.error("range")
            raise RangeNotSupportedError(f"{what}: got {len(data)} bytes (range past the end of the blob?)")
        return data

    async def stream_range(self, ref: Reference, digest: str, offset: int, length: int,
                           sink: Callable[[int, bytes], Awaitable[None]]) -> None:
        """Deliver one range of a blob to ``await sink(blob_offset, data)`` in order, as it arrives.

        A body that breaks off is resumed from the next missing byte (``retries`` times), so
        ``sink`` sees every byte exactly once; a registry that ignores ``Range`` is read from
        the start and the bytes before ``offset`` are skipped.
        """
        validate_digest(digest)
        if offset < 0 or length <= 0:
            raise ValueError(f"invalid range (offset={offset}, length={length}) for blob {digest}")
        end = offset + length
        pos = offset
        what = f"range {offset}+{length} of blob {digest} in {ref.name}"
        attempts = 1 + self.config.retries
        for attempt in range(attempts):
            resp = await self._call(ref.registry, ref.repository, "GET", f"/{ref.repository}/blobs/{digest}",
                                    capability=CAP_PULL, headers={"Range": f"bytes={pos}-{end - 1}"},
                                    ok=(200, 206), what=what)
            try:
                at = 0 if resp.status == 200 else _content_range_start(resp.headers.get("Content-Range"), what)
                if at > pos:
                    self.observer.error("range")
                    raise RangeNotSupportedError(f"{resp.endpoint.describe()} answered {what} with bytes from {at}")
                while pos < end:
                    data = await resp.resp.content.read(min(1 << 18, end - at))
                    if not data:
                        self.observer.error("range")
                        raise RangeNotSupportedError(f"{what}: the body ended at byte {at} of the blob")
                    self._received(len(data))
                    lo, at = max(pos - at, 0), at + len(data)
                    if at > pos:
                        chunk = data[lo:] if at <= end else data[lo : len(data) - (at - end)]
                        await sink(pos, chunk)
                        pos += len(chunk)
                return
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                    asyncio.TimeoutError) as exc:
                self.observer.error("body")
                if attempt + 1 >= attempts:
                    raise UnreachableError(f"reading {what} failed after {attempts} attempts at byte {pos}: "
                                           f"{type(exc).__name__}") from exc
                delay = self.config.backoff * (2 ** attempt)
                self._retrying("body", f"reading {what} broke off at byte {pos} ({type(exc).__name__}); resuming",
                               delay, attempt + 1, attempts - 1, ref.registry)
                await asyncio.sleep(delay)
            finally:
                if pos < end or not resp.resp.content.at_eof():
                    resp.resp.close()  # a partial read: do not return the connection to the pool
                else:
                    resp.close()

    async def _fetch_multi(self, ref: Reference, digest: str, batch: list[tuple[int, int]],
                           got: dict[tuple[int, int], bytes]) -> None:
        if len(batch) == 1 or ref.registry in self._single_range_only:
            await self._fetch_singles(ref, digest, batch, got)
            return
        spec = ",".join(f"{o}-{o + n - 1}" for o, n in batch)
        what = f"{len(batch)} ranges of blob {digest} in {ref.name}"
        try:
            resp = await self._call(ref.registry, ref.repository, "GET", f"/{ref.repository}/blobs/{digest}",
                                    capability=CAP_PULL, headers={"Range": f"bytes={spec}"}, ok=(200, 206), what=what)
        except RangeNotSupportedError:
            self._single_range_only.add(ref.registry)
            await self._fetch_singles(ref, digest, batch, got)
            return
        except RegistryError as exc:
            if isinstance(exc, (NotFoundError, UnauthorizedError, UnreachableError)):
                raise
            log.debug("multi-range GET refused by %s (%s); using single ranges", ref.registry, exc)
            self._single_range_only.add(ref.registry)
            await self._fetch_singles(ref, digest, batch, got)
            return
        try:
            parts = await self._read_parts(resp, batch, what)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                asyncio.TimeoutError) as exc:
            log.debug("multi-range answer broke off (%s); using single ranges with retries", type(exc).__name__)
            parts = {}
        missing = []
        for r in batch:
            data = parts.get(r)
            if data is not None and len(data) == r[1]:
                got[r] = data
            else:
                missing.append(r)
        if missing:
            await self._fetch_singles(ref, digest, missing, got)

    async def _read_parts(self, resp: _Response, batch: list[tuple[int, int]],
                          what: str) -> dict[tuple[int, int], bytes]:
        """The ranges of ``batch`` found in the answer to a multi-range GET (some may be missing or short).

        A multipart answer may carry the asked bytes plus ``MULTIPART_PART_OVERHEAD`` per part;
        a 200 (Range ignored) or a single 206 span is streamed, keeping only the wanted bytes.
        """
        try:
            ctype = resp.headers.get("Content-Type", "")
            if resp.status == 200:
                return await resp.collect(0, batch)
            if ctype.startswith("multipart/byteranges"):
                asked = sum(n for _, n in batch)
                overhead = (len(batch) + 1) * MULTIPART_PART_OVERHEAD
                allowed = f" ({asked} bytes asked for plus {overhead} of multipart delimiters and part headers)"
                resp.check_length(asked + overhead, what, allowed)
                body = await resp.read(asked + overhead, what, allowed)
                return _pick_ranges(_parse_multipart(body, _boundary(ctype), what), batch)
            start = _content_range_start(resp.headers.get("Content-Range"), what)
            return await resp.collect(start, batch)
        finally:
            resp.close()

    # -- public API: push --------------------------------------------------------------

    async def push_blob(self, ref: Reference, digest: str, source: str | os.PathLike[str] | bytes,
                        mount_from: Reference | None = None, progress: ProgressFn | None = None) -> str:
        """Upload a blob unless the repository has it; returns "exists", "mounted" or "uploaded"."""
        validate_digest(digest)
        if await self.blob_exists(ref, digest):
            return "exists"
        extra: tuple[str, ...] = ()
        query = ""
        if mount_from is not None and mount_from.registry == ref.registry and mount_from.repository != ref.repository:
            extra = (scope_for(mount_from.repository, "pull"),)
            query = f"?mount={digest}&from={mount_from.repository}"
        resp = await self._call(ref.registry, ref.repository, "POST", f"/{ref.repository}/blobs/uploads/{query}",
                                capability=CAP_PUSH, actions="pull,push", ok=(201, 202), extra_scopes=extra,
                                what=f"upload of blob {digest}")
        resp.close()
        if resp.status == 201:
            return "mounted"
        location = self._location(resp, ref, "upload start")
        size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
        chunk = max(1, self.config.upload_chunk_size)
        if size <= chunk:
            data = source if isinstance(source, bytes) else await asyncio.to_thread(Path(source).read_bytes)
            await self._finish_upload(ref, digest, location, data, progress)
            return "uploaded"
        offset = 0
        with (open(source, "rb") if not isinstance(source, bytes) else _BytesReader(source)) as f:  # type: ignore[arg-type]
            while offset < size:
                data = f.read(chunk) if isinstance(f, _BytesReader) else await asyncio.to_thread(f.read, chunk)
                headers = {"Content-Type": "application/octet-stream",
                           "Content-Range": f"{offset}-{offset + len(data) - 1}"}
                resp = await self._upload_request(ref, "PATCH", location, headers, data, (202,), digest)
                resp.close()
                location = self._location(resp, ref, "chunk upload")
                offset += len(data)
                if progress:
                    progress(len(data))
        await self._finish_upload(ref, digest, location, b"", None)
        return "uploaded"

    async def mount_blob(self, ref: Reference, digest: str, mount_from: Reference) -> bool:
        """Cross-repository mount of a blob within one registry; False when the registry declines."""
        validate_digest(digest)
        if mount_from.registry != ref.registry:
            return False
        resp = await self._call(ref.registry, ref.repository, "POST",
                                f"/{ref.repository}/blobs/uploads/?mount={digest}&from={mount_from.repository}",
                                capability=CAP_PUSH, actions="pull,push", ok=(201, 202),
                                extra_scopes=(scope_for(mount_from.repository, "pull"),),
                                what=f"mount of blob {digest}")
        resp.close()
        if resp.status == 201:
            return True
        # The registry opened an upload instead; cancel it.
        location = self._location(resp, ref, "mount")
        try:
            cancel = await self._upload_request(ref, "DELETE", location, {}, b"", (200, 202, 204, 404), digest)
            cancel.close()
        except RegistryError as exc:
            log.debug("cancelling upload after a declined mount failed: %s", exc)
        return False

    async def _finish_upload(self, ref: Reference, digest: str, location: str, data: bytes,
                             progress: ProgressFn | None) -> None:
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream"}
        resp = await self._upload_request(ref, "PUT", f"{location}{sep}digest={digest}", headers, data, (201, 204), digest)
        resp.close()
        if progress and data:
            progress(len(data))

    async def _upload_request(self, ref: Reference, method: str, url: str, headers: dict[str, str], data: bytes,
                              ok: tuple[int, ...], digest: str) -> _Response:
        """PATCH/PUT to an upload location (absolute URL from the registry); not retried."""
        ep = next(ep for ep in self.endpoints(ref.registry) if CAP_PUSH in ep.capabilities)
        scopes = (scope_for(ref.repository, "pull,push"),)
        try:
            raw = await self._send(ep, method, url, scopes, headers, data)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UnreachableError(f"{ep.describe()} ({ref.registry}) failed during upload of {digest}: "
                                   f"{type(exc).__name__}") from exc
        if raw.status not in ok:
            body = await raw.content.read(4096)
            raw.release()
            if raw.status in (401, 403):
                raise UnauthorizedError(f"registry {ref.registry} denied upload of {digest} for scope {scopes[0]}")
            if raw.status == 400 and b"DIGEST_INVALID" in body:
                raise DigestMismatchError(f"registry {ref.registry} says uploaded blob does not match {digest}")
            raise RegistryError(f"{ep.describe()} answered HTTP {raw.status} to {method} during upload of "
                                f"{digest}{_error_detail(body)}")
        return _Response(raw, ep, self)

    def _location(self, resp: _Response, ref: Reference, what: str) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(f"{resp.endpoint.describe()} sent no Location for {what} in {ref.name}")
        return urljoin(str(resp.resp.url), loc)

    async def put_manifest(self, ref: Reference, body: bytes, media_type: str) -> str:
        """PUT a manifest or index under ``ref``'s tag (or its digest); returns its digest."""
        digest = digest_of(body)
        obj = ref.tag or ref.digest or digest
        resp = await self._call(ref.registry, ref.repository, "PUT", f"/{ref.repository}/manifests/{obj}",
                                capability=CAP_PUSH, actions="pull,push", headers={"Content-Type": media_type},
                                data=body, ok=(200, 201, 202, 204), what=f"push of manifest {obj}")
        resp.close()
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise DigestMismatchError(f"registry {ref.registry} stored manifest {obj} as {returned}, expected {digest}")
        return digest

    async def push_manifest(self, ref: Reference, body: bytes, media_type: str, tag: str | None = None) -> ManifestPush:
        """PUT a manifest under ``tag``, or under its own digest when ``tag`` is None; returns its
        digest and the ``OCI-Subject`` header (a registry with the referrers API sets it)."""
        digest = digest_of(body)
        obj = tag or digest
        resp = await self._call(ref.registry, ref.repository, "PUT", f"/{ref.repository}/manifests/{obj}",
                                capability=CAP_PUSH, actions="pull,push", headers={"Content-Type": media_type},
                                data=body, ok=(200, 201, 202, 204), what=f"push of manifest {obj}")
        resp.close()
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise DigestMismatchError(f"registry {ref.registry} stored manifest {obj} as {returned}, expected {digest}")
        return ManifestPush(digest, resp.headers.get("OCI-Subject") or None)

    async def referrers(self, ref: Reference, digest: str, artifact_type: str | None = None,
                        max_size: int = MAX_MANIFEST_SIZE) -> bytes | None:
        """The referrers index of manifest ``digest`` (``GET /v2/<name>/referrers/<digest>``), or
        None when the registry has no referrers API (404).  The index is checked to be JSON with
        a ``manifests`` list; ``artifact_type`` is passed as the filter (registries may ignore it)."""
        validate_digest(digest)
        query = f"?artifactType={quote(artifact_type, safe='')}" if artifact_type else ""
        what = f"referrers of {digest}"
        try:
            resp = await self._call(ref.registry, ref.repository, "GET", f"/{ref.repository}/referrers/{digest}{query}",
                                    capability=CAP_PULL, headers={"Accept": MEDIA_OCI_INDEX}, what=what)
        except NotFoundError:
            return None
        try:
            resp.check_length(max_size, f"{what} in {ref.name}")
            body = await resp.read(max_size, f"{what} in {ref.name}")
        finally:
            resp.close()
        try:
            doc = json.loads(body)
        except ValueError:
            raise ManifestError(f"{what} in {ref.name}: the answer is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
            raise ManifestError(f"{what} in {ref.name}: the answer is not an image index (no 'manifests' list)")
        return body


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int) -> bytes:
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def __enter__(self) -> "_BytesReader":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def select_platform(index: Any, platform: str | Platform | None, where: str) -> Descriptor:
    """The manifest descriptor of ``platform`` (host's by default) in an image index."""
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ManifestError(f"index of {where} has no manifests list")
    want = platform if isinstance(platform, Platform) else Platform.parse(platform) if platform else Platform.host()
    descs = [Descriptor.from_json(m, f"index of {where}") for m in index["manifests"]]
    for desc in descs:
        if desc.media_type in MANIFEST_TYPES and want.matches(desc.platform):
            return desc
    available = ", ".join(sorted({str(Platform.parse(f"{d.platform.get('os')}/{d.platform.get('architecture')}"))
                                  for d in descs if d.platform and d.platform.get("os") and d.platform.get("architecture")}))
    raise ManifestError(f"{where} has no manifest for platform {want} (available: {available or 'none'})")


def _error_detail(body: bytes) -> str:
    try:
        doc = json.loads(body)
        errs = doc.get("errors") or []
        codes = [f"{e.get('code')}: {e.get('message')}" for e in errs if isinstance(e, dict)]
        return f" ({'; '.join(codes)})" if codes else ""
    except (ValueError, AttributeError):
        return ""


def _content_range_start(value: str | None, what: str) -> int:
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise RangeNotSupportedError(f"partial answer to {what} has no valid Content-Range ({value!r})")
    return int(m.group(1))


def _boundary(content_type: str) -> str:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise RangeNotSupportedError(f"multipart answer without a boundary: {content_type!r}")
    return m.group(1)


def _pick_ranges(parts: list[tuple[int, bytes]], batch: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """Each ``(offset, length)`` of ``batch`` that lies inside one of the ``(start, data)`` parts."""
    out: dict[tuple[int, int], bytes] = {}
    for r in batch:
        off, length = r
        for start, data in parts:
            if start <= off and off + length <= start + len(data):
                out[r] = data[off - start : off - start + length]
                break
    return out


def _parse_multipart(body: bytes, boundary: str, what: str) -> list[tuple[int, bytes]]:
    """Split a multipart/byteranges body into (start, data) parts using each part's Content-Range."""
    delim = f"--{boundary}".encode()
    parts: list[tuple[int, bytes]] = []
    pos = body.find(delim)
    while pos >= 0:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            break
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise RangeNotSupportedError(f"truncated multipart answer to {what}")
        headers = body[pos:head_end].decode("latin-1").split("\r\n")
        crange = next((h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("content-range:")), None)
        m = _CONTENT_RANGE.match(crange or "")
        if not m:
            raise RangeNotSupportedError(f"multipart part without Content-Range in answer to {what}")
        start, end = int(m.group(1)), int(m.group(2))
        data_start = head_end + 4
        data = body[data_start : data_start + end - start + 1]
        if len(data) != end - start + 1:
            raise RangeNotSupportedError(f"truncated multipart part in answer to {what}")
        parts.append((start, data))
        pos = body.find(delim, data_start + len(data))
    return parts
