"""A waypoint: an HBONE server with its own identity that applies L7 policy and routing.

Per CONNECT it finds what the client addressed — a Service VIP (or a pod IP) whose traffic
this waypoint owns — answers 200, and then speaks HTTP inside the tunnel (``pipeline``) or,
for TCP, forwards the bytes to a chosen endpoint. It reuses ztunnel's libraries: HBONE, TLS,
certificates, the config stream and the proxy state; only the L7 logic is its own.

The lifecycle is the shared ``ProxyRuntime`` (ambient_dataplane.runtime), as in ztunnel;
``Waypoint`` is the ``ProxyRole`` it runs: the HBONE pool, the HTTP upstream and the request
pipeline (whose mirrors outlive their requests) in the *connections* nursery, the HBONE
listener in the *services* nursery, the tracer flushed once the connections drained.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import structlog
import trio

from ambient_api import kinds, l7
from ambient_api.identity import SpiffeId
from ambient_api.model import TunnelProtocol, Workload
from ambient_dataplane.hbone import (
    ConnectRequest,
    HboneClient,
    HboneRejection,
    HboneResponder,
    SpliceError,
    connect,
    connect_headers,
    format_authority,
    serve_hbone_tls,
    splice,
)
from ambient_dataplane.hbone.pool import HbonePool, PoolKey
from ambient_dataplane.runtime import ProxyRuntime, RuntimeSettings
from ambient_dataplane.state import SERVICE, WORKLOAD, ProxyState, identity_of
from waypoint.config import WaypointConfig
from waypoint.forwarded_headers import TunnelPeer, sanitize_request_headers
from waypoint.http import HttpLimits, HttpRequest, HttpResponse, looks_like_http, serve_http
from waypoint.pipeline import Caller, RequestPipeline, Target
from waypoint.routing import choose_backend
from waypoint.telemetry import RequestLabeler, Tracer, WaypointMetrics, access_log
from waypoint.upstream import HttpUpstream

log = structlog.get_logger("waypoint")

HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc", "h2c", "grpc-web"})
_SNIFF_TIMEOUT = 0.3
_SNIFF_BYTES = 24  # enough for the HTTP/2 preface or an HTTP/1 request line's method


def resolve_target(
    state: ProxyState, *, waypoint_host: str, ip: str, port: int
) -> Target:
    """What a CONNECT to ``ip:port`` addresses, if this waypoint serves it (sans-IO).

    Raises HboneRejection(400) when the address is not a service or workload that uses this
    waypoint, or the service has no such port: a waypoint never forwards for others."""
    service = state.service_by_address(ip)
    if service is not None:
        if service.waypoint is None or service.waypoint.destination != waypoint_host:
            raise HboneRejection(400, f"service {service.hostname} does not use this waypoint")
        if not any(p.service_port == port for p in service.ports):
            raise HboneRejection(400, f"service {service.hostname} has no port {port}")
        return Target(port=port, service=service)
    workload = state.workload_by_address(ip)
    if workload is not None:
        if workload.waypoint is None or workload.waypoint.destination != waypoint_host:
            raise HboneRejection(400, f"workload {workload.namespace}/{workload.name} does not "
                                      "use this waypoint")
        return Target(port=port, workload=workload)
    raise HboneRejection(400, f"{ip} is neither a service nor a workload of this mesh")


def protocol_of(target: Target) -> str | None:
    """'http' or 'tcp' when the port declares it (appProtocol or port-name prefix), else
    None: sniff the first bytes."""
    if target.service is None:
        return None
    for mapping in target.service.ports:
        if mapping.service_port == target.port and mapping.app_protocol:
            return "http" if mapping.app_protocol.lower() in HTTP_PROTOCOLS else "tcp"
    return None


class _Downstream(NamedTuple):
    """What every request of one HTTP tunnel shares, worked out once per tunnel."""

    target: Target
    caller: Caller
    peer: TunnelPeer  # who the caller is, for the headers the upstream may believe
    labeler: RequestLabeler


def runtime_settings(config: WaypointConfig, identity: SpiffeId) -> RuntimeSettings:
    """What the shared lifecycle needs of a waypoint's configuration."""
    return RuntimeSettings(
        name="waypoint",
        xds_address=config.xds_address,
        root_cert=config.root_cert,
        token=config.token,
        token_file=config.token_file,
        # Every kind, under the waypoint's service-account principal.
        discovery_node=f"serviceaccount:{config.namespace}/{config.service_account}",
        discovery_kinds=kinds.ALL_KINDS,
        address=config.address,
        ports=config.ports,
        drain_timeout=config.drain_timeout,
        log_level=config.log_level,
        log_fields={"name": config.name, "namespace": config.namespace,
                    "address": config.address, "identity": str(identity)},
    )


