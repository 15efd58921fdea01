"""The waypoint's configuration: one typed object built from command-line flags, once.

A waypoint is one process serving one waypoint ``Gateway`` (``--namespace``/``--name``) with
one identity (``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``, the account
defaulting to the Gateway's name as Istio names a waypoint's account). All its listeners bind
its own address: HBONE 15008, admin 15000, metrics 15020, readiness 15021.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ambient_common.flags import (
    add_control_plane_credentials,
    control_plane_credentials,
    duration_seconds,
    parse_host_port,
)
from ambient_common.logging import LogFormat
from waypoint.http.messages import HttpLimits
from waypoint.paths import PathNormalization

DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
# The HTTP servers' own defaults (waypoint.http.messages.HttpLimits says how they differ
# from Envoy's).
DEFAULT_REQUEST_HEADERS_TIMEOUT = HttpLimits.header_timeout
DEFAULT_IDLE_TIMEOUT = HttpLimits.idle_timeout
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Kubernetes names: a namespace is a DNS label, other objects (Gateway, ServiceAccount) DNS
# subdomains. Checked here because they end up in SPIFFE ids and in istiod's principals.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class WaypointPorts:
    hbone: int = 15008
    admin: int = 15000
    metrics: int = 15020
    readiness: int = 15021


@dataclass(frozen=True)
class WaypointConfig:
    name: str
    namespace: str
    address: str
    xds_address: tuple[str, int]
    root_cert: Path
    token: str
    # Re-read when it changes (a projected ServiceAccount token rotates); None: --token.
    token_file: Path | None = None
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    root_namespace: str = "istio-system"
    # Empty means "the Gateway's name" (Istio's waypoint account); resolved at construction.
    service_account: str = ""
    otlp_endpoint: str | None = None
    connect_timeout: float = 5.0
    drain_timeout: float = 5.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    path_normalization: PathNormalization = PathNormalization.BASE
    request_headers_timeout: float = DEFAULT_REQUEST_HEADERS_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    log_format: LogFormat = "auto"
    log_level: str = "info"
    ports: WaypointPorts = field(default_factory=WaypointPorts)

    def __post_init__(self) -> None:
        if not self.service_account:
            object.__setattr__(self, "service_account", self.name)

    @property
    def spiffe_uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def dns_label(text: str) -> str:
    """An argparse ``type``: a Kubernetes namespace name."""
    if not _DNS_LABEL.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid namespace name (lower-case letters, digits and '-', "
            "at most 63, starting and ending with a letter or digit)"
        )
    return text


def dns_subdomain(text: str) -> str:
    """An argparse ``type``: a Kubernetes object name (Gateway, ServiceAccount)."""
    if len(text) > 253 or not _DNS_SUBDOMAIN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid object name (lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit)"
        )
    return text


def ip_address(text: str) -> str:
    """An argparse ``type``: one IPv4/IPv6 address (no port, no hostname), normalised."""
    try:
        return str(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def otlp_endpoint(text: str) -> str:
    """An argparse ``type``: an http(s) URL of an OTLP/HTTP collector."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(
            f"--otlp-endpoint must be an http:// or https:// URL with a host, not {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waypoint",
        description="ambient-lite's waypoint: the L7 proxy of one istio-waypoint Gateway",
    )
    parser.add_argument(
        "--name", type=dns_subdomain, required=True, help="the waypoint Gateway's name"
    )
    parser.add_argument(
        "--namespace", type=dns_label, required=True, help="the waypoint Gateway's namespace"
    )
    parser.add_argument(
        "--address",
        type=ip_address,
        required=True,
        help="the waypoint's own IP: HBONE 15008, admin 15000, metrics 15020 "
        "and readiness 15021 bind there",
    )
    parser.add_argument(
        "--xds-address",
        type=parse_host_port,
        required=True,
        help="istiod_lite's discovery and CA address, HOST:PORT",
    )
    add_control_plane_credentials(parser, "this waypoint's")
    parser.add_argument(
        "--service-account",
        type=dns_subdomain,
        default=None,
        help="the identity's service account (default: the Gateway's name)",
    )
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--cluster-id", default="Kubernetes")
    parser.add_argument("--root-namespace", type=dns_label, default="istio-system")
    parser.add_argument(
        "--otlp-endpoint",
        type=otlp_endpoint,
        default=None,
        metavar="URL",
        help="export a span per request over OTLP/HTTP to this collector",
    )
    parser.add_argument(
        "--connect-timeout",
        type=duration_seconds,
        default=5.0,
        help="upstream HBONE connect timeout (default 5s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=duration_seconds,
        default=5.0,
        help="how long in-flight requests may finish on shutdown (default 5s)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES",
        help="largest request body buffered (413 beyond; default 10 MiB)",
    )
    parser.add_argument(
        "--path-normalization",
        choices=[mode.value for mode in PathNormalization],
        default=PathNormalization.BASE.value,
        help="Istio's meshConfig.pathNormalization for request paths (default BASE)",
    )
    parser.add_argument(
        "--request-headers-timeout",
        type=duration_seconds,
        default=DEFAULT_REQUEST_HEADERS_TIMEOUT,
        help="from a request's first byte to the end of its head (HTTP/1.1: 408 and close; "
        "HTTP/2: the connection is closed); Envoy's request_headers_timeout (default 10s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=duration_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        help="how long a connection may carry no request (and a request's body or answer "
        "may stall) before it is closed (default 5m)",
    )
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> WaypointConfig:
    """Parse ``argv``; a bad flag exits 2 with argparse's message naming it."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    root_cert, token = control_plane_credentials(parser, args)
    return WaypointConfig(
        name=args.name,
        namespace=args.namespace,
        address=args.address,
        xds_address=args.xds_address,
        root_cert=root_cert,
        token=token,
        token_file=args.token_file,
        trust_domain=args.trust_domain,
        cluster_id=args.cluster_id,
        root_namespace=args.root_namespace,
        service_account=args.service_account or "",
        otlp_endpoint=args.otlp_endpoint,
        connect_timeout=args.connect_timeout,
        drain_timeout=args.drain_timeout,
        max_request_bytes=args.max_request_bytes,
        path_normalization=PathNormalization(args.path_normalization),
        request_headers_timeout=args.request_headers_timeout,
        idle_timeout=args.idle_timeout,
        log_format=args.log_format,
        log_level=args.log_level,
    )
