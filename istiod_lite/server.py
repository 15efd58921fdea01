"""istiod_lite's HTTP/2 API: an ASGI application written against the ASGI spec, served by
hypercorn's trio worker over TLS.

Endpoints (see ``ambient_api.discovery``):

- ``POST /v1/discovery``: a stream of NDJSON ``DeltaUpdate`` lines for the caller's node (or,
  for a waypoint, its ``serviceaccount:<ns>/<sa>``), of the kinds it asks for.
- ``POST /v1/discovery/ack``: ACK/NACK of an update (204).
- ``POST /v1/certificate``: sign a workload CSR after authorization: a node's ztunnel may
  obtain the identities running on its node, a waypoint only its own.
- ``GET /ready``: 200 once the first resource set is loaded, else 503.
- ``GET /debug/syncz``: the open discovery streams and their ACK state. It names every
  proxy of the mesh, so it needs an authenticated caller (401 otherwise, the discovery
  stream's authenticator) and shows a caller only its own streams: a node its node's, a
  service account its ``serviceaccount:<ns>/<sa>`` ones. A service account of the root
  namespace sees them all, as Istio limits its debug endpoints to the system namespace
  (``AuthorizeDebugRequest``); unlike Istio, localhost gets no exception.
- ``GET /metrics``: istiod_lite's Prometheus metrics (``istiod_lite.metrics``). Counts only,
  no names, so no token, as istiod's monitoring port.

Every error is a JSON ``ErrorResponse``; nothing a client sends can take the server down.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio
from cryptography import x509
from hypercorn.config import Config as HypercornConfig

from ambient_api import codec
from ambient_api.discovery import (
    ACK_PATH,
    CERTIFICATE_PATH,
    DISCOVERY_PATH,
    Ack,
    CertificateRequest,
    CertificateResponse,
    DiscoveryRequest,
    ErrorResponse,
)
from ambient_common.asgi import answer_lifespan
from ambient_common.hypercorn_serving import serve_isolated
from ambient_common.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from istiod_lite.auth import AuthenticationError, Authenticator, Caller
from istiod_lite.ca import CaError, CertificateAuthority
from istiod_lite.csr import (
    CsrAuthorizationError,
    CsrRejected,
    authorize_node,
    authorize_service_account,
    check_csr,
)
from istiod_lite.deflate import ZLIB_HEADER, SegmentCache, accepts_deflate, compress_segment
from istiod_lite.discovery import ResourceStore, requested_kinds
from istiod_lite.metrics import IstiodMetrics

log = structlog.get_logger()

T = TypeVar("T")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

READY_PATH = "/ready"
SYNCZ_PATH = "/debug/syncz"
METRICS_PATH = "/metrics"
MAX_BODY_BYTES = 64 * 1024
NDJSON = b"application/x-ndjson"
JSON = b"application/json"

# path -> the one method it answers.
_ROUTES: dict[str, str] = {
    DISCOVERY_PATH: "POST",
    ACK_PATH: "POST",
    CERTIFICATE_PATH: "POST",
    READY_PATH: "GET",
    SYNCZ_PATH: "GET",
    METRICS_PATH: "GET",
}


class HttpError(Exception):
    """Ends a request with ``status`` and an ErrorResponse carrying ``message``."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class ClientGone(Exception):
    """The client disconnected while we were reading its request."""


def request_headers(scope: Scope) -> dict[str, str]:
    """ASGI headers as a dict of lower-case names (the last value wins)."""
    return {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in scope.get("headers", [])
    }


def decode_body(cls: type[T], body: bytes) -> T:
    """Parse a JSON request body into a contract message, or 400 naming what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HttpError(400, f"request body is not valid JSON: {error}") from None
    try:
        return codec.from_jsonable(cls, data)
    except (codec.DecodeError, TypeError, ValueError) as error:
        raise HttpError(400, f"invalid {cls.__name__}: {error}") from None


def certificate_serial(chain: list[str]) -> str:
    """The leaf's serial in hex (as istioctl shows it), for the log."""
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    return format(leaf.serial_number, "x")


