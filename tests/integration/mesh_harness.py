"""A real two-node mesh in one test process: istiod_lite, two ztunnels and the sample apps,
built from the demo topology in ``examples/demo`` with every address moved to fresh loopback
addresses so tests never collide. Nothing is faked: the ztunnels fetch certificates from the
CA and config from the discovery stream over TLS, exactly as the processes do.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ambient_api.identity import SpiffeId
from ambientctl.apps import serve_http_echo, serve_tcp_echo, socks5_connect
from ambientctl.embedded.layout import MeshLayout, layout_from_objects
from istiod_lite.__main__ import RunningIstiod, run_istiod
from istiod_lite.ca import CertificateAuthority
from istiod_lite.config import IstiodConfig
from istiod_lite.csr import check_csr
from tests.pki import IssuedCert, new_key_and_csr
from waypoint.config import WaypointConfig
from waypoint.proxy import Waypoint
from ztunnel.config import ZtunnelConfig
from ztunnel.proxy import Ztunnel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"
_DEMO_ADDRESS = re.compile(r"127\.0\.(?:10|20|30|40)\.\d+")

# The demo topology's addresses (the names tests use) -> role.
NODE_1, NODE_2 = "127.0.10.1", "127.0.10.2"
SLEEP, NOTSLEEP, HTTPBIN_V1, HTTPBIN_V2, LEGACY = (
    "127.0.20.1", "127.0.20.2", "127.0.20.3", "127.0.20.4", "127.0.20.5",
)
HTTPBIN_VIP, ECHO_VIP = "127.0.30.1", "127.0.30.2"
HTTP_PORT, ECHO_PORT = 8000, 9000
# The waypoint act (examples/demo/5x-*.yaml): services behind the waypoint on port 9080.
WAYPOINT = "127.0.40.1"
REVIEWS_VIP, RATINGS_VIP, DETAILS_VIP = "127.0.30.3", "127.0.30.7", "127.0.30.8"
BOOKINFO_PORT = 9080
BOOKINFO_APPS = (  # pod address, pod name, fail every N-th request (0: never)
    ("127.0.20.6", "reviews-v1", 0),
    ("127.0.20.7", "reviews-v2", 0),
    ("127.0.20.8", "reviews-shadow", 0),
    ("127.0.20.9", "ratings-v1", 2),
    ("127.0.20.10", "details-v1", 0),
)
WAYPOINT_PRINCIPAL = "serviceaccount:demo/waypoint"


def moved_demo_addresses(config_dir: Path, new: Callable[[], str]) -> dict[str, str]:
    """A fresh address (``new()``) for every demo address the config directory's YAML uses."""
    addresses: dict[str, str] = {}
    for source in sorted(config_dir.glob("*.yaml")):
        for found in _DEMO_ADDRESS.findall(source.read_text()):
            addresses.setdefault(found, new())
    return addresses


def rewrite_demo_addresses(text: str, addresses: Mapping[str, str]) -> str:
    """``text`` with each demo address replaced by its moved one."""
    return _DEMO_ADDRESS.sub(lambda m: addresses[m.group(0)], text)


