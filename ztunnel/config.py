"""ztunnel's configuration: one typed object built from command-line flags, once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ambient_common.flags import (
    add_control_plane_credentials,
    control_plane_credentials,
    duration_seconds,
    parse_duration,
    parse_host_port,
)
from ambient_common.logging import LogFormat

# none: the embedded mode (clients use SOCKS5 and PROXY headers, listeners on loopback pod
# addresses); inpod: transparent capture inside each local pod's network namespace (issue 5).
CaptureMode = Literal["none", "inpod"]

# Istio's ztunnel takes its drain deadline from the environment: CONNECTION_TERMINATION_DEADLINE
# (a duration), else the pod's TERMINATION_GRACE_PERIOD_SECONDS less a margin to end what is
# left before the kubelet's SIGKILL, else 5 s. --drain-timeout, when given, wins.
CONNECTION_TERMINATION_DEADLINE = "CONNECTION_TERMINATION_DEADLINE"
TERMINATION_GRACE_PERIOD_SECONDS = "TERMINATION_GRACE_PERIOD_SECONDS"
DEFAULT_DRAIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class Ports:
    admin: int = 15000
    metrics: int = 15020
    readiness: int = 15021
    hbone: int = 15008
    inbound_plaintext: int = 15006
    socks5: int = 15080
    outbound_capture: int = 15001


@dataclass(frozen=True)
class ZtunnelConfig:
    node: str
    node_address: str
    xds_address: tuple[str, int]
    root_cert: Path
    token: str
    # Re-read when it changes (a projected ServiceAccount token rotates); None: --token.
    token_file: Path | None = None
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    cluster_id: str = "Kubernetes"
    ports: Ports = Ports()
    requested_cert_ttl: float | None = None
    pool_idle_timeout: float = 300.0
    max_streams_per_connection: int = 100
    connect_timeout: float = 5.0
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    log_format: LogFormat = "auto"
    log_level: str = "info"
    capture: CaptureMode = "none"
    # inpod: the JSON file {pod uid: netns path} written by the CNI stand-in, polled.
    netns_map: Path | None = None
    netns_map_poll_interval: float = 0.5

    def __post_init__(self) -> None:
        if self.capture == "inpod" and self.netns_map is None:
            raise ValueError("capture mode inpod needs a netns map file (--netns-map)")


def drain_timeout_from_environment(environ: Mapping[str, str]) -> float:
    """The drain timeout as Istio's ztunnel derives it (seconds); ValueError names a bad
    variable. The grace period loses 5 s above 10 s and 1 s below, never going under 1 s."""
    if deadline := environ.get(CONNECTION_TERMINATION_DEADLINE):
        try:
            return parse_duration(deadline).total_seconds()
        except ValueError as exc:
            raise ValueError(f"{CONNECTION_TERMINATION_DEADLINE}={deadline!r}: {exc}") from None
    if grace := environ.get(TERMINATION_GRACE_PERIOD_SECONDS):
        if not grace.isdigit():
            raise ValueError(f"{TERMINATION_GRACE_PERIOD_SECONDS}={grace!r} is not a whole "
                             "number of seconds")
        seconds = int(grace)
        return float(max(seconds - 5 if seconds > 10 else seconds - 1, 1))
    return DEFAULT_DRAIN_TIMEOUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztunnel", description="ambient-lite's per-node L4 proxy (HBONE, mTLS, L4 policy)"
    )
    parser.add_argument("--node", required=True, help="this node's name (Node object)")
    parser.add_argument("--node-address", required=True,
                        help="address the node's own listeners bind (admin, metrics, SOCKS5)")
    parser.add_argument("--xds-address", type=parse_host_port, required=True,
                        help="istiod_lite's discovery and CA address, HOST:PORT")
    add_control_plane_credentials(parser, "this node's")
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--root-namespace", default="istio-system")
    parser.add_argument("--cluster-id", default="Kubernetes")
    parser.add_argument("--cert-ttl", type=duration_seconds, default=None,
                        help="certificate lifetime to ask the CA for (it may cap it)")
    parser.add_argument("--pool-idle-timeout", type=duration_seconds, default=300.0)
    parser.add_argument("--connect-timeout", type=duration_seconds, default=5.0)
    parser.add_argument("--drain-timeout", type=duration_seconds, default=None,
                        help="how long connections may finish on shutdown before they are "
                        "reset (default: from $CONNECTION_TERMINATION_DEADLINE or "
                        "$TERMINATION_GRACE_PERIOD_SECONDS as Istio's ztunnel, else 5s)")
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default="info")
    parser.add_argument("--capture", choices=["none", "inpod"], default="none",
                        help="inpod: capture local pods' traffic transparently inside their "
                        "network namespaces (root; needs --netns-map)")
    parser.add_argument("--netns-map", type=Path, default=None, metavar="FILE",
                        help='JSON {"<pod uid>": "<netns path>"} of the local pods, watched '
                        "(written by the CNI stand-in)")
    return parser


def config_from_args(
    argv: list[str] | None = None, environ: Mapping[str, str] = os.environ
) -> ZtunnelConfig:
    """The config from the command line; the environment only supplies the drain timeout's
    default, as Istio's ztunnel reads it (the one place ztunnel looks at it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    root_cert, token = control_plane_credentials(parser, args)
    drain_timeout = args.drain_timeout
    if drain_timeout is None:
        try:
            drain_timeout = drain_timeout_from_environment(environ)
        except ValueError as exc:
            parser.error(str(exc))
    if args.capture == "inpod" and args.netns_map is None:
        parser.error("--capture inpod needs --netns-map FILE")
    if args.capture == "none" and args.netns_map is not None:
        parser.error("--netns-map is only read with --capture inpod")
    return ZtunnelConfig(
        node=args.node,
        node_address=args.node_address,
        xds_address=args.xds_address,
        root_cert=root_cert,
        token=token,
        token_file=args.token_file,
        trust_domain=args.trust_domain,
        root_namespace=args.root_namespace,
        cluster_id=args.cluster_id,
        requested_cert_ttl=args.cert_ttl,
        pool_idle_timeout=args.pool_idle_timeout,
        connect_timeout=args.connect_timeout,
        drain_timeout=drain_timeout,
        log_format=args.log_format,
        log_level=args.log_level,
        capture=args.capture,
        netns_map=args.netns_map,
    )
