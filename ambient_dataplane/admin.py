"""ztunnel's three small HTTP servers: admin (15000), metrics (15020), readiness (15021).

One implementation for all three: a minimal ASGI app over a route table, served by
hypercorn's Trio worker (already used by istiod_lite, so no second HTTP stack). Routing and
the readiness decision are plain functions; handlers receive an ``AdminRequest`` and return
an ``AdminResponse``, so each endpoint is testable without a socket.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import structlog
import trio
from hypercorn.config import Config

from ambient_api.identity import SpiffeId
from ambient_common.asgi import answer_lifespan
from ambient_common.hypercorn_serving import serve_isolated

log = structlog.get_logger()

MAX_BODY_BYTES = 64 * 1024
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True)
class AdminRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes = b""
    client_ip: str | None = None

    @property
    def from_loopback(self) -> bool:
        """A caller on this host (the pod's own network namespace on Kubernetes)."""
        try:
            return self.client_ip is not None and ipaddress.ip_address(self.client_ip).is_loopback
        except ValueError:
            return False

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


def local_only(handler: Handler) -> Handler:
    """Admin actions that change the proxy (log level, shutdown) answer only callers on the
    same host, as Istio binds its admin port to localhost. Read-only endpoints stay
    reachable, so ``kubectl ambient ztunnel-config`` can read them through the API server's
    pod proxy."""

    async def guarded(request: AdminRequest) -> AdminResponse:
        if not request.from_loopback:
            return AdminResponse.text(
                403, f"{request.method} {request.path} is only allowed from localhost"
            )
        result = handler(request)
        return await result if inspect.isawaitable(result) else result

    return guarded


@dataclass(frozen=True)
class AdminResponse:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    # Run once the answer is written: ``/quitquitquit``'s shutdown cancels this very server,
    # so requested before, it would cut its own answer off.
    after_sent: Callable[[], None] | None = None

    @classmethod
    def text(cls, status: int, text: str) -> AdminResponse:
        return cls(status, (text if text.endswith("\n") else text + "\n").encode())

    @classmethod
    def json(cls, data: Any, status: int = 200) -> AdminResponse:
        return cls(status, json.dumps(data, indent=2, default=str).encode() + b"\n", JSON)


Handler = Callable[[AdminRequest], Awaitable[AdminResponse] | AdminResponse]
# path -> method -> handler
Routes = Mapping[str, Mapping[str, Handler]]


def dispatch(routes: Routes, method: str, path: str) -> Handler | AdminResponse:
    """Find the handler, or the 404 / 405 answer (with ``allow``) when there is none."""
    methods = routes.get(path)
    if methods is None:
        known = ", ".join(sorted(routes))
        return AdminResponse.text(404, f"no such endpoint {path}; endpoints: {known}")
    handler = methods.get(method.upper())
    if handler is None:
        allowed = ", ".join(sorted(methods))
        return AdminResponse(
            405,
            f"{method} not allowed on {path}; use {allowed}\n".encode(),
            headers=(("allow", allowed),),
        )
    return handler


async def handle(routes: Routes, request: AdminRequest) -> AdminResponse:
    """Route and run a request; a failing handler answers 500 instead of breaking the server."""
    found = dispatch(routes, request.method, request.path)
    if isinstance(found, AdminResponse):
        return found
    try:
        result = found(request)
        if inspect.isawaitable(result):
            result = await result
        return result
    except Exception as exc:
        log.exception("admin handler failed", path=request.path)
        return AdminResponse.text(500, f"internal error: {type(exc).__name__}: {exc}")


ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


def make_asgi_app(routes: Routes) -> Callable[[dict[str, Any], ASGIReceive, ASGISend], Any]:
    """A minimal ASGI application serving ``routes``."""

    async def app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        too_large = False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                too_large = True
                body.clear()
            if not message.get("more_body", False):
                break
        if too_large:
            response = AdminResponse.text(413, f"request body over {MAX_BODY_BYTES} bytes")
        else:
            request = AdminRequest(
                method=scope["method"],
                path=scope["path"],
                query=parse_qs(scope.get("query_string", b"").decode("latin-1")),
                body=bytes(body),
                client_ip=(scope.get("client") or (None,))[0],
            )
            response = await handle(routes, request)
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(response.body)).encode()),
            *((k.encode(), v.encode()) for k, v in response.headers),
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        if response.after_sent is not None:
            response.after_sent()

    return app