@dataclass
class Mesh:
    root: Path
    istiod_address: str
    addresses: dict[str, str]  # demo address -> this test's address
    tokens: dict[str, str]
    cert_ttl: timedelta
    istiod: RunningIstiod | None = None
    ztunnels: dict[str, Ztunnel] = field(default_factory=dict)
    waypoint: Waypoint | None = None
    _istiod_scope: trio.CancelScope | None = None
    _istiod_done: trio.Event | None = None

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    def addr(self, demo_address: str) -> str:
        return self.addresses[demo_address]

    def rewrite(self, text: str) -> str:
        return rewrite_demo_addresses(text, self.addresses)

    def write_config_file(self, name: str, text: str) -> Path:
        """Write a YAML file into the watched config directory (demo addresses rewritten)."""
        path = self.config_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(self.rewrite(text))
        tmp.rename(path)
        return path

    # -- istiod ---------------------------------------------------------------------------

    def istiod_config(self) -> IstiodConfig:
        return IstiodConfig(
            config_dir=self.config_dir,
            state_dir=self.root / "istiod",
            bootstrap_tokens=self.root / "tokens.yaml",
            listen_host=self.istiod_address,
            cert_ttl=self.cert_ttl,
            poll_interval=0.1,
            log_format="json",
        )

    async def start_istiod(self, nursery: trio.Nursery) -> None:
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(*, task_status: trio.TaskStatus[RunningIstiod]) -> None:
            try:
                with scope:
                    await run_istiod(self.istiod_config(), task_status=task_status)
            finally:
                done.set()

        self._istiod_scope, self._istiod_done = scope, done
        self.istiod = await nursery.start(run)

    async def stop_istiod(self) -> None:
        assert self.istiod is not None and self._istiod_done is not None
        self.istiod.shutdown()
        with trio.move_on_after(10):
            await self._istiod_done.wait()
        if not self._istiod_done.is_set() and self._istiod_scope is not None:
            self._istiod_scope.cancel()
            await self._istiod_done.wait()
        self.istiod = None

    # -- ztunnels and apps ----------------------------------------------------------------

    def ztunnel_config(self, node: str, node_address: str) -> ZtunnelConfig:
        return ZtunnelConfig(
            node=node,
            node_address=node_address,
            xds_address=(self.istiod_address, 15012),
            root_cert=self.root / "istiod" / "root-cert.pem",
            token=self.tokens[node],
            connect_timeout=2.0,
            drain_timeout=2.0,
            log_format="json",
        )

    async def start_ztunnel(self, nursery: trio.Nursery, node: str, demo_address: str) -> Ztunnel:
        ztunnel = Ztunnel(self.ztunnel_config(node, self.addr(demo_address)))
        await nursery.start(ztunnel.run)
        self.ztunnels[node] = ztunnel
        return ztunnel

    async def start_waypoint(self, nursery: trio.Nursery) -> Waypoint:
        """The demo's waypoint (Gateway demo/waypoint) in-process, as its own identity."""
        waypoint = Waypoint(WaypointConfig(
            name="waypoint", namespace="demo", address=self.addr(WAYPOINT),
            xds_address=(self.istiod_address, 15012),
            root_cert=self.root / "istiod" / "root-cert.pem",
            token=self.tokens[WAYPOINT_PRINCIPAL], connect_timeout=2.0, drain_timeout=2.0,
            log_format="json",
        ))
        await nursery.start(waypoint.run)
        self.waypoint = waypoint
        return waypoint

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Until every ztunnel (and the waypoint, if started) answers 200 on
        /healthz/ready (config synced, certificates held)."""
        addresses = [z.config.node_address for z in self.ztunnels.values()]
        if self.waypoint is not None:
            addresses.append(self.waypoint.config.address)
        with trio.fail_after(timeout):
            async with httpx.AsyncClient() as client:
                for address in addresses:
                    url = f"http://{address}:15021/healthz/ready"
                    while True:
                        try:
                            if (await client.get(url)).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await trio.sleep(0.05)

    async def connect(self, source: str, host: str, port: int) -> trio.SocketStream:
        """A SOCKS5 connection from the pod at demo address ``source`` via its node's
        ztunnel (node-1 hosts sleep, notsleep and legacy in the demo)."""
        target = self.addresses.get(host, host)
        return await socks5_connect(
            self.addr(NODE_1), 15080, target, port, source_address=self.addr(source)
        )


async def start_mesh(
    nursery: trio.Nursery,
    root: Path,
    loopback: object,
    *,
    cert_ttl: timedelta = timedelta(hours=1),
    with_waypoint: bool = False,
) -> Mesh:
    """Start istiod, both ztunnels and the httpbin apps (HTTP on 8000, TCP echo on 9000)."""
    new = loopback.new  # type: ignore[attr-defined]
    config_dir = root / "config"
    config_dir.mkdir(parents=True)
    addresses = moved_demo_addresses(EXAMPLES, new)
    tokens = {
        principal: secrets.token_urlsafe(16)
        for principal in ("node-1", "node-2", WAYPOINT_PRINCIPAL)
    }
    (root / "tokens.yaml").write_text("".join(f"{n}: {t}\n" for n, t in tokens.items()))
    mesh = Mesh(root, new(), addresses, tokens, cert_ttl)
    for source in sorted(EXAMPLES.glob("*.yaml")):
        mesh.write_config_file(source.name, source.read_text())

    for demo_ip, name in ((HTTPBIN_V1, "httpbin-v1"), (HTTPBIN_V2, "httpbin-v2")):
        await nursery.start(serve_http_echo, mesh.addr(demo_ip), HTTP_PORT, name)
        await nursery.start(serve_tcp_echo, mesh.addr(demo_ip), ECHO_PORT)
    for demo_ip, name, fail_every in BOOKINFO_APPS:
        await nursery.start(partial(serve_http_echo, fail_every=fail_every),
                            mesh.addr(demo_ip), BOOKINFO_PORT, name)
    await mesh.start_istiod(nursery)
    await mesh.start_ztunnel(nursery, "node-1", NODE_1)
    await mesh.start_ztunnel(nursery, "node-2", NODE_2)
    if with_waypoint:
        await mesh.start_waypoint(nursery)
    await mesh.wait_ready()
    return mesh


# -- helpers for tests that bring their own peers (Envoy interop) -----------------------------


def mesh_ca(mesh: Mesh) -> CertificateAuthority:
    """The running mesh's CA, loaded from istiod's plug-in directory, so a test can hand a
    foreign peer (Envoy) certificates the ztunnels trust exactly as they trust each other."""
    return CertificateAuthority.from_plugin_dir(mesh.root / "istiod" / "ca")


def issue_mesh_certificate(mesh: Mesh, namespace: str, service_account: str) -> IssuedCert:
    """A certificate for spiffe://cluster.local/ns/<namespace>/sa/<service_account> signed by
    the mesh CA through a real CSR, as a ztunnel would get it."""
    identity = SpiffeId("cluster.local", namespace, service_account)
    key, csr_pem = new_key_and_csr(str(identity))
    chain = mesh_ca(mesh).sign_csr(check_csr(csr_pem))
    return IssuedCert(
        identity=identity,
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii"),
        chain_pem=chain,
        cert=x509.load_pem_x509_certificate(chain[0].encode("ascii")),
    )


async def fetch_metrics(mesh: Mesh, demo_node: str) -> str:
    """The Prometheus text of a node's ztunnel (15020 /metrics)."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{mesh.addr(demo_node)}:15020/metrics")
    response.raise_for_status()
    return response.text


