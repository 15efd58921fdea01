"""Outbound: a local workload's connection leaves the node, over HBONE when the destination
is in the mesh and as plain TCP when it is not.

Waypoints (issue 3): when the destination is a Service VIP whose Service has a waypoint, or a
pod address whose Workload has one, the connection goes over HBONE to an instance of the
waypoint instead, with ``:authority`` the original destination (VIP or pod IP and the port the
client asked for); the waypoint chooses the endpoint. A waypoint that cannot be resolved
refuses the connection (fail closed): traffic never goes around it.

The entry today is SOCKS5 on ``<node>:15080`` (the source workload is known by its source
address); transparent capture on 15001 (issue 5) will feed the same ``Outbound.forward``.
``plan_outbound`` is the plain decision; the Trio code around it is a thin shell.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

from istiod_lite.api.identity import SpiffeId
from istiod_lite.api.model import GatewayAddress, Workload
from ztunnel import socks5
from ztunnel.drain import ActiveConnections
from ztunnel.hbone import (
    HboneConnectError,
    HboneStream,
    SpliceError,
    connect_headers,
    format_authority,
    splice,
)
from ztunnel.identity import CertificateManager
from ztunnel.inbound import LOOP_GUARD_PORTS
from ztunnel.pool import HbonePool, PoolKey
from ztunnel.state import (
    Destination,
    ProxyState,
    ResolveError,
    address_of,
    canonical_ip,
    identity_of,
    is_hbone,
    service_for_hostname,
)
from ztunnel.telemetry import (
    FLAG_NO_HEALTHY_UPSTREAM,
    FLAG_NO_ROUTE,
    FLAG_UNAUTHORIZED,
    FLAG_UPSTREAM_CONNECT_FAILURE,
    ConnectionRecord,
    ConnectionTelemetry,
)
from ztunnel.tls import PeerIdentityError

log = structlog.get_logger()

class OutboundRefused(Exception):
    """Why an outbound connection cannot be made, with the SOCKS5 reply that says so."""

    def __init__(self, reply_code: int, reason: str, response_flags: str = "-") -> None:
        super().__init__(reason)
        self.reply_code = reply_code
        self.reason = reason
        self.response_flags = response_flags


@dataclass(frozen=True)
class OutboundPlan:
    """Who calls, where the connection goes and through which HBONE peer.

    Without a waypoint, ``destination`` is the chosen endpoint (ip and target port), which
    is also the CONNECT authority. With one, ``destination`` is what the client addressed
    (the VIP and service port, or the pod IP and port: the authority the waypoint serves),
    ``via_waypoint`` the waypoint instance we tunnel to and ``waypoint_address`` its HBONE
    address (``<ip>:<GatewayAddress.hbone_port>``).
    """

    source: Workload
    destination: Destination
    via_waypoint: Workload | None = None
    waypoint_address: tuple[str, int] | None = None

    @property
    def use_hbone(self) -> bool:
        return self.via_waypoint is not None or self.destination.use_hbone

    @property
    def authority(self) -> str:
        """The CONNECT ``:authority``: the original destination through a waypoint, else
        the endpoint."""
        return format_authority(self.destination.ip, self.destination.port)

    @property
    def peer_workload(self) -> Workload | None:
        """The workload our connection actually reaches: the waypoint, else the endpoint."""
        return self.via_waypoint or self.destination.workload

    @property
    def destination_identity(self) -> SpiffeId | None:
        """The SPIFFE id the HBONE peer must present (None for plaintext)."""
        if self.via_waypoint is not None:
            return identity_of(self.via_waypoint)
        workload = self.destination.workload
        return identity_of(workload) if workload and self.destination.use_hbone else None

    def hbone_address(self, default_port: int) -> tuple[str, int]:
        """Where the HBONE connection is dialled: the waypoint, else the endpoint's
        ``ip:<default_port>`` (15008)."""
        if self.waypoint_address is not None:
            return self.waypoint_address
        return (self.destination.ip, default_port)


def plan_outbound(
    state: ProxyState, *, node: str, source_ip: str, host: str, port: int
) -> OutboundPlan:
    """Who is calling and where the connection really goes; OutboundRefused otherwise."""
    source = state.workload_by_address(source_ip)
    if source is None or source.node != node or not is_hbone(source):
        raise OutboundRefused(
            socks5.CONNECTION_NOT_ALLOWED,
            f"{source_ip} is not a mesh workload on node {node}",
        )
    if port in LOOP_GUARD_PORTS:
        raise OutboundRefused(
            socks5.CONNECTION_NOT_ALLOWED, f"port {port} is a proxy port and cannot be a target"
        )
    ip = canonical_ip(host)
    if ip is None:
        service = service_for_hostname(state, host)
        if service is None or not service.addresses:
            raise OutboundRefused(
                socks5.HOST_UNREACHABLE, f"{host} is not a mesh service", FLAG_NO_ROUTE
            )
        ip = service.addresses[0].address
    via_waypoint = _plan_via_waypoint(state, source, ip, port)
    if via_waypoint is not None:
        return via_waypoint
    try:
        destination = state.resolve(ip, port)
    except ResolveError as exc:
        raise OutboundRefused(
            socks5.HOST_UNREACHABLE, exc.reason, FLAG_NO_HEALTHY_UPSTREAM
        ) from None
    return OutboundPlan(source, destination)


def _plan_via_waypoint(
    state: ProxyState, source: Workload, ip: str, port: int
) -> OutboundPlan | None:
    """The plan through the destination's waypoint, None when it has none.

    A Service VIP uses the Service's waypoint; a pod address (workload-addressed traffic)
    the Workload's. As Istio's ztunnel, traffic from the waypoint itself is not sent back
    to it. The waypoint picks the endpoint, so the destination service's own endpoints do
    not matter here. An unresolvable waypoint refuses the connection (fail closed).
    """
    ip = canonical_ip(ip) or ip
    service = state.service_by_address(ip)
    gateway: GatewayAddress | None
    if service is not None:
        gateway = service.waypoint
        destination = Destination(kind="service", ip=ip, port=port, service=service,
                                  use_hbone=True, waypoint=gateway)
    else:
        workload = state.workload_by_address(ip)
        gateway = workload.waypoint if workload is not None else None
        destination = Destination(kind="workload", ip=ip, port=port, workload=workload,
                                  use_hbone=True, waypoint=gateway)
    if gateway is None or state.is_waypoint_instance(source, gateway):
        return None
    try:
        waypoint = state.waypoint_workload(gateway)
    except ResolveError as exc:
        raise OutboundRefused(
            socks5.HOST_UNREACHABLE,
            f"waypoint {gateway.destination} is unavailable: {exc.reason}",
            FLAG_NO_HEALTHY_UPSTREAM,
        ) from None
    return OutboundPlan(source, destination, via_waypoint=waypoint,
                        waypoint_address=(address_of(waypoint), gateway.hbone_port))


def _reply_for_status(status: int | None) -> int:
    return socks5.CONNECTION_NOT_ALLOWED if status in (401, 403) else socks5.CONNECTION_REFUSED


class Outbound:
    def __init__(
        self,
        *,
        node: str,
        cluster_id: str,
        connect_timeout: float,
        certificate_timeout: float,
        hbone_port: int,
        state: ProxyState,
        certs: CertificateManager,
        client_context: Callable[[SpiffeId], ssl.SSLContext | None],
        pool: HbonePool,
        telemetry: ConnectionTelemetry,
        connections: ActiveConnections,
    ) -> None:
        self._node = node
        self._cluster_id = cluster_id
        self._connect_timeout = connect_timeout
        self._certificate_timeout = certificate_timeout
        self._hbone_port = hbone_port
        self._state = state
        self._certs = certs
        self._client_context = client_context
        self._pool = pool
        self._telemetry = telemetry
        self._connections = connections

    async def serve_socks5(
        self,
        address: str,
        port: int,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=address)
        log.info("socks5 listening", address=address, port=port)
        task_status.started()
        try:
            await trio.serve_listeners(self._guarded, listeners, handler_nursery=handler_nursery)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _guarded(self, stream: trio.SocketStream) -> None:
        with self._connections.track():
            try:
                await self._handle_socks5(stream)
            except Exception:  # one bad connection never takes the proxy down
                log.exception("outbound connection handler failed")
            finally:
                await trio.aclose_forcefully(stream)

    async def _handle_socks5(self, stream: trio.SocketStream) -> None:
        peer_ip, peer_port = stream.socket.getpeername()[:2]
        protocol = socks5.Socks5ServerProtocol()
        request = await self._socks5_request(stream, protocol, f"{peer_ip}:{peer_port}")
        if request is None:
            return
        record = ConnectionRecord(
            direction="outbound",
            source_address=f"{peer_ip}:{peer_port}",
            destination_address=format_authority(request.host, request.port),
            source_workload=self._state.workload_by_address(peer_ip),
        )
        try:
            plan = plan_outbound(self._state, node=self._node, source_ip=peer_ip,
                                 host=request.host, port=request.port)
            record.source_identity = identity_of(plan.source)
            # Through a waypoint we report the service the client addressed but the waypoint
            # as the destination workload and principal: that is the peer we connected to
            # and authenticated (the waypoint reports the hop to the real endpoint).
            record.destination_workload = plan.peer_workload
            record.destination_service = plan.destination.service
            record.destination_identity = plan.destination_identity
            record.mtls = plan.use_hbone
            upstream = await self._open_upstream(plan, f"{peer_ip}:{peer_port}")
        except OutboundRefused as refused:
            self._telemetry.refused(record, reason=refused.reason,
                                    response_flags=refused.response_flags)
            protocol.send_reply(refused.reply_code)
            await stream.send_all(protocol.data_to_send())
            return
        async with upstream:
            protocol.send_reply(socks5.SUCCEEDED)
            await stream.send_all(protocol.data_to_send())
            early = protocol.trailing_data()
            if early:
                await upstream.send_all(early)
            self._telemetry.opened(record)
            try:
                result = await splice(stream, upstream)
            except SpliceError as exc:
                self._telemetry.closed(record, sent=exc.a_to_b + len(early),
                                       received=exc.b_to_a, error=exc.reason)
            else:
                self._telemetry.closed(record, sent=result.a_to_b + len(early),
                                       received=result.b_to_a)

    async def _socks5_request(
        self, stream: trio.SocketStream, protocol: socks5.Socks5ServerProtocol, peer: str
    ) -> socks5.ConnectRequest | None:
        """Drive the SOCKS5 handshake up to the CONNECT request (None: refused or gone)."""
        with trio.move_on_after(self._connect_timeout):
            while True:
                try:
                    event = protocol.next_event()
                except socks5.Socks5Error as exc:
                    log.warning("socks5 request refused", peer=peer, reason=exc.reason)
                    await stream.send_all(protocol.data_to_send())
                    return None
                if pending := protocol.data_to_send():
                    await stream.send_all(pending)
                if isinstance(event, socks5.NeedData):
                    protocol.receive_data(await stream.receive_some(4096))
                elif isinstance(event, socks5.Greeting) and not event.accepted:
                    log.warning("socks5 refused: client offers no acceptable method", peer=peer)
                    return None
                elif isinstance(event, socks5.ConnectRequest):
                    return event
        log.warning("socks5 handshake timed out", peer=peer)
        return None

    async def _open_upstream(
        self, plan: OutboundPlan, forwarded_for: str
    ) -> trio.abc.HalfCloseableStream:
        destination = plan.destination
        if not plan.use_hbone:
            return await self._open_plain(plan)
        assert plan.destination_identity is not None
        source_identity = identity_of(plan.source)
        try:
            await self._certs.wait_for(source_identity, self._certificate_timeout)
        except (TimeoutError, KeyError) as exc:
            raise OutboundRefused(socks5.GENERAL_FAILURE, str(exc)) from None
        service = destination.service
        peer_ip, peer_port = plan.hbone_address(self._hbone_port)
        key = PoolKey(
            source_identity=source_identity,
            destination_identity=plan.destination_identity,
            source_ip=plan.source.addresses[0],
            destination_address=(peer_ip, peer_port),
        )
        headers = connect_headers(
            plan.authority,
            forwarded_for=forwarded_for,
            service_host=service.hostname if service else None,
            baggage=self._baggage(plan.source),
        )
        try:
            with trio.fail_after(self._connect_timeout):
                stream: HboneStream = await self._pool.open_stream(key, headers)
        except HboneConnectError as exc:
            raise OutboundRefused(
                _reply_for_status(exc.status), f"HBONE CONNECT answered {exc.status}: {exc.reason}",
                FLAG_UNAUTHORIZED if exc.status == 401 else FLAG_UPSTREAM_CONNECT_FAILURE,
            ) from None
        except PeerIdentityError as exc:
            raise OutboundRefused(socks5.GENERAL_FAILURE, f"mTLS with {peer_ip}: "
                                  f"{exc.reason}", FLAG_UPSTREAM_CONNECT_FAILURE) from None
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise OutboundRefused(socks5.HOST_UNREACHABLE,
                                  f"HBONE to {format_authority(peer_ip, peer_port)}: {exc}",
                                  FLAG_UPSTREAM_CONNECT_FAILURE) from None
        return stream

    async def _open_plain(self, plan: OutboundPlan) -> trio.SocketStream:
        ip, port = plan.destination.address
        try:
            with trio.fail_after(self._connect_timeout):
                return await trio.open_tcp_stream(ip, port)
        except trio.TooSlowError:
            raise OutboundRefused(socks5.TTL_EXPIRED, f"connect to {ip}:{port} timed out",
                                  FLAG_UPSTREAM_CONNECT_FAILURE) from None
        except OSError as exc:
            code = (socks5.CONNECTION_REFUSED if exc.errno == errno.ECONNREFUSED
                    else socks5.HOST_UNREACHABLE)
            raise OutboundRefused(code, f"connect to {ip}:{port}: {exc.strerror or exc}",
                                  FLAG_UPSTREAM_CONNECT_FAILURE) from None

    def _baggage(self, source: Workload) -> dict[str, str]:
        baggage = {
            "k8s.cluster.name": source.cluster_id,
            "k8s.namespace.name": source.namespace,
            f"k8s.{source.workload_type or 'pod'}.name": source.workload_name or source.name,
            "service.name": source.canonical_name or source.name,
            "service.version": source.canonical_revision or "latest",
        }
        if source.locality.region:
            baggage["cloud.region"] = source.locality.region
        if source.locality.zone:
            baggage["cloud.availability_zone"] = source.locality.zone
        return baggage
