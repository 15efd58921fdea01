"""One access-log line per request, with the fields of Envoy's default access log that matter
here.
"""

from __future__ import annotations

import structlog


def access_log(
    *,
    method: str,
    authority: str,
    path: str,
    protocol: str,
    status: int,
    response_flags: str,
    duration_ms: float,
    request_bytes: int,
    response_bytes: int,
    upstream_host: str | None,
    source_principal: str | None,
    route_name: str | None,
    trace_id: str | None,
) -> None:
    """One line per request, the fields of Envoy's default access log that matter here."""
    structlog.get_logger("waypoint.access").info(
        "request complete",
        method=method,
        authority=authority,
        path=path,
        protocol=protocol,
        status=status,
        response_flags=response_flags or "-",
        duration_ms=round(duration_ms, 1),
        request_bytes=request_bytes,
        response_bytes=response_bytes,
        upstream_host=upstream_host,
        **{"src.identity": source_principal},
        route=route_name,
        trace_id=trace_id,
    )