def bind_address(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def serve_admin(
    address: str,
    port: int,
    routes: Routes,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` over plain HTTP/1.1 (and h2c) on ``address:port`` until cancelled.
    ``task_status.started`` reports the bound addresses once the socket listens."""
    config = Config()
    config.bind = [bind_address(address, port)]
    config.accesslog = None
    config.graceful_timeout = 1.0
    log.info("admin server listening", address=address, port=port, paths=sorted(routes))
    await serve_isolated(make_asgi_app(routes), config, task_status=task_status)  # type: ignore[arg-type]


# -- admin (15000) ------------------------------------------------------------------------


class LogLevelControl(Protocol):
    def get_level(self) -> str: ...

    def set_level(self, level: str) -> None: ...


LEVELS = ("debug", "info", "warning", "error", "critical")


class StructlogLevelControl:
    """Changes the process's structlog filtering level at runtime (as ztunnel's /logging)."""

    def __init__(self, initial: str = "info") -> None:
        self._level = initial.lower()

    def get_level(self) -> str:
        return self._level

    def set_level(self, level: str) -> None:
        level = level.lower()
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.getLevelNamesMapping()[level.upper()]
            )
        )
        self._level = level


def admin_routes(
    config_dump: Mapping[str, Callable[[], Any]],
    log_levels: LogLevelControl,
    on_quit: Callable[[], None],
) -> Routes:
    """``/config_dump`` (one JSON key per section callable, e.g. workloads, services,
    policies, certificates), ``/logging`` and ``/quitquitquit`` (``on_quit`` runs once its
    answer is written)."""

    def dump(_request: AdminRequest) -> AdminResponse:
        return AdminResponse.json({name: section() for name, section in config_dump.items()})

    def show_level(_request: AdminRequest) -> AdminResponse:
        return AdminResponse.text(200, f"current log level is {log_levels.get_level()}")

    def change_level(request: AdminRequest) -> AdminResponse:
        level = request.query_value("level")
        if level is None:
            return AdminResponse.text(400, f"missing ?level=; use one of {', '.join(LEVELS)}")
        try:
            log_levels.set_level(level)
        except ValueError as exc:
            return AdminResponse.text(400, str(exc))
        log.info("log level changed", level=log_levels.get_level())
        return AdminResponse.text(200, f"current log level is {log_levels.get_level()}")

    def quit_(_request: AdminRequest) -> AdminResponse:
        log.info("graceful shutdown requested via /quitquitquit")
        return dataclasses.replace(AdminResponse.text(200, "OK"), after_sent=on_quit)

    return {
        "/config_dump": {"GET": dump},
        "/logging": {"GET": show_level, "POST": local_only(change_level)},
        "/quitquitquit": {"POST": local_only(quit_)},
    }


# -- metrics (15020) ----------------------------------------------------------------------

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def metrics_routes(render: Callable[[], bytes]) -> Routes:
    """``/metrics`` in the Prometheus text format (e.g. ``ZtunnelMetrics.render``)."""

    def metrics(_request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, render(), PROMETHEUS_TEXT)

    return {"/metrics": {"GET": metrics}}


# -- readiness (15021) --------------------------------------------------------------------


def readiness_problem(config_synced: bool, missing_certificates: Iterable[SpiffeId]) -> str | None:
    """Why the ztunnel is not ready, or None when it is: it needs its first config and a
    certificate for every local identity (else inbound HBONE would fail)."""
    problems = []
    if not config_synced:
        problems.append("config not yet received from istiod")
    missing = sorted(str(identity) for identity in missing_certificates)
    if missing:
        problems.append("no certificate yet for " + ", ".join(missing))
    return "; ".join(problems) or None


def readiness_routes(check: Callable[[], str | None]) -> Routes:
    """``/healthz/ready``: 200 when ``check()`` is None, else 503 with its reason."""

    def ready(_request: AdminRequest) -> AdminResponse:
        problem = check()
        if problem is None:
            return AdminResponse.text(200, "ready")
        return AdminResponse.text(503, f"not ready: {problem}")

    return {"/healthz/ready": {"GET": ready}}
