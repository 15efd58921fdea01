"""Outbound: a local workload's connection leaves the node, over HBONE when the destination
is in the mesh and as plain TCP when it is not.

Waypoints (issue 3): when the destination is a Service VIP whose Service has a waypoint, or a
pod address whose Workload has one, the connection goes over HBONE to an instance of the
waypoint instead, with ``:authority`` the original destination (VIP or pod IP and the port the
client asked for); the waypoint chooses the endpoint. A waypoint that cannot be resolved
refuses the connection (fail closed): traffic never goes around it.

Two entries feed the same ``Outbound.forward``: SOCKS5 on ``<node>:15080`` (the embedded
mode; the source workload is known by its source address) and, with in-pod capture (issue 5),
the pod's own ``15001`` listener inside its network namespace, where iptables redirected the
app's connection: the original destination comes from SO_ORIGINAL_DST and the source is the
pod the listener belongs to (no source IP is trusted). Captured connections leave from inside
the source pod's namespace with the bypass mark so the pod's rules do not capture them again.
``plan_outbound`` is the plain decision; the Trio code around it is a thin shell.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
import trio

from ambient_api.identity import SpiffeId
from ambient_api.model import GatewayAddress, Workload
from ambient_dataplane.drain import serve_tracked
from ambient_dataplane.hbone import (
    HboneConnectError,
    HboneStream,
    connect_headers,
    format_authority,
)
from ambient_dataplane.hbone.pool import PoolKey
from ambient_dataplane.hbone.splice import SocketSide
from ambient_dataplane.labels import ResponseFlag
from ambient_dataplane.state import (
    Destination,
    ProxyState,
    ResolveError,
    address_of,
    canonical_ip,
    identity_of,
    is_hbone,
    service_for_hostname,
)
from ambient_dataplane.tls import PeerIdentityError
from ztunnel import socks5
from ztunnel.capture import netns
from ztunnel.config import ZtunnelConfig
from ztunnel.errors import OutboundRefused, ProxyError, UpstreamConnectError
from ztunnel.inbound import LOOP_GUARD_PORTS
from ztunnel.inputs import ProxyInputs
from ztunnel.sockets import connect_upstream, reset_on_close
from ztunnel.telemetry import ConnectionRecord

log = structlog.get_logger()

# How long a connection waits for its source's certificate (just enrolled, not yet issued).
CERTIFICATE_WAIT = 5.0


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


@dataclass(frozen=True)
class OwnEndpoints:
    """Where the node's proxy itself listens, never a destination: through SOCKS5 a pod could
    otherwise reach the admin server (``/quitquitquit`` answers callers on the proxy's own
    host) or loop through the proxy's ports from the proxy's own address.

    ``addresses`` are the node address the admin, metrics, readiness and SOCKS5 servers bind;
    loopback and unspecified destinations count as the proxy's own too (as Istio's ztunnel
    refuses loopback calls to its ports: a wildcard bind answers there). The HBONE, plaintext
    inbound and capture ports (``LOOP_GUARD_PORTS``) are refused on every address.
    """

    addresses: frozenset[str] = frozenset()
    ports: frozenset[int] = LOOP_GUARD_PORTS

    @classmethod
    def of(cls, config: ZtunnelConfig) -> OwnEndpoints:
        ports = config.ports
        return cls(
            addresses=frozenset({canonical_ip(config.node_address) or config.node_address}),
            ports=LOOP_GUARD_PORTS | {ports.admin, ports.metrics, ports.readiness, ports.socks5,
                                      ports.hbone, ports.inbound_plaintext,
                                      ports.outbound_capture},
        )

    def refusal(self, ip: str, port: int) -> OutboundRefused | None:
        """Why ``ip:port`` (a canonical address, or a name) cannot be a target, None when it
        can."""
        if port in LOOP_GUARD_PORTS:
            return OutboundRefused(f"port {port} is a proxy port and cannot be a target",
                                   reply_code=socks5.CONNECTION_NOT_ALLOWED)
        if port in self.ports and (ip in self.addresses or _is_local(ip)):
            return OutboundRefused(
                f"{format_authority(ip, port)} is the node proxy's own port and cannot be a "
                "target", reply_code=socks5.CONNECTION_NOT_ALLOWED,
            )
        return None


def _is_local(host: str) -> bool:
    """Loopback, or unspecified (connecting to 0.0.0.0 or :: reaches this host); a name is
    neither (it is only ever resolved as a mesh service)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def plan_outbound(
    state: ProxyState, *, node: str, source_ip: str, host: str, port: int,
    own: OwnEndpoints = OwnEndpoints(),  # noqa: B008 - frozen, so sharing it is safe
) -> OutboundPlan:
    """Who is calling (by source address) and where the connection really goes;
    OutboundRefused otherwise."""
    return plan_outbound_from(state, state.workload_by_address(source_ip), node=node,
                              caller=source_ip, host=host, port=port, own=own)