def metric_samples(text: str, metric: str, **labels: str) -> list[float]:
    """Values of ``metric`` samples whose labels include every ``labels`` pair."""
    wanted = [f'{name}="{value}"' for name, value in labels.items()]
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(metric + "{") and all(label in line for label in wanted)
    ]


async def wait_for_workload(
    mesh: Mesh, demo_node: str, workload_name: str, timeout: float = 10.0
) -> None:
    """Until the node's ztunnel lists ``workload_name`` in its /config_dump (config pushed)."""
    url = f"http://{mesh.addr(demo_node)}:15000/config_dump"
    with trio.fail_after(timeout):
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    dump = (await client.get(url)).json()
                    if any(w.get("name") == workload_name for w in dump.get("workloads", [])):
                        return
                except (httpx.TransportError, ValueError):
                    pass
                await trio.sleep(0.1)


# -- helpers for tests that add services, pods and L7 config live -----------------------------


async def config_dump(address: str) -> dict[str, Any]:
    """The /config_dump of the ztunnel or waypoint whose admin listens on ``address``."""
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"http://{address}:15000/config_dump")
    response.raise_for_status()
    dump: dict[str, Any] = response.json()
    return dump


async def fetch_waypoint_metrics(mesh: Mesh) -> str:
    """The Prometheus text of the running waypoint (15020 /metrics)."""
    assert mesh.waypoint is not None, "no waypoint started"
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"http://{mesh.waypoint.config.address}:15020/metrics")
    response.raise_for_status()
    return response.text


