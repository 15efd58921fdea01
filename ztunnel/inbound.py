"""Inbound: HBONE on ``<pod-ip>:15008`` and plaintext on ``<pod-ip>:15006``.

As in Istio's in-pod mode, each local workload gets its own listeners on its own address, so
the listener tells which workload (and so which certificate) a connection is for. The
decision -- is this target ours, is the port allowed, does policy admit the caller -- is the
plain function ``decide_inbound``; the rest is the Trio shell around it.

Two ways to get the listeners: the embedded mode binds the pod's loopback address in the
node's namespace (``serve_workload``) and plaintext clients name the port they meant in a
PROXY header; in-pod capture (issue 5) binds them inside the pod's own network namespace
(``serve_listeners`` with ``pod_netns``), takes the port from SO_ORIGINAL_DST of the
connection iptables redirected to 15006, and connects to the app from inside that namespace
with the bypass mark so the pod's rules leave ztunnel's own connection alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from ambient_api.identity import SpiffeId
from ambient_api.model import Service, TunnelProtocol, Workload
from ambient_dataplane.drain import serve_tracked
from ambient_dataplane.hbone import (
    ConnectionInfo,
    ConnectRequest,
    HboneRejection,
    HboneResponder,
    serve_hbone_tls,
)
from ambient_dataplane.state import ProxyState, canonical_ip, identity_of, service_for_hostname
from ztunnel.authz import ConnectionAttributes, evaluate
from ztunnel.capture import netns
from ztunnel.errors import InboundRefused, ProxyError, UpstreamConnectError
from ztunnel.inputs import ProxyInputs
from ztunnel.proxyproto import ProxyProtocolError, parse_proxy_header
from ztunnel.sockets import connect_upstream
from ztunnel.telemetry import ConnectionRecord

log = structlog.get_logger()

# Never proxy to the proxy's own ports (a loop).
LOOP_GUARD_PORTS = frozenset({15001, 15006, 15008})
_PROXY_HEADER_TIMEOUT = 5.0
_MAX_PROXY_HEADER = 16 + 65535


@dataclass(frozen=True)
class InboundTarget:
    workload: Workload
    port: int
    policy_reason: str


def decide_inbound(
    state: ProxyState,
    *,
    node: str,
    listener_ip: str,
    target_ip: str,
    target_port: int,
    source_ip: str,
    source_identity: SpiffeId | None,
    root_namespace: str,
) -> InboundTarget:
    """Admit a connection to ``target_ip:target_port`` or raise HboneRejection.

    400: the target is not the local workload this listener serves, or a proxy port;
    503: the workload is not (or no longer) in the mesh; 401: denied by policy.
    """
    target = canonical_ip(target_ip)
    if target is None:
        raise HboneRejection(400, f"{target_ip!r} is not an IP address")
    workload = state.workload_by_address(target)
    if workload is None or workload.node != node:
        raise HboneRejection(400, f"{target_ip} is not a workload on node {node}")
    if target != canonical_ip(listener_ip):
        raise HboneRejection(
            400, f"{target_ip} is not the workload served at {listener_ip}"
        )
    if target_port in LOOP_GUARD_PORTS:
        raise HboneRejection(400, f"port {target_port} is a proxy port and cannot be a target")
    if workload.tunnel_protocol is not TunnelProtocol.HBONE:
        raise HboneRejection(
            503, f"workload {workload.namespace}/{workload.name} is not in the mesh"
        )
    decision = evaluate(
        state.policies_for(workload, root_namespace),
        ConnectionAttributes(
            source_ip=source_ip,
            source_identity=source_identity,
            destination_ip=target,
            destination_port=target_port,
        ),
    )
    if not decision.allowed:
        raise HboneRejection(401, decision.reason)
    return InboundTarget(workload, target_port, decision.reason)


class Inbound:
    """Serves the inbound listeners of the node's workloads."""

    def __init__(self, inputs: ProxyInputs) -> None:
        config = inputs.config
        self._node = config.node
        self._root_namespace = config.root_namespace
        self._hbone_port = config.ports.hbone
        self._plaintext_port = config.ports.inbound_plaintext
        self._connect_timeout = config.connect_timeout
        self._accepted_trust_domains = frozenset({config.trust_domain})
        self._state = inputs.state
        self._tls_contexts = inputs.tls_contexts
        self._telemetry = inputs.telemetry
        self._connections = inputs.connections

    async def serve_workload(
        self,
        workload_ip: str,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``workload_ip``'s HBONE and plaintext ports until cancelled.

        Connections run in ``handler_nursery`` so that closing the listeners (a pod left, or
        a drain began) does not cut the connections already flowing.
        """
        hbone = await trio.open_tcp_listeners(self._hbone_port, host=workload_ip)
        try:
            plaintext = await trio.open_tcp_listeners(self._plaintext_port, host=workload_ip)
        except BaseException:
            for listener in hbone:
                await trio.aclose_forcefully(listener)
            raise
        log.info("inbound listening", workload_ip=workload_ip,
                 ports=[self._hbone_port, self._plaintext_port])
        await self.serve_listeners(workload_ip, hbone, plaintext, handler_nursery,
                                   task_status=task_status)

    async def serve_listeners(
        self,
        workload_ip: str,
        hbone: list[trio.SocketListener],
        plaintext: list[trio.SocketListener],
        handler_nursery: trio.Nursery,
        *,
        pod_netns: Path | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``workload_ip``'s already bound HBONE and plaintext listeners until
        cancelled, then close them. ``pod_netns``: they were bound inside the pod's network
        namespace under capture (the original port comes from SO_ORIGINAL_DST and the app is
        reached from inside that namespace); None: the embedded mode."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, hbone, handler_nursery,
                               lambda s: self._handle_hbone(s, workload_ip, pod_netns))
            nursery.start_soon(self._accept_loop, plaintext, handler_nursery,
                               lambda s: self._handle_plaintext(s, workload_ip, pod_netns))
            task_status.started()

    async def _accept_loop(
        self,
        listeners: list[trio.SocketListener],
        handler_nursery: trio.Nursery,
        handle: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        await serve_tracked(listeners, handle, connections=self._connections,
                            handler_nursery=handler_nursery, what="inbound")

    # -- HBONE ----------------------------------------------------------------------------

    async def _handle_hbone(
        self, stream: trio.SocketStream, workload_ip: str, pod_netns: Path | None
    ) -> None:
        workload = self._state.workload_by_address(workload_ip)
        identity = identity_of(workload) if workload else None
        context = self._tls_contexts.server(identity) if identity else None
        if context is None:
            log.warning("hbone connection refused: no certificate for the workload yet",
                        workload_ip=workload_ip, identity=str(identity))
            return

        async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
            await self._serve_connect(request, responder, workload_ip, pod_netns)

        await serve_hbone_tls(
            stream, context, handler,
            accepted_trust_domains=self._accepted_trust_domains,
        )

    async def _serve_connect(
        self,
        request: ConnectRequest,
        responder: HboneResponder,
        workload_ip: str,
        pod_netns: Path | None,
    ) -> None:
        connection: ConnectionInfo = responder.connection
        peer_ip = connection.peer_address[0] if connection.peer_address else ""
        peer = f"{peer_ip}:{connection.peer_address[1]}" if connection.peer_address else "?"
        target_ip = str(request.host)
        record = ConnectionRecord(
            direction="inbound",
            source_address=request.forwarded_for or peer,
            destination_address=f"{target_ip}:{request.port}",
            source_workload=self._state.workload_by_address(peer_ip),
            source_identity=connection.peer_identity,
            mtls=True,
        )
        try:
            target = decide_inbound(
                self._state, node=self._node, listener_ip=workload_ip,
                target_ip=target_ip, target_port=request.port, source_ip=peer_ip,
                source_identity=connection.peer_identity, root_namespace=self._root_namespace,
            )
        except HboneRejection as rejection:
            record.destination_workload = self._state.workload_by_address(target_ip)
            await self._refuse(record, InboundRefused.from_rejection(rejection), responder)
            return
        record.destination_workload = target.workload
        record.destination_identity = identity_of(target.workload)
        record.destination_service = self._targeted_service(request, target.workload)
        try:
            upstream = await connect_upstream(target_ip, target.port, pod_netns=pod_netns,
                                              timeout=self._connect_timeout)
        except UpstreamConnectError as error:
            await self._refuse(record, error, responder)
            return
        try:
            tunnel = await responder.accept()
            await self._telemetry.carry(record, tunnel, upstream)
        finally:
            upstream.socket.close()  # no checkpoint needed to close (SocketStream.aclose has one)

    def _targeted_service(self, request: ConnectRequest, workload: Workload) -> Service | None:
        """The Service the caller addressed (``forwarded: ...;host=``), for telemetry, but
        only if it really selects this workload: a caller cannot pick our labels."""
        if not request.forwarded_host:
            return None
        service = service_for_hostname(self._state, request.forwarded_host)
        return service if service is not None and service.key in workload.services else None

    # -- plaintext ------------------------------------------------------------------------

    async def _handle_plaintext(
        self, stream: trio.SocketStream, workload_ip: str, pod_netns: Path | None
    ) -> None:
        peer_ip, peer_port = stream.socket.getpeername()[:2]
        record = ConnectionRecord(
            direction="inbound",
            source_address=f"{peer_ip}:{peer_port}",
            destination_address=f"{workload_ip}:?",
            source_workload=self._state.workload_by_address(peer_ip),
        )
        try:
            if pod_netns is None:
                target_ip = workload_ip
                port, early_data = await self._original_port(stream, workload_ip)
            else:
                target_ip, port = self._captured_destination(stream)
                early_data = b""
        except ProxyProtocolError as exc:
            await self._refuse(record, InboundRefused(f"no original destination: {exc}"))
            return
        record.destination_address = f"{target_ip}:{port}"
        try:
            target = decide_inbound(
                self._state, node=self._node, listener_ip=workload_ip, target_ip=target_ip,
                target_port=port, source_ip=peer_ip, source_identity=None,
                root_namespace=self._root_namespace,
            )
        except HboneRejection as rejection:
            record.destination_workload = self._state.workload_by_address(workload_ip)
            await self._refuse(record, InboundRefused.from_rejection(rejection))
            return
        record.destination_workload = target.workload
        try:
            upstream = await connect_upstream(workload_ip, port, pod_netns=pod_netns,
                                              timeout=self._connect_timeout)
        except UpstreamConnectError as error:
            await self._refuse(record, error)
            return
        try:
            if early_data:
                await upstream.send_all(early_data)
            await self._telemetry.carry(record, stream, upstream, already_sent=len(early_data))
        finally:
            upstream.socket.close()

    def _captured_destination(self, stream: trio.SocketStream) -> tuple[str, int]:
        """The destination iptables rewrote to 15006 (SO_ORIGINAL_DST). Under capture a
        PROXY header is never believed: a connection made to 15006 directly has no other
        original destination than 15006 itself, which decide_inbound refuses as a proxy
        port."""
        try:
            return netns.original_destination(stream.socket)
        except (OSError, netns.NetnsError) as exc:
            raise ProxyProtocolError(f"SO_ORIGINAL_DST: {exc}") from None

    async def _original_port(
        self, stream: trio.SocketStream, workload_ip: str
    ) -> tuple[int, bytes]:
        """The destination port the client meant. Without capture (the embedded mode) the
        client says it with a PROXY protocol header; only its port is believed, and only if
        it names this listener's own address."""
        buffer = bytearray()
        with trio.move_on_after(_PROXY_HEADER_TIMEOUT):
            while True:
                parsed = parse_proxy_header(bytes(buffer))
                if parsed is not None:
                    consumed, header = parsed
                    if header.destination is None:
                        raise ProxyProtocolError("the PROXY header carries no destination")
                    ip, port = header.destination
                    if canonical_ip(str(ip)) != canonical_ip(workload_ip):
                        raise ProxyProtocolError(
                            f"the PROXY header names {ip}, not this workload ({workload_ip})"
                        )
                    return int(port), bytes(buffer[consumed:])
                if len(buffer) > _MAX_PROXY_HEADER:
                    raise ProxyProtocolError("PROXY header too long")
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise ProxyProtocolError("connection closed before a PROXY header")
                buffer += chunk
        raise ProxyProtocolError(f"no PROXY header within {_PROXY_HEADER_TIMEOUT}s")

    # -- shared ---------------------------------------------------------------------------

    async def _refuse(
        self,
        record: ConnectionRecord,
        error: ProxyError,
        responder: HboneResponder | None = None,
    ) -> None:
        """Report a connection that will carry nothing and, over HBONE, answer the CONNECT
        with the error's status; a plaintext client is just closed."""
        self._telemetry.refused(record, reason=error.reason,
                                response_flags=error.response_flags)
        if responder is not None:
            await responder.reject(error.status_hint, error.reason)
