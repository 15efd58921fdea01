"""Why ztunnel refuses or cannot carry a connection, and what each side is told.

One hierarchy for both directions, each error carrying its answer as h11's errors carry
``error_status_hint``: ``status_hint`` is the HTTP status an inbound HBONE CONNECT is
answered with, ``reply_code`` the SOCKS5 reply an outbound client gets (a captured client,
which believes it is connected already, is reset instead) and ``response_flags`` the Envoy
flags telemetry reports. The entries catch ``ProxyError`` and answer from its fields.
"""

from __future__ import annotations

from ambient_dataplane.hbone import HboneRejection
from ambient_dataplane.labels import NO_RESPONSE_FLAGS, ResponseFlag
from ztunnel import socks5


class ProxyError(Exception):
    """A connection ztunnel does not carry; ``reason`` goes to the access log (and, inbound,
    to the CONNECT response's reason header)."""

    def __init__(
        self,
        reason: str,
        *,
        status_hint: int = 503,
        reply_code: int = socks5.GENERAL_FAILURE,
        response_flags: str = NO_RESPONSE_FLAGS,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_hint = status_hint
        self.reply_code = reply_code
        self.response_flags = response_flags


class InboundRefused(ProxyError):
    """ztunnel's decision not to admit an inbound connection: not a workload it serves, a
    proxy port, not in the mesh, denied by policy, no original destination."""

    @classmethod
    def from_rejection(cls, rejection: HboneRejection) -> InboundRefused:
        """``decide_inbound``'s answer, reported as UAEX when policy denied it (401)."""
        flags = ResponseFlag.UNAUTHORIZED if rejection.status == 401 else NO_RESPONSE_FLAGS
        return cls(rejection.reason, status_hint=rejection.status, response_flags=flags)


class OutboundRefused(ProxyError):
    """ztunnel's decision not to carry an outbound connection: the source is not one of its
    workloads, the destination is unknown or a proxy port, the waypoint or the source's
    certificate is missing."""


class UpstreamConnectError(ProxyError):
    """The connection towards the destination could not be opened: TCP to the app (inbound)
    or to a destination outside the mesh, or HBONE to the peer (outbound)."""

    def __init__(
        self,
        reason: str,
        *,
        reply_code: int,
        response_flags: str = ResponseFlag.UPSTREAM_CONNECT_FAILURE,
    ) -> None:
        super().__init__(reason, status_hint=503, reply_code=reply_code,
                         response_flags=response_flags)