class Waypoint:
    pipeline: RequestPipeline  # built with the connections nursery, where mirrors run

    def __init__(self, config: WaypointConfig) -> None:
        self.config = config
        self.identity = SpiffeId(config.trust_domain, config.namespace, config.service_account)
        self.waypoint_key = l7.waypoint_key(config.namespace, config.name)
        self.hostname = f"{config.name}.{config.namespace}.svc.cluster.local"
        self.state = ProxyState()
        self.metrics = WaypointMetrics()
        self.limits = HttpLimits(max_body_bytes=config.max_request_bytes,
                                 idle_timeout=config.idle_timeout,
                                 header_timeout=config.request_headers_timeout)
        self._rand = random.Random()
        self.runtime = ProxyRuntime(runtime_settings(config, self.identity), self.state,
                                    self._on_change)
        self.runtime.certs.set_wanted({self.identity})
        self.tracer = Tracer(f"{config.name}.{config.namespace}", config.otlp_endpoint)
        self.pool = HbonePool(self._connect_hbone)
        self.upstream = HttpUpstream(self.pool, self.identity, config.address,
                                     hbone_port=config.ports.hbone)

    @property
    def stopped(self) -> trio.Event:
        return self.runtime.stopped

    def request_shutdown(self) -> None:
        self.runtime.request_shutdown()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.runtime.run(self, task_status=task_status)

    # -- the runtime's ProxyRole ----------------------------------------------------------

    async def start_connections(self, connections: trio.Nursery) -> None:
        await connections.start(self.pool.run)
        await connections.start(self.upstream.run)
        self.pipeline = RequestPipeline(
            state=self.state, waypoint_key=self.waypoint_key, upstream=self.upstream,
            nursery=connections, rand=self._rand,
            path_normalization=self.config.path_normalization,
        )

    async def start_listeners(self, services: trio.Nursery, connections: trio.Nursery) -> None:
        await services.start(self._serve_hbone, connections)

    def dump_sections(self) -> Mapping[str, Callable[[], Any]]:
        return {
            "workloads": partial(self.state.dump_kind, WORKLOAD),
            "services": partial(self.state.dump_kind, SERVICE),
            "l7": self._l7_dump,
            "resilience": lambda: self.pipeline.dump(),
        }

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    async def drained(self) -> None:
        """Export the spans of the requests that finished, before the rest are cut."""
        await self.tracer.aclose()

    # -- config --------------------------------------------------------------------------

    def _on_change(self, _change: object) -> None:
        self.pipeline.config_changed()

    # -- admin ---------------------------------------------------------------------------

    def _l7_dump(self) -> dict[str, Any]:
        return {kind: self.state.dump_kind(kind)
                for kind in sorted(kinds.ALL_KINDS - kinds.L4_KINDS)}

    # -- HBONE in ------------------------------------------------------------------------

    async def _serve_hbone(
        self, handler_nursery: trio.Nursery, *, task_status: trio.TaskStatus[None]
    ) -> None:
        listeners = await trio.open_tcp_listeners(self.config.ports.hbone,
                                                  host=self.config.address)
        task_status.started()

        connections = self.runtime.connections

        async def handle(stream: trio.SocketStream) -> None:
            with connections.track():
                context = self.runtime.tls_contexts.server(self.identity)
                if context is None:
                    log.warning("hbone connection refused: no certificate yet")
                    await trio.aclose_forcefully(stream)
                    return
                try:
                    await serve_hbone_tls(stream, context, self._on_connect,
                                          accepted_trust_domains={self.config.trust_domain},
                                          drain=connections.drain)
                except Exception:
                    log.exception("hbone connection failed")

        await trio.serve_listeners(handle, listeners, handler_nursery=handler_nursery)

    async def _on_connect(self, request: ConnectRequest, responder: HboneResponder) -> None:
        try:
            target = resolve_target(self.state, waypoint_host=self.hostname,
                                    ip=str(request.host), port=request.port)
        except HboneRejection as rejection:
            log.info("connect refused", authority=request.authority, reason=rejection.reason,
                     source=str(responder.connection.peer_identity))
            await responder.reject(rejection.status, rejection.reason)
            return
        peer = responder.connection.peer_address
        source_ip = peer[0] if peer else ""
        caller = Caller(responder.connection.peer_identity, source_ip,
                        self.state.workload_by_address(source_ip))
        tunnel = await responder.accept()
        protocol = protocol_of(target)
        prefix = b""
        if protocol is None:
            with trio.move_on_after(_SNIFF_TIMEOUT):
                while looks_like_http(prefix) is None and len(prefix) < _SNIFF_BYTES:
                    chunk = await tunnel.receive_some(_SNIFF_BYTES - len(prefix))
                    if not chunk:
                        break
                    prefix += chunk
            protocol = "http" if looks_like_http(prefix) else "tcp"
        if protocol == "http":
            downstream = _Downstream(target, caller, TunnelPeer(caller.ip, caller.identity),
                                     RequestLabeler(caller.workload, caller.identity))
            await serve_http(
                tunnel, lambda r: self._handle_request(r, downstream), self.limits,
                initial_bytes=prefix,
            )
        else:
            await self._forward_tcp(tunnel, prefix, target, caller)

    # -- HTTP ----------------------------------------------------------------------------

    async def _handle_request(self, request: HttpRequest, downstream: _Downstream) -> HttpResponse:
        target, caller = downstream.target, downstream.caller
        started = trio.current_time()
        request = request.replace(headers=sanitize_request_headers(
            request.headers, downstream.peer, waypoint=self.identity))
        traceparent, tracestate = request.header("traceparent"), request.header("tracestate")
        span = self.tracer.start(traceparent, tracestate)
        if traceparent is not None or tracestate is not None:  # ours replace them upstream
            request = request.with_headers(remove=("traceparent", "tracestate"))
        forwarded = tuple(span.propagation_headers())
        response, outcome = await self.pipeline.handle(request, target, caller, forwarded)
        flags = outcome.flags
        response = response.replace(response_flags=flags)
        duration_ms = (trio.current_time() - started) * 1000
        service = outcome.backend_service or target.service
        labels = downstream.labeler.labels(
            outcome.endpoint, service, status=response.status, response_flags=flags,
            protocol="grpc" if (request.header("content-type") or "").startswith(
                "application/grpc") else "http",
        )
        self.metrics.record(labels, duration_ms, len(request.body), len(response.body))
        if self.tracer.exporting:
            self.tracer.finish(
                span, method=request.method, path=request.path, status=response.status,
                authority=request.authority, route_name=outcome.route_name,
                upstream_cluster=service.hostname if service else None,
                response_flags=flags, source_principal=str(caller.identity),
                destination_principal=(
                    str(identity_of(outcome.endpoint)) if outcome.endpoint else None
                ),
                end_time_ns=time.time_ns(),
            )
        access_log(
            method=request.method, authority=request.authority, path=request.path,
            protocol=f"HTTP/{request.http_version}", status=response.status,
            response_flags=flags, duration_ms=round(duration_ms, 1),
            request_bytes=len(request.body), response_bytes=len(response.body),
            upstream_host=outcome.upstream_host, source_principal=str(caller.identity),
            route_name=outcome.route_name, trace_id=span.context.trace_id,
        )
        return response

    # -- TCP -----------------------------------------------------------------------------

    async def _forward_tcp(
        self, tunnel: trio.abc.HalfCloseableStream, prefix: bytes, target: Target,
        caller: Caller,
    ) -> None:
        """TCP through the waypoint: a TCPRoute's weighted backends, else the addressed
        service (or workload), to one endpoint over HBONE."""
        endpoint, port = self._tcp_destination(target)
        if endpoint is None:
            log.info("tcp connection dropped: no endpoint", port=target.port,
                     service=target.service.hostname if target.service else None)
            return
        ip = endpoint.addresses[0]
        key = PoolKey(self.identity, identity_of(endpoint), self.config.address,
                      (ip, self.config.ports.hbone))
        headers = connect_headers(format_authority(ip, port),
                                  forwarded_for=f"{caller.ip}:0",
                                  service_host=target.service.hostname if target.service else None)
        try:
            upstream = await self.pool.open_stream(key, headers)
        except Exception as error:  # HBONE refusal, TLS, TCP: the reason is in the log
            log.info("tcp upstream failed", endpoint=f"{ip}:{port}", error=str(error))
            return
        async with upstream:
            if prefix:
                await upstream.send_all(prefix)
            try:
                await splice(tunnel, upstream)
            except SpliceError as error:
                log.info("tcp connection broken", reason=error.reason)

    def _tcp_destination(self, target: Target) -> tuple[Workload | None, int]:
        if target.workload is not None:
            return target.workload, target.port
        assert target.service is not None
        service, port = target.service, target.port
        for route in self.state.resources_of(l7.TcpRoute):
            if service.key in route.parents or self.waypoint_key in route.parents:
                chosen = choose_backend(route, self._rand.random)
                if chosen is None:
                    # Gateway API: weight 0 takes no traffic; with none left, refuse.
                    return None, port
                found = self.state.service(chosen.service)
                if found is None:
                    # An invalid backend's share of connections is refused, not rerouted.
                    return None, port
                service, port = found, chosen.port
                break
        mapping = next((p for p in service.ports if p.service_port == port), None)
        endpoints = [
            w for w in self.state.endpoints(service.key)
            if w.addresses and w.tunnel_protocol is TunnelProtocol.HBONE
        ]
        if mapping is None or not endpoints:
            return None, port
        return self._rand.choice(endpoints), mapping.target_port or mapping.service_port

    # -- HBONE out -----------------------------------------------------------------------

    async def _connect_hbone(self, key: PoolKey, nursery: trio.Nursery) -> HboneClient:
        context = self.runtime.tls_contexts.client(self.identity)
        if context is None:
            raise OSError(f"no certificate for {self.identity} yet")
        ip, port = key.destination_address
        return await connect(ip, port, context, key.destination_identity, nursery=nursery,
                             local_address=self.config.address)

