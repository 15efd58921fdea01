"""The ztunnel's HTTP/2 connection to istiod_lite and the certificate-signing client.

One ``ControlPlaneConnection`` per ztunnel owns one ``httpx.AsyncClient(http2=True)``; the
discovery stream, its ACKs and every CSR are multiplexed on it, as Istio's ztunnel shares one
gRPC channel to istiod. ``CaClient`` turns the ``/v1/certificate`` answers into a
``CertificateResponse`` or one of two errors the caller handles differently: ``CaRefused``
(the CA looked at the request and said no; retrying the same thing soon will not help) and
``CaUnavailable`` (the CA could not be reached or failed; retry).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Generator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import structlog

from ambient_api import codec
from ambient_api.discovery import (
    CERTIFICATE_PATH,
    CertificateRequest,
    CertificateResponse,
    ErrorResponse,
)

DEFAULT_REQUEST_TIMEOUT = 10.0

log = structlog.get_logger()


class CaRefused(Exception):
    """The CA answered 400/401/403: the request itself was rejected (bad CSR, bad token,
    node authorization). ``reason`` is the server's error text."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"CA refused the request ({status}): {reason}")
        self.status = status
        self.reason = reason


class CaUnavailable(Exception):
    """The CA could not answer: connection error, timeout, 5xx or a malformed answer."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"CA unavailable: {reason}")
        self.reason = reason


class BearerToken(httpx.Auth):
    """The caller's bearer token, re-read from its file whenever the file changes.

    On Kubernetes the token is a projected ServiceAccount token that the kubelet rotates
    (about hourly, expiring after 12 h): read once, it would stop working. A file that is
    briefly unreadable or empty (the kubelet swaps it atomically, but be safe) keeps the last
    good token rather than sending none.
    """

    def __init__(self, token: str, path: Path | None = None) -> None:
        self._token = token
        self._path = path
        self._seen: tuple[int, int] | None = None
        if path is not None:
            self.current()

    def current(self) -> str:
        if self._path is None:
            return self._token
        try:
            stat = self._path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen != self._seen:
                token = self._path.read_text().strip()
                if token:
                    if self._seen is not None:
                        log.info("bearer token reloaded", path=str(self._path))
                    self._token, self._seen = token, seen
        except OSError as exc:
            log.warning("cannot re-read the token file; keeping the last token",
                        path=str(self._path), reason=exc.strerror or str(exc))
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["authorization"] = f"Bearer {self.current()}"
        yield request


def control_plane_context(root_pems: str) -> ssl.SSLContext:
    """The client TLS context for istiod_lite: its serving certificate verified against the
    mesh roots ``root_pems`` (hostname or IP SAN checked), TLS 1.2 or later. Raises
    ssl.SSLError or ValueError for text without a usable certificate."""
    context = ssl.create_default_context(cadata=root_pems)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class RootCertificate:
    """The mesh roots istiod's serving certificate is verified with, re-read from their file
    whenever it changes, as ``BearerToken`` re-reads the token.

    On Kubernetes the file is a mounted ConfigMap (istio-ca-root-cert), in the embedded mode
    the ``root-cert.pem`` istiod_lite rewrites when it starts: after an istiod restart with a
    new CA, the roots read once would fail every connection with CERTIFICATE_VERIFY_FAILED
    until the proxy restarted. The first read must succeed (OSError, ValueError); a later
    file that cannot be read or parsed keeps the last good roots.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        stat = path.stat()
        self.pems, self.context = self._load()
        self._seen = (stat.st_mtime_ns, stat.st_size)

    def _load(self) -> tuple[tuple[str, ...], ssl.SSLContext]:
        text = self.path.read_text()
        pems = tuple(split_pem_certificates(text))
        if not pems:  # an empty context would trust nothing
            raise ValueError(f"no certificate in {self.path}")
        return pems, control_plane_context(text)

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when it now holds other roots."""
        try:
            stat = self.path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen == self._seen:
                return False
            pems, context = self._load()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("cannot re-read the root certificate; keeping the last roots",
                        path=str(self.path), reason=getattr(exc, "strerror", None) or str(exc))
            return False
        self._seen = seen
        if pems == self.pems:
            return False
        self.pems, self.context = pems, context
        return True


def split_pem_certificates(text: str) -> list[str]:
    """The PEM certificates in ``text``, each with its END line and a newline."""
    end = "-----END CERTIFICATE-----"
    return [block.strip() + "\n" + end + "\n" for block in text.split(end)[:-1]]


RootsChangedHook = Callable[[tuple[str, ...]], None]


class ControlPlaneConnection:
    """Owns the one HTTP/2 client a ztunnel uses for everything it asks istiod_lite.

    ``verify`` checks istiod's serving certificate against the mesh roots: a fixed
    ``ssl.SSLContext``, or a ``RootCertificate`` whose file is looked at before each request
    (a CSR, a discovery stream being opened): when its roots changed, new requests go through
    a client with a context built from them and the ``on_roots_changed`` hooks are called.
    Close it with ``aclose()`` (or ``async with``) on shutdown.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        verify: ssl.SSLContext | RootCertificate,
        *,
        token_file: Path | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        self.token = BearerToken(token, token_file)
        self.roots: RootCertificate | None = None
        if isinstance(verify, RootCertificate):
            self.roots, verify = verify, verify.context
        self.client = self._new_client(verify)
        # Clients of roots replaced: a stream they carry may still be fine; closed at aclose.
        self._retired: list[httpx.AsyncClient] = []
        self._roots_changed_hooks: list[RootsChangedHook] = []

    def _new_client(self, context: ssl.SSLContext) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            http2=True,
            verify=context,
            auth=self.token,
            timeout=httpx.Timeout(self.request_timeout),
        )

    def on_roots_changed(self, hook: RootsChangedHook) -> None:
        """Call ``hook`` with the new roots whenever the root certificate file changes."""
        self._roots_changed_hooks.append(hook)

    def _client_for_request(self) -> httpx.AsyncClient:
        """The client to use now: rebuilt first when the root certificate file changed."""
        if self.roots is not None and self.roots.refresh():
            log.info("root certificate reloaded", path=str(self.roots.path),
                     roots=len(self.roots.pems))
            self._retired.append(self.client)
            self.client = self._new_client(self.roots.context)
            for hook in self._roots_changed_hooks:
                try:
                    hook(self.roots.pems)
                except Exception:
                    log.exception("root certificate hook failed")
        return self.client

    async def post_json(
        self, path: str, body: Any, *, timeout: float | None = None
    ) -> httpx.Response:
        """POST a contract dataclass as JSON; transport errors propagate as httpx errors."""
        return await self._client_for_request().post(
            path,
            content=codec.canonical_json(body),
            headers={"content-type": "application/json"},
            timeout=timeout if timeout is not None else self.request_timeout,
        )

    def stream_json(self, path: str, body: Any) -> Any:
        """Open a long-lived streaming POST (the discovery stream): connect and write use the
        request timeout, reading waits as long as the server keeps the stream open."""
        return self._client_for_request().stream(
            "POST",
            path,
            content=codec.canonical_json(body),
            headers={"content-type": "application/json"},
            timeout=httpx.Timeout(self.request_timeout, read=None),
        )

    async def aclose(self) -> None:
        for client in (*self._retired, self.client):
            await client.aclose()

    async def __aenter__(self) -> ControlPlaneConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def error_text(response_body: bytes) -> str:
    """The server's reason from an ``ErrorResponse`` body, or the raw body if it is not one."""
    try:
        return codec.from_jsonable(ErrorResponse, json.loads(response_body)).error
    except (ValueError, UnicodeDecodeError):
        text = response_body.decode("utf-8", "replace").strip()
        return text[:500] or "(empty response body)"