class IstiodApp:
    """The ASGI application. ``begin_shutdown()`` ends every discovery stream cleanly so that
    hypercorn's graceful shutdown does not wait on them."""

    def __init__(
        self,
        store: ResourceStore,
        ca: CertificateAuthority,
        authenticator: Authenticator,
        *,
        max_cert_ttl: timedelta | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        metrics: IstiodMetrics | None = None,
        root_namespace: str = "istio-system",
    ) -> None:
        self.store = store
        self.ca = ca
        self.authenticator = authenticator
        self.max_cert_ttl = max_cert_ttl
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics if metrics is not None else IstiodMetrics()
        self.root_namespace = root_namespace
        self.shutting_down = trio.Event()
        # Deltas many streams share (the full set, a change every proxy in sync gets) are
        # compressed once for all of them.
        self._shared_segments = SegmentCache()

    def begin_shutdown(self) -> None:
        self.shutting_down.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # Other scope types (websocket) are not spoken here; returning closes them.

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            # Always take the whole request body before answering, even to refuse it:
            # hypercorn (0.17/0.18) crashes its whole server on DATA that arrives for a stream
            # it already answered (KeyError in H2Protocol._handle_events).
            body = await self._read_body(scope, receive)
            expected = _ROUTES.get(path)
            if expected is None:
                raise HttpError(404, f"no such endpoint: {path}")
            if method != expected:
                raise HttpError(
                    405,
                    f"{path} answers {expected}, not {method}",
                    [(b"allow", expected.encode())],
                )
            if body is None:
                raise HttpError(413, f"request body exceeds {self.max_body_bytes} bytes")
            if path == DISCOVERY_PATH:
                await self._discovery(scope, body, receive, tracked_send)
            elif path == ACK_PATH:
                await self._ack(scope, body, tracked_send)
            elif path == CERTIFICATE_PATH:
                await self._certificate(scope, body, tracked_send)
            elif path == READY_PATH:
                await self._ready(tracked_send)
            elif path == METRICS_PATH:
                await self._metrics(tracked_send)
            else:
                await self._syncz(scope, tracked_send)
        except HttpError as error:
            if not started:
                await send_error(send, error.status, error.message, error.headers)
        except ClientGone:
            return
        except Exception:
            log.exception("request failed", path=path, method=method)
            if not started:
                await send_error(send, 500, "internal error")

    # -- helpers -------------------------------------------------------------------------

    async def _authenticate(self, scope: Scope) -> Caller:
        try:
            return await self.authenticator.authenticate(request_headers(scope))
        except AuthenticationError as error:
            log.warning(
                "authentication failed", path=scope["path"], client=_client(scope),
                reason=error.reason,
            )
            raise HttpError(401, f"unauthenticated: {error.reason}") from None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole request body, or None if it exceeds ``max_body_bytes`` (the excess is
        read and dropped, so the request still ends before we answer)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body_bytes:
                chunks.append(chunk)
            else:
                chunks.clear()
            if not message.get("more_body", False):
                return b"".join(chunks) if size <= self.max_body_bytes else None

    # -- endpoints -----------------------------------------------------------------------

    async def _discovery(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        caller = await self._authenticate(scope)
        request = decode_body(DiscoveryRequest, body)
        check_principal(caller, request.node, "asked for")
        if self.shutting_down.is_set():
            raise HttpError(503, "istiod_lite is shutting down")
        try:
            kinds = requested_kinds(request.kinds)
            subscription = self.store.subscribe(
                caller.principal, request.initial_resource_versions, kinds
            )
        except ValueError as error:
            raise HttpError(400, f"invalid DiscoveryRequest: {error}") from None

        with subscription:
            log.info(
                "discovery stream opened",
                node=caller.principal,
                subscriber=subscription.status.id,
                kinds=sorted(kinds),
                initial_resources=len(request.initial_resource_versions),
            )
            deflate = accepts_deflate(request_headers(scope).get("accept-encoding", ""))
            headers = [(b"content-type", NDJSON), (b"cache-control", b"no-store")]
            if deflate:
                headers += [(b"content-encoding", b"deflate"), (b"vary", b"accept-encoding")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            ended_by = "server shutdown"
            async with trio.open_nursery() as nursery:

                async def watch_disconnect() -> None:
                    nonlocal ended_by
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    ended_by = "client disconnect"
                    nursery.cancel_scope.cancel()

                async def watch_shutdown() -> None:
                    await self.shutting_down.wait()
                    nursery.cancel_scope.cancel()

                async def stream_updates() -> None:
                    prefix = ZLIB_HEADER if deflate else b""
                    async for update in subscription:
                        head, resources, tail = subscription.line_parts(update)
                        if deflate:
                            body = b"".join((
                                prefix,
                                compress_segment(head),
                                self._shared_segments.segment(resources),
                                compress_segment(tail),
                            ))
                        else:
                            body = head + resources + tail
                        prefix = b""
                        await send({"type": "http.response.body", "body": body,
                                    "more_body": True})
                        log.debug(
                            "delta sent",
                            node=caller.principal,
                            nonce=update.nonce,
                            system_version=update.system_version,
                            resources=len(update.resources),
                            removed=len(update.removed),
                        )

                nursery.start_soon(watch_disconnect)
                nursery.start_soon(watch_shutdown)
                nursery.start_soon(stream_updates)
            log.info(
                "discovery stream closed",
                node=caller.principal,
                subscriber=subscription.status.id,
                reason=ended_by,
            )
            if ended_by != "client disconnect":
                # Hypercorn ignores sends after a disconnect, so this cannot fail the request.
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _ack(self, scope: Scope, body: bytes, send: Send) -> None:
        caller = await self._authenticate(scope)
        ack = decode_body(Ack, body)
        check_principal(caller, ack.node, "acknowledged for")
        known = self.store.record_ack(ack)
        if ack.error is not None:
            log.warning("update NACKed", node=ack.node, nonce=ack.nonce, error=ack.error)
        else:
            log.debug("update ACKed", node=ack.node, nonce=ack.nonce)
        if not known:
            log.info("ack for a nonce no open stream sent", node=ack.node, nonce=ack.nonce)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def _certificate(self, scope: Scope, body: bytes, send: Send) -> None:
        caller = await self._authenticate(scope)
        request = decode_body(CertificateRequest, body)
        if not self.store.initialized:
            raise HttpError(503, "istiod_lite has not loaded its workloads yet; retry shortly")
        try:
            csr = check_csr(request.csr)
        except CsrRejected as error:
            log.warning("CSR rejected", caller=caller.principal, reason=error.reason)
            raise HttpError(400, f"CSR rejected: {error.reason}") from None
        identity = csr.identity
        try:
            if caller.service_account is not None:
                authorize_service_account(caller.service_account, identity)
            else:
                authorize_node(caller.node or "", identity, self.store.workloads())
        except CsrAuthorizationError as error:
            log.warning(
                "CSR refused by caller authorization",
                caller=caller.principal, identity=str(identity), reason=str(error),
            )
            raise HttpError(403, str(error)) from None
        ttl: timedelta | None = None
        if request.ttl_seconds is not None:
            if request.ttl_seconds <= 0:
                raise HttpError(400, f"ttl_seconds must be positive, got {request.ttl_seconds}")
            ttl = timedelta(seconds=request.ttl_seconds)
            if self.max_cert_ttl is not None:
                ttl = min(ttl, self.max_cert_ttl)
        try:
            chain = self.ca.sign_csr(csr, ttl)
        except CsrRejected as error:
            log.warning(
                "CSR rejected", caller=caller.principal, identity=str(identity),
                reason=error.reason,
            )
            raise HttpError(400, f"CSR rejected: {error.reason}") from None
        except CaError as error:
            log.error(
                "CA cannot sign", caller=caller.principal, identity=str(identity), error=str(error)
            )
            raise HttpError(500, f"the CA cannot sign: {error}") from None
        log.info(
            "certificate issued",
            caller=caller.principal, identity=str(identity), serial=certificate_serial(chain),
        )
        response = CertificateResponse(tuple(chain), tuple(self.ca.trust_bundle))
        await send_json(send, 200, codec.to_jsonable(response))

    async def _ready(self, send: Send) -> None:
        if self.store.initialized and not self.shutting_down.is_set():
            await send_json(send, 200, {"ready": True, "system_version": self.store.system_version})
        else:
            reason = "shutting down" if self.shutting_down.is_set() else "resources not loaded"
            await send_json(send, 503, {"ready": False, "reason": reason})

    async def _syncz(self, scope: Scope, send: Send) -> None:
        caller = await self._authenticate(scope)
        sees_all = self._sees_every_stream(caller)
        subscribers = [
            status for status in self.store.subscribers()
            if sees_all or status.node == caller.principal
        ]
        await send_json(
            send,
            200,
            {
                "system_version": self.store.system_version,
                "caller": caller.principal,
                "scope": "all" if sees_all else "own",
                "subscribers": [s.to_json() for s in subscribers],
            },
        )

    def _sees_every_stream(self, caller: Caller) -> bool:
        """A service account of the root namespace (an operator's, istiod's own)."""
        account = caller.service_account
        return account is not None and account.namespace == self.root_namespace

    async def _metrics(self, send: Send) -> None:
        payload = self.metrics.render()
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", METRICS_CONTENT_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
            ],
        })
        await send({"type": "http.response.body", "body": payload})


