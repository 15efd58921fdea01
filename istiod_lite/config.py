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

from ambient_common.flags import parse_duration
from ambient_common.logging import LogFormat
from istiod_lite.api.discovery import DEFAULT_DISCOVERY_PORT

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
class IstiodConfig:
    config_dir: Path
    state_dir: Path
    bootstrap_tokens: Path
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
        if self.cert_ttl > self.max_cert_ttl:
            raise ValueError(
                f"--cert-ttl ({self.cert_ttl}) is longer than --max-cert-ttl ({self.max_cert_ttl})"
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
        "--config-dir", type=Path, required=True, metavar="DIR",
        help="directory of Kubernetes YAML (Namespaces, Pods, Services, ...) to serve",
    )
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
        "--bootstrap-tokens", type=Path, required=True, metavar="FILE",
        help="YAML/JSON mapping of node name to bearer token",
    )
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--cluster-id", default="Kubernetes")
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
    try:
        return IstiodConfig(
            config_dir=args.config_dir,
            state_dir=args.state_dir,
            bootstrap_tokens=args.bootstrap_tokens,
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