def describe_transport_error(exc: BaseException) -> str:
    """``ConnectError: <root cause>``: httpx under Trio often wraps the useful message (TLS
    verification failure, connection refused) in causes with an empty outer message."""
    parts = [type(exc).__name__]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if text and text not in parts:
            parts.append(text)
        current = current.__cause__ or current.__context__
    return ": ".join(parts)


REFUSAL_STATUSES = frozenset({400, 401, 403})


def interpret_certificate_answer(status: int, body: bytes) -> CertificateResponse:
    """Sans-IO: map the CA's HTTP answer to a response or to CaRefused / CaUnavailable."""
    if status == 200:
        try:
            answer = codec.from_jsonable(CertificateResponse, json.loads(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CaUnavailable(f"malformed certificate response: {exc}") from None
        if not answer.cert_chain:
            raise CaUnavailable("malformed certificate response: empty cert_chain")
        return answer
    if status in REFUSAL_STATUSES:
        raise CaRefused(status, error_text(body))
    raise CaUnavailable(f"HTTP {status}: {error_text(body)}")


class CaClient:
    """Asks istiod_lite's CA to sign CSRs over the shared control-plane connection."""

    def __init__(self, connection: ControlPlaneConnection) -> None:
        self.connection = connection

    async def sign(self, csr_pem: str, ttl_seconds: int | None = None) -> CertificateResponse:
        request = CertificateRequest(csr=csr_pem, ttl_seconds=ttl_seconds)
        try:
            response = await self.connection.post_json(CERTIFICATE_PATH, request)
        except httpx.TimeoutException as exc:
            raise CaUnavailable(f"timed out: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise CaUnavailable(describe_transport_error(exc)) from None
        return interpret_certificate_answer(response.status_code, response.content)