async def start_pod_apps(mesh: Mesh, nursery: trio.Nursery, yaml_text: str) -> MeshLayout:
    """Start the sample apps of the Pods in ``yaml_text`` exactly as ``ambientctl up`` would
    choose them (``layout_from_objects``: HTTP or TCP echo per container port, the
    ``ambient-lite.io/fail-every`` annotation), before their config is written."""
    text = mesh.rewrite(yaml_text)
    objects = [("test", doc) for doc in yaml.safe_load_all(text) if doc]
    layout = layout_from_objects(objects)
    for app in layout.apps:
        if app.kind == "http":
            await nursery.start(partial(serve_http_echo, fail_every=app.fail_every),
                                app.address, app.port, app.pod)
        else:
            await nursery.start(serve_tcp_echo, app.address, app.port)
    return layout


async def wait_for_config(
    mesh: Mesh,
    *,
    l7: Mapping[str, Iterable[str]] | None = None,
    services: Iterable[str] = (),
    workloads: Iterable[str] = (),
    listening: Iterable[str] = (),
    timeout: float = 10.0,
) -> None:
    """Until config written live has reached the data plane: the waypoint's /config_dump
    lists the ``l7`` resources (kind -> names, e.g. ``{"httproute": ["reviews-extra"]}``);
    every ztunnel and the waypoint list the ``services`` and ``workloads`` (by name); and
    each ``listening`` pod IP accepts connections on 15008 (its ztunnel's inbound)."""
    wanted_l7 = {kind: set(names) for kind, names in (l7 or {}).items()}
    wanted_services, wanted_workloads = set(services), set(workloads)
    addresses = [z.config.node_address for z in mesh.ztunnels.values()]
    if mesh.waypoint is not None:
        addresses.append(mesh.waypoint.config.address)
    elif wanted_l7:
        raise ValueError("L7 config can only be awaited with a waypoint running")

    def has_everything(dump: dict[str, Any], *, is_waypoint: bool) -> bool:
        names = {s.get("name") for s in dump.get("services", [])}
        pods = {w.get("name") for w in dump.get("workloads", [])}
        if not wanted_services <= names or not wanted_workloads <= pods:
            return False
        if is_waypoint:
            l7_dump = dump.get("l7", {})
            return all(
                names_wanted <= {r.get("name") for r in l7_dump.get(kind, [])}
                for kind, names_wanted in wanted_l7.items()
            )
        return True

    with trio.fail_after(timeout):
        for address in addresses:
            is_waypoint = mesh.waypoint is not None and address == mesh.waypoint.config.address
            while True:
                try:
                    if has_everything(await config_dump(address), is_waypoint=is_waypoint):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                await trio.sleep(0.05)
        for pod_ip in listening:
            while True:
                try:
                    stream = await trio.open_tcp_stream(pod_ip, 15008)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break


async def start_waypoint_with(
    mesh: Mesh, nursery: trio.Nursery, **overrides: Any
) -> Waypoint:
    """The demo's waypoint like ``Mesh.start_waypoint``, with ``WaypointConfig`` fields
    overridden (e.g. ``otlp_endpoint``); start the mesh ``with_waypoint=False`` first."""
    config = WaypointConfig(
        name="waypoint", namespace="demo", address=mesh.addr(WAYPOINT),
        xds_address=(mesh.istiod_address, 15012),
        root_cert=mesh.root / "istiod" / "root-cert.pem",
        token=mesh.tokens[WAYPOINT_PRINCIPAL], connect_timeout=2.0, drain_timeout=2.0,
        log_format="json",
    )
    waypoint = Waypoint(dataclasses.replace(config, **overrides))
    await nursery.start(waypoint.run)
    mesh.waypoint = waypoint
    await mesh.wait_ready()
    return waypoint