def check_principal(caller: Caller, requested: str, verb: str) -> None:
    """A caller speaks only for itself: ``DiscoveryRequest.node`` / ``Ack.node`` must be its
    node, or ``serviceaccount:<ns>/<sa>`` for a service-account caller (403 otherwise)."""
    if requested == caller.principal:
        return
    log.warning(
        "request refused: caller mismatch",
        authenticated=caller.principal,
        requested=requested,
    )
    raise HttpError(
        403,
        f"caller is authenticated as {caller.describe()} but {verb} node {requested!r} "
        f"(it may only use {caller.principal!r})",
    )


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


async def send_json(
    send: Send,
    status: int,
    body: Any,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", JSON),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def send_error(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_json(send, status, codec.to_jsonable(ErrorResponse(message)), headers)


def hypercorn_config(
    host: str, port: int, certfile: Path, keyfile: Path, *, graceful_timeout: float = 5.0
) -> HypercornConfig:
    """HTTP/2 over TLS (ALPN h2; http/1.1 is offered too so curl can read the debug
    endpoints)."""
    config = HypercornConfig()
    bind_host = f"[{host}]" if ":" in host else host
    config.bind = [f"{bind_host}:{port}"]
    config.certfile = str(certfile)
    config.keyfile = str(keyfile)
    config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = None
    # Hypercorn's own messages go to stdlib logging (warnings and errors reach stderr);
    # istiod_lite logs its requests itself through structlog.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout
    # Discovery streams are long-lived; hypercorn's keep-alive timeout only applies to idle
    # connections, which a subscribed proxy never is.
    return config


async def serve(
    app: IstiodApp,
    config: HypercornConfig,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``app.begin_shutdown()``; ``task_status`` gets hypercorn's bound
    URLs (``https://host:port``). A connection that fails inside hypercorn ends alone (see
    ``ambient_common.hypercorn_serving``)."""
    await serve_isolated(
        app,  # type: ignore[arg-type]  # hypercorn's Framework type is stricter than ASGI's
        config,
        shutdown_trigger=app.shutting_down.wait,
        task_status=task_status,
        mode="asgi",
    )