def plan_outbound_from(
    state: ProxyState, source: Workload | None, *, node: str, caller: str, host: str, port: int,
    own: OwnEndpoints = OwnEndpoints(),  # noqa: B008 - frozen, so sharing it is safe
) -> OutboundPlan:
    """Where a connection from ``source`` (None: unknown; ``caller`` names it in the refusal)
    really goes; OutboundRefused when the source is not an enrolled workload of ``node`` or
    the target is one of ``own`` endpoints (before or after resolution)."""
    if source is None or source.node != node or not is_hbone(source):
        raise OutboundRefused(f"{caller} is not a mesh workload on node {node}",
                              reply_code=socks5.CONNECTION_NOT_ALLOWED)
    ip = canonical_ip(host)
    if (refused := own.refusal(ip or host, port)) is not None:
        raise refused
    if ip is None:
        service = service_for_hostname(state, host)
        if service is None or not service.addresses:
            raise OutboundRefused(f"{host} is not a mesh service",
                                  reply_code=socks5.HOST_UNREACHABLE,
                                  response_flags=ResponseFlag.NO_ROUTE)
        ip = service.addresses[0].address
    via_waypoint = _plan_via_waypoint(state, source, ip, port)
    if via_waypoint is not None:
        return via_waypoint
    try:
        destination = state.resolve(ip, port)
    except ResolveError as exc:
        raise OutboundRefused(exc.reason, reply_code=socks5.HOST_UNREACHABLE,
                              response_flags=ResponseFlag.NO_HEALTHY_UPSTREAM) from None
    endpoint_ip, endpoint_port = destination.address
    if (refused := own.refusal(canonical_ip(endpoint_ip) or endpoint_ip, endpoint_port)):
        raise refused
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
        raise OutboundRefused(f"waypoint {gateway.destination} is unavailable: {exc.reason}",
                              reply_code=socks5.HOST_UNREACHABLE,
                              response_flags=ResponseFlag.NO_HEALTHY_UPSTREAM) from None
    return OutboundPlan(source, destination, via_waypoint=waypoint,
                        waypoint_address=(address_of(waypoint), gateway.hbone_port))


def _reply_for_status(status: int | None) -> int:
    return socks5.CONNECTION_NOT_ALLOWED if status in (401, 403) else socks5.CONNECTION_REFUSED


class ClientReply(Protocol):
    """How an entry answers its client once the upstream is settled."""

    async def connected(self) -> bytes:
        """Tell the client the connection is up; returns bytes it already sent past its
        handshake (to be forwarded first)."""

    async def refused(self, refused: ProxyError) -> None:
        """Tell the client the connection cannot be made."""


class _Socks5Reply:
    def __init__(self, stream: SocketSide, protocol: socks5.Socks5ServerProtocol) -> None:
        self._stream = stream
        self._protocol = protocol

    async def connected(self) -> bytes:
        self._protocol.send_reply(socks5.SUCCEEDED)
        await self._stream.send_all(self._protocol.data_to_send())
        return self._protocol.trailing_data()

    async def refused(self, refused: ProxyError) -> None:
        self._protocol.send_reply(refused.reply_code)
        await self._stream.send_all(self._protocol.data_to_send())


