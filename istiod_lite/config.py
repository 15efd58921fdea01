"""istiod_lite's configuration: a typed object built from command-line flags only (no module
reads the environment)."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar, get_args

from ambient_api.discovery import DEFAULT_DISCOVERY_PORT
from ambient_common.flags import parse_duration
from ambient_common.logging import LogFormat
from istiod_lite.translate.mesh import MeshConfig

T = TypeVar("T")

DEFAULT_LISTEN = f"127.0.9.1:{DEFAULT_DISCOVERY_PORT}"
LOG_LEVELS = ("debug", "info", "warning", "error")

def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port). HOST must be an IP address:
    it also becomes the serving certificate's IP SAN."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


@dataclass(frozen=True)
class KubernetesMode:
    """Where the cluster is and how istiod_lite behaves in it (``--kubernetes``)."""

    kubeconfig: Path | None = None  # None: the pod's in-cluster configuration
    context: str | None = None
    namespace: str = "istio-system"  # istiod's own: CA Secrets, Lease; the root namespace
    pod_name: str = "istiod"  # the leader-election identity
    token_audiences: tuple[str, ...] = ("istio-ca",)
    trusted_node_accounts: frozenset[str] = frozenset({"istio-system/ztunnel"})
    waypoint_image: str | None = None  # None: the waypoint controller does not run
    leader_election: bool = True


@dataclass(frozen=True)
class IstiodConfig:
    state_dir: Path
    # Exactly one source: a directory of YAML (the embedded mode) or a Kubernetes cluster.
    config_dir: Path | None = None
    bootstrap_tokens: Path | None = None
    kubernetes: KubernetesMode | None = None
    listen_host: str = "127.0.9.1"
    listen_port: int = DEFAULT_DISCOVERY_PORT
    ca_plugin_dir: Path | None = None
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    network: str = ""
    cert_ttl: timedelta = timedelta(hours=24)
    max_cert_ttl: timedelta = timedelta(days=90)
    log_format: LogFormat = "auto"
    log_level: str = "info"
    poll_interval: float = 0.5

    def __post_init__(self) -> None:
        if (self.config_dir is None) == (self.kubernetes is None):
            raise ValueError("give exactly one source: --config-dir DIR or --kubernetes")
        if self.config_dir is not None and self.bootstrap_tokens is None:
            raise ValueError("--config-dir needs --bootstrap-tokens (how proxies authenticate)")
        if self.cert_ttl > self.max_cert_ttl:
            raise ValueError(
                f"--cert-ttl ({self.cert_ttl}) is longer than --max-cert-ttl ({self.max_cert_ttl})"
            )

    @property
    def root_namespace(self) -> str:
        """Istio's ``rootNamespace`` (policies there apply mesh-wide), which Istio defaults to
        istiod's own namespace: ``--pod-namespace`` in Kubernetes mode. The embedded mode
        runs in no namespace and keeps Istio's usual ``istio-system``."""
        return self.kubernetes.namespace if self.kubernetes else "istio-system"

    @property
    def mesh(self) -> MeshConfig:
        """What the translation needs of this configuration."""
        return MeshConfig(
            trust_domain=self.trust_domain,
            cluster_id=self.cluster_id,
            network=self.network,
            root_namespace=self.root_namespace,
        )

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


