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
RangeSink = Callable[[int, int, bytes], Awaitable[None]]
"""``sink(range_index, blob_offset, data)`` of ``RegistryClient.stream_ranges``."""
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

    def close(self) -> None:
        self.resp.release()


class _Body:
    """A response body read in pieces: lines (multipart delimiters and part headers) and spans of
    blob bytes handed to a ``RangeSink``; with ``limit`` set, more bytes raise ResponseTooLargeError."""

    def __init__(self, resp: _Response, client: "RegistryClient") -> None:
        self._resp = resp
        self._client = client
        self._buf = bytearray()  # read ahead of a line's end, not consumed yet
        self._left: int | None = None
        self._limit = (0, "", "")

    def limit(self, limit: int, what: str, allowed: str) -> None:
        """From now on at most ``limit`` bytes may be read (``what``/``allowed`` name it in the error)."""
        self._left = limit
        self._limit = (limit, what, allowed)

    async def _read(self, n: int) -> bytes:
        if self._left is not None:
            n = min(n, self._left + 1)
        data = await self._resp.resp.content.read(n)
        self._client._received(len(data))
        if self._left is not None:
            self._left -= len(data)
            if self._left < 0:
                limit, what, allowed = self._limit
                self._resp.resp.close()
                self._client.observer.error("too_large")
                raise ResponseTooLargeError(f"{self._resp.endpoint.describe()} answered {what} with more than "
                                            f"{limit} bytes; at most {limit} are allowed{allowed}")
        return data

    async def drain(self) -> None:
        """Read (and drop) the rest of the body, within the limit."""
        self._buf.clear()
        while await self._read(_READ_CHUNK):
            pass

    async def line(self) -> bytes | None:
        """The next line with its end; the rest of the body if it ends without one; None at the end."""
        scanned = 0
        while (nl := self._buf.find(b"\n", scanned)) < 0:
            scanned = len(self._buf)
            data = await self._read(_READ_CHUNK)
            if not data:
                if not self._buf:
                    return None
                nl = len(self._buf) - 1
                break
            self._buf += data
        line = bytes(self._buf[: nl + 1])
        del self._buf[: nl + 1]
        return line

    async def span(self, start: int, length: int, ranges: list[tuple[int, int]], targets: list[int],
                   sink: "RangeSink") -> None:
        """Read ``length`` bytes that are the blob from ``start`` on, passing the slices of
        ``ranges[i] for i in targets`` to ``sink`` as they arrive (the rest is dropped); stops
        early where the body ends."""
        at, end = start, start + length
        while at < end:
            if self._buf:
                data = bytes(self._buf[: end - at])
                del self._buf[: len(data)]
            else:
                data = await self._read(min(_READ_CHUNK, end - at))
                if not data:
                    return
            nxt = at + len(data)
            for i in targets:
                off, n = ranges[i]
                lo, hi = max(off, at), min(off + n, nxt)
                if lo < hi:
                    await sink(i, lo, data[lo - at : hi - at])
            at = nxt



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

        ``stream_ranges`` collected into memory: several ranges go in one multi-range request
        when the registry supports it; otherwise (or when it ignores ``Range`` and sends the
        whole blob) single ranges, reading no further than the last byte needed.
        """
        validate_digest(digest)
        if not ranges:
            return []
        wanted = sorted(set(ranges))
        bufs = [bytearray() for _ in wanted]

        async def sink(i: int, _pos: int, data: bytes) -> None:
            bufs[i] += data

        await self.stream_ranges(ref, digest, wanted, sink)
        got = {r: bytes(b) for r, b in zip(wanted, bufs)}
        bufs.clear()
        return [got[r] for r in ranges]

    async def stream_ranges(self, ref: Reference, digest: str, ranges: list[tuple[int, int]],
                            sink: RangeSink) -> None:
        """Deliver ``(offset, length)`` ranges of a blob to ``await sink(index, blob_offset, data)``
        as their bytes arrive (``index`` into ``ranges``), each range's bytes in order and once.

        Up to ``max_ranges_per_request`` ranges go in one multi-range GET whose
        multipart/byteranges answer is parsed as it streams in (parts in any order; a part
        feeds every asked range that lies inside it).  The body is bounded by the bytes asked
        plus ``MULTIPART_PART_OVERHEAD`` per part; a 200 (Range ignored) or single-span 206 is
        read up to the last byte wanted.  Retries restart only what is not complete: a range
        the answer left out or broke off inside is resumed from its next missing byte with
        ``stream_range`` (which retries itself), so ``sink`` never sees a byte twice.
        """
        validate_digest(digest)
        for off, length in ranges:
            if off < 0 or length <= 0:
                raise ValueError(f"invalid range (offset={off}, length={length}) for blob {digest}")
        if not ranges:
            return
        done = [0] * len(ranges)  # bytes delivered per range

        async def counted(i: int, pos: int, data: bytes) -> None:
            done[i] += len(data)
            await sink(i, pos, data)

        order = sorted(range(len(ranges)), key=lambda i: ranges[i])
        if len(ranges) > 1 and ref.registry not in self._single_range_only:
            n = max(1, self.config.max_ranges_per_request)
            batches = [order[i : i + n] for i in range(0, len(order), n)]
            await _all([self._stream_multi(ref, digest, ranges, b, counted) for b in batches])
        rest = [i for i in order if done[i] < ranges[i][1]]
        if not rest:
            return
        sem = asyncio.Semaphore(max(1, self.config.max_connections_per_host))

        async def one(i: int) -> None:
            off, length = ranges[i]
            async with sem:
                await self.stream_range(ref, digest, off + done[i], length - done[i],
                                        lambda pos, data: counted(i, pos, data))

        await _all([one(i) for i in rest])

    async def _stream_multi(self, ref: Reference, digest: str, ranges: list[tuple[int, int]], batch: list[int],
                            sink: RangeSink) -> None:
        """One multi-range GET for ``ranges[i] for i in batch``; what it leaves incomplete (the
        registry refused, the body broke off, a range is missing) is the caller's to resume."""
        if len(batch) == 1:
            return
        spec = ",".join(f"{ranges[i][0]}-{ranges[i][0] + ranges[i][1] - 1}" for i in batch)
        what = f"{len(batch)} ranges of blob {digest} in {ref.name}"
        try:
            resp = await self._call(ref.registry, ref.repository, "GET", f"/{ref.repository}/blobs/{digest}",
                                    capability=CAP_PULL, headers={"Range": f"bytes={spec}"}, ok=(200, 206), what=what)
        except RangeNotSupportedError:
            self._single_range_only.add(ref.registry)
            return
        except RegistryError as exc:
            if isinstance(exc, (NotFoundError, UnauthorizedError, UnreachableError)):
                raise
            log.debug("multi-range GET refused by %s (%s); using single ranges", ref.registry, exc)
            self._single_range_only.add(ref.registry)
            return
        complete = False
        try:
            complete = await self._read_parts(resp, ranges, batch, what, sink)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                asyncio.TimeoutError) as exc:
            self.observer.error("body")
            log.debug("multi-range answer broke off (%s); resuming with single ranges", type(exc).__name__)
        finally:
            if complete and resp.resp.content.at_eof():
                resp.close()
            else:
                resp.resp.close()  # a partial read: do not return the connection to the pool

    async def _read_parts(self, resp: _Response, ranges: list[tuple[int, int]], batch: list[int], what: str,
                          sink: RangeSink) -> bool:
        """Stream the ranges ``batch`` of ``ranges`` out of the answer to a multi-range GET; True
        when the whole body was read.  Ranges may be left missing or short (the caller resumes them).

        A multipart answer may carry the asked bytes plus ``MULTIPART_PART_OVERHEAD`` per part;
        a 200 (Range ignored) or a single 206 span is read up to the last byte wanted.
        """
        ctype = resp.headers.get("Content-Type", "")
        body = _Body(resp, self)
        if resp.status == 200 or not ctype.startswith("multipart/byteranges"):
            base = 0 if resp.status == 200 else _content_range_start(resp.headers.get("Content-Range"), what)
            targets = [i for i in batch if ranges[i][0] >= base]
            stop = max((sum(ranges[i]) for i in targets), default=base)
            await body.span(base, stop - base, ranges, targets, sink)
            return True  # the connection is reused only if the body ended there too
        asked = sum(ranges[i][1] for i in batch)
        overhead = (len(batch) + 1) * MULTIPART_PART_OVERHEAD
        allowed = f" ({asked} bytes asked for plus {overhead} of multipart delimiters and part headers)"
        resp.check_length(asked + overhead, what, allowed)
        body.limit(asked + overhead, what, allowed)
        delim = f"--{_boundary(ctype)}".encode()
        taken: set[int] = set()  # ranges a part has been (or is being) read for
        while True:
            line = await body.line()
            if line is None:
                self.observer.error("range")
                log.debug("multipart answer to %s ended without its closing delimiter", what)
                return False
            line = line.rstrip()
            if line == delim + b"--":
                await body.drain()  # the epilogue (a CRLF), so that the connection can be reused
                return True
            if line != delim:
                continue  # preamble, or the CRLF ending a part's data
            crange = None
            while (header := await body.line()) not in (None, b"\r\n", b"\n", b""):
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "content-range":
                    crange = value.strip()
            if header is None:
                self.observer.error("range")
                log.debug("multipart answer to %s ended inside part headers", what)
                return False
            m = _CONTENT_RANGE.match(crange or "")
            if not m or int(m.group(2)) < int(m.group(1)):
                self.observer.error("range")
                raise RangeNotSupportedError(f"{resp.endpoint.describe()} sent a multipart part with Content-Range "
                                             f"{crange!r} in answer to {what}")
            start, length = int(m.group(1)), int(m.group(2)) - int(m.group(1)) + 1
            targets = [i for i in batch if i not in taken
                       and start <= ranges[i][0] and sum(ranges[i]) <= start + length]
            if not targets:
                self.observer.error("range")
                log.debug("multipart part %s in answer to %s matches no range asked for (or one already "
                          "sent); skipped", crange, what)
            taken.update(targets)
            await body.span(start, length, ranges, targets, sink)

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
                        raise RangeNotSupportedError(f"{what}: the body ended at byte {at} of the blob, bytes "
                                                     f"{pos}-{end - 1} missing (range past the end of the blob?)")
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
        return (await self.push_manifest(ref, body, media_type, tag=ref.tag or ref.digest)).digest

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
                        max_size: int = MAX_MANIFEST_SIZE) -> dict[str, Any] | None:
        """The referrers index of manifest ``digest`` (``GET /v2/<name>/referrers/<digest>``), parsed,
        or None when the registry has no referrers API (404).  The index is checked to be JSON with
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
        return doc


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


async def _all(coros: list[Awaitable[None]]) -> None:
    """Run ``coros`` concurrently; the first to fail cancels the others (which feed the same sink,
    so none goes on after the caller has seen the error) and its exception is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