class CapturedReply:
    """A captured client believes it is already connected: a refusal can only reset it
    (as Istio's ztunnel does), which the app sees as ECONNRESET instead of a clean EOF."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream

    async def connected(self) -> bytes:
        return b""

    async def refused(self, refused: ProxyError) -> None:
        reset_on_close(self._stream)


class Outbound:
    def __init__(self, inputs: ProxyInputs) -> None:
        config = inputs.config
        self._node = config.node
        self._connect_timeout = config.connect_timeout
        self._hbone_port = config.ports.hbone
        self._own = OwnEndpoints.of(config)
        self._state = inputs.state
        self._certs = inputs.certs
        self._pool = inputs.pool
        self._telemetry = inputs.telemetry
        self._connections = inputs.connections

    # -- entries --------------------------------------------------------------------------

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
        await self._serve(listeners, handler_nursery, self._handle_socks5)

    async def serve_captured(
        self,
        listeners: list[trio.SocketListener],
        source_uid: str,
        source_netns: Path,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve a pod's 15001 ``listeners`` (bound inside ``source_netns``, where iptables
        redirects the pod's outbound TCP) until cancelled; closes them on exit.

        Every connection comes from the pod ``source_uid``: the listener says so, whatever
        its source address.
        """
        async def handle(stream: trio.SocketStream) -> None:
            await self._handle_captured(stream, source_uid, source_netns)

        task_status.started()
        await self._serve(listeners, handler_nursery, handle)

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        handler_nursery: trio.Nursery,
        handle: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        await serve_tracked(listeners, handle, connections=self._connections,
                            handler_nursery=handler_nursery, what="outbound")

    async def _handle_socks5(self, stream: trio.SocketStream) -> None:
        peer_ip, peer_port = stream.socket.getpeername()[:2]
        protocol = socks5.Socks5ServerProtocol()
        # The handshake's few bytes go straight through the socket: trio's send and receive
        # each cost a scheduler round trip, four per connection here.
        side = SocketSide(stream)
        request = await self._socks5_request(side, protocol, f"{peer_ip}:{peer_port}")
        if request is None:
            return
        await self.forward(
            self._state.workload_by_address(peer_ip), request.host, request.port, stream,
            client_address=(peer_ip, peer_port), reply=_Socks5Reply(side, protocol),
        )

    async def _handle_captured(
        self, stream: trio.SocketStream, source_uid: str, source_netns: Path
    ) -> None:
        peer_ip, peer_port = stream.socket.getpeername()[:2]
        try:
            host, port = netns.original_destination(stream.socket)
        except (OSError, netns.NetnsError) as exc:
            log.warning("captured connection without an original destination",
                        pod=source_uid, peer=f"{peer_ip}:{peer_port}", reason=str(exc))
            reset_on_close(stream)
            return
        await self.forward(
            self._state.workload(source_uid), host, port, stream,
            client_address=(peer_ip, peer_port), reply=CapturedReply(stream),
            source_netns=source_netns,
        )

    async def _socks5_request(
        self, stream: SocketSide, protocol: socks5.Socks5ServerProtocol, peer: str
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

    # -- the shared path ------------------------------------------------------------------

    async def forward(
        self,
        source: Workload | None,
        host: str,
        port: int,
        client: trio.SocketStream,
        *,
        client_address: tuple[str, int],
        reply: ClientReply,
        source_netns: Path | None = None,
    ) -> None:
        """Carry ``client``'s connection from ``source`` to ``host:port``: plan it, open the
        upstream (HBONE or plain TCP; from inside ``source_netns`` with the bypass mark when
        the pod is captured), answer the client through ``reply`` and splice until both
        sides are done. Every outcome is reported to telemetry."""
        peer_ip, peer_port = client_address
        client_label = f"{peer_ip}:{peer_port}"
        record = ConnectionRecord(
            direction="outbound",
            source_address=client_label,
            destination_address=format_authority(host, port),
            source_workload=source,
        )
        try:
            plan = plan_outbound_from(self._state, source, node=self._node, caller=peer_ip,
                                      host=host, port=port, own=self._own)
            record.source_identity = identity_of(plan.source)
            # Through a waypoint we report the service the client addressed but the waypoint
            # as the destination workload and principal: that is the peer we connected to
            # and authenticated (the waypoint reports the hop to the real endpoint).
            record.destination_workload = plan.peer_workload
            record.destination_service = plan.destination.service
            record.destination_identity = plan.destination_identity
            record.mtls = plan.use_hbone
            upstream = await self._open_upstream(plan, client_label, source_netns)
        except ProxyError as error:
            self._telemetry.refused(record, reason=error.reason,
                                    response_flags=error.response_flags)
            await reply.refused(error)
            return
        async with upstream:
            early = await reply.connected()
            if early:
                await upstream.send_all(early)
            await self._telemetry.carry(record, client, upstream, already_sent=len(early))

    async def _open_upstream(
        self, plan: OutboundPlan, forwarded_for: str, source_netns: Path | None
    ) -> trio.abc.HalfCloseableStream:
        destination = plan.destination
        if not plan.use_hbone:
            ip, port = destination.address
            return await connect_upstream(ip, port, pod_netns=source_netns,
                                          timeout=self._connect_timeout)
        assert plan.destination_identity is not None
        source_identity = identity_of(plan.source)
        try:
            await self._certs.wait_for(source_identity, CERTIFICATE_WAIT)
        except (TimeoutError, KeyError) as exc:
            raise OutboundRefused(str(exc), reply_code=socks5.GENERAL_FAILURE) from None
        service = destination.service
        peer_ip, peer_port = plan.hbone_address(self._hbone_port)
        key = PoolKey(
            source_identity=source_identity,
            destination_identity=plan.destination_identity,
            source_ip=plan.source.addresses[0],
            destination_address=(peer_ip, peer_port),
            source_netns=str(source_netns) if source_netns is not None else None,
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
            raise UpstreamConnectError(
                f"HBONE CONNECT answered {exc.status}: {exc.reason}",
                reply_code=_reply_for_status(exc.status),
                response_flags=(ResponseFlag.UNAUTHORIZED if exc.status == 401
                                else ResponseFlag.UPSTREAM_CONNECT_FAILURE),
            ) from None
        except PeerIdentityError as exc:
            raise UpstreamConnectError(f"mTLS with {peer_ip}: {exc.reason}",
                                       reply_code=socks5.GENERAL_FAILURE) from None
        except (OSError, netns.NetnsError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectError(f"HBONE to {format_authority(peer_ip, peer_port)}: {exc}",
                                       reply_code=socks5.HOST_UNREACHABLE) from None
        return stream

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