def _argparse_type(parse: Callable[[str], T], what: str) -> Callable[[str], T]:
    """Wrap a parser so argparse reports its ValueError text (not a generic message)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = what
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m istiod_lite",
        description="istiod_lite: the ambient-lite control plane (workload discovery + mesh CA).",
    )
    parser.add_argument(
        "--config-dir", type=Path, default=None, metavar="DIR",
        help="the embedded mode: a directory of Kubernetes YAML (Namespaces, Pods, Services, "
        "...) to serve",
    )
    kube = parser.add_argument_group("Kubernetes mode")
    kube.add_argument(
        "--kubernetes", action="store_true",
        help="watch a Kubernetes cluster instead of --config-dir; proxies authenticate with "
        "ServiceAccount tokens (TokenReview), the CA lives in Secrets",
    )
    kube.add_argument("--kubeconfig", type=Path, default=None, metavar="FILE",
                      help="kubeconfig to use (default: the pod's in-cluster configuration)")
    kube.add_argument("--context", default=None, help="kubeconfig context (with --kubeconfig)")
    kube.add_argument(
        "--pod-namespace", default="istio-system",
        help="istiod_lite's namespace (Istio's POD_NAMESPACE): CA Secrets and the leader Lease "
        "live there, and it is the mesh's root namespace (Istio's rootNamespace default): "
        "policies in it apply to every namespace",
    )
    kube.add_argument("--pod-name", default="istiod",
                      help="this replica's name, its identity in leader election")
    kube.add_argument(
        "--trusted-node-accounts", default="istio-system/ztunnel", metavar="NS/SA,...",
        help="service accounts allowed to act for the node of their pod (Istio's "
        "CA_TRUSTED_NODE_ACCOUNTS)",
    )
    kube.add_argument("--token-audience", action="append", default=None, metavar="AUD",
                      help="audience proxies' tokens must be bound to (default istio-ca)")
    kube.add_argument("--waypoint-image", default=None, metavar="IMAGE",
                      help="run the waypoint controller, deploying waypoints with this image")
    kube.add_argument("--no-leader-election", action="store_true",
                      help="act as the leader without a Lease (one replica only)")
    parser.add_argument(
        "--listen", type=_argparse_type(parse_listen, "HOST:PORT"), default=DEFAULT_LISTEN,
        metavar="HOST:PORT", help=f"HTTP/2 TLS listen address (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--state-dir", type=Path, required=True, metavar="DIR",
        help="where the self-signed CA, the serving certificate and the published "
        "root-cert.pem live",
    )
    parser.add_argument(
        "--ca-plugin-dir", type=Path, default=None, metavar="DIR",
        help="use Istio plug-in CA files (ca-cert.pem, ca-key.pem, root-cert.pem, "
        "cert-chain.pem) instead of a self-signed root",
    )
    parser.add_argument(
        "--bootstrap-tokens", type=Path, default=None, metavar="FILE",
        help="the embedded mode: YAML/JSON mapping of principal (node name, or "
        "serviceaccount:NS/SA) to bearer token",
    )
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument(
        "--cluster-id", default="Kubernetes",
        help="this cluster's name in the mesh: part of every workload's uid and the "
        "source_cluster/destination_cluster of the proxies' metrics (default Kubernetes)",
    )
    parser.add_argument("--network", default="")
    parser.add_argument(
        "--cert-ttl", type=_argparse_type(parse_duration, "duration"), default=timedelta(hours=24),
        metavar="DURATION", help="default workload certificate lifetime (e.g. 24h, 90s)",
    )
    parser.add_argument(
        "--max-cert-ttl", type=_argparse_type(parse_duration, "duration"),
        default=timedelta(days=90), metavar="DURATION",
        help="longest lifetime a proxy may ask for (default 90d)",
    )
    parser.add_argument(
        "--poll-interval", type=_argparse_type(parse_duration, "duration"),
        default=timedelta(milliseconds=500), metavar="DURATION",
        help="how often the config directory is checked for changes (default 500ms)",
    )
    parser.add_argument("--log-format", choices=get_args(LogFormat), default="auto")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> IstiodConfig:
    """Build the config from flags; bad or unknown flags exit with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    host, port = args.listen
    kubernetes = None
    if args.kubernetes:
        accounts = frozenset(a.strip() for a in args.trusted_node_accounts.split(",") if a.strip())
        if any(account.count("/") != 1 for account in accounts):
            parser.error(f"--trusted-node-accounts {args.trusted_node_accounts!r}: "
                         "expected NAMESPACE/SERVICEACCOUNT entries separated by commas")
        kubernetes = KubernetesMode(
            kubeconfig=args.kubeconfig,
            context=args.context,
            namespace=args.pod_namespace,
            pod_name=args.pod_name,
            token_audiences=tuple(args.token_audience or ("istio-ca",)),
            trusted_node_accounts=accounts,
            waypoint_image=args.waypoint_image,
            leader_election=not args.no_leader_election,
        )
    elif args.kubeconfig or args.context or args.waypoint_image:
        parser.error("--kubeconfig, --context and --waypoint-image need --kubernetes")
    try:
        return IstiodConfig(
            config_dir=args.config_dir,
            state_dir=args.state_dir,
            bootstrap_tokens=args.bootstrap_tokens,
            kubernetes=kubernetes,
            listen_host=host,
            listen_port=port,
            ca_plugin_dir=args.ca_plugin_dir,
            trust_domain=args.trust_domain,
            cluster_id=args.cluster_id,
            network=args.network,
            cert_ttl=args.cert_ttl,
            max_cert_ttl=args.max_cert_ttl,
            log_format=args.log_format,
            log_level=args.log_level,
            poll_interval=args.poll_interval.total_seconds(),
        )
    except ValueError as error:
        parser.error(str(error))
