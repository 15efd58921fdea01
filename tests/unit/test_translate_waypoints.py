"""Waypoint Gateways -> Service + Workload, and which objects get a waypoint (issue 3)."""

from __future__ import annotations

import textwrap
from collections.abc import MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from ambient_api.model import (
    GatewayAddress,
    Locality,
    NetworkAddress,
    PortMapping,
    Resource,
    Service,
    TunnelProtocol,
    Workload,
    resource_key,
)
from istiod_lite.sources.objects import ClusterObjects, InvalidObject
from istiod_lite.sources.validation import parse_documents
from istiod_lite.translate import MeshConfig, translate
from istiod_lite.translate.waypoints import waypoint_for, waypoint_gateway, waypoint_resources

# `istioctl waypoint generate` / the Istio docs, with the address the embedded mode needs.
CANONICAL_WAYPOINT = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  labels:
    istio.io/waypoint-for: service
  name: waypoint
  namespace: demo
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"""
ADDRESSES = "  addresses:\n  - {type: IPAddress, value: 127.0.40.1}\n"
AMBIENT_NS = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
"""
WAYPOINT_KEY = "demo/waypoint.demo.svc.cluster.local"


def objects(*documents: str) -> ClusterObjects:
    text = "\n---\n".join(textwrap.dedent(d) for d in documents)
    parsed = parse_documents(text, "test.yaml")
    assert parsed.warnings == ()
    return ClusterObjects.from_objects(parsed.objects)


def gateway(
    name: str = "waypoint",
    namespace: str = "demo",
    labels: str = "{}",
    annotations: str = "{}",
    spec: str = "gatewayClassName: istio-waypoint\n"
    "listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n"
    "addresses: [{type: IPAddress, value: 127.0.40.1}]",
) -> str:
    return (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        f"metadata: {{name: {name}, namespace: {namespace}, labels: {labels}, "
        f"annotations: {annotations}}}\nspec:\n" + textwrap.indent(spec, "  ")
    )


def pod(name: str, ip: str, labels: str = "{}", namespace: str = "demo") -> str:
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, "
        f"labels: {labels}}}\nspec: {{nodeName: node-1, containers: [{{name: c, image: i}}]}}\n"
        f"status: {{podIP: {ip}}}"
    )


def service(name: str, labels: str = "{}", namespace: str = "demo", selector: str = "{}") -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}, "
        f"labels: {labels}}}\nspec: {{clusterIP: 10.0.1.{len(name)}, selector: {selector}, "
        "ports: [{port: 80}]}"
    )


def by_key(resources: list[Resource], cls: type) -> dict[str, Any]:
    return {resource_key(r): r for r in resources if isinstance(r, cls)}


def warnings(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["log_level"] == "warning"]


# -- waypoint_resources ----------------------------------------------------------------------


def test_canonical_waypoint_becomes_a_service_and_a_workload() -> None:
    mesh = MeshConfig(trust_domain="td.example", cluster_id="c1", network="n1")
    with capture_logs() as logs:
        found = waypoint_resources(objects(CANONICAL_WAYPOINT + ADDRESSES), mesh)
    assert warnings(logs) == []
    assert found == [
        Service(
            name="waypoint",
            namespace="demo",
            hostname="waypoint.demo.svc.cluster.local",
            addresses=(NetworkAddress("n1", "127.0.40.1"),),
            ports=(PortMapping(15008, 15008, ""),),
        ),
        Workload(
            uid="c1//Gateway/demo/waypoint",
            name="waypoint",
            namespace="demo",
            addresses=("127.0.40.1",),
            service_account="waypoint",
            node="",
            trust_domain="td.example",
            network="n1",
            cluster_id="c1",
            tunnel_protocol=TunnelProtocol.HBONE,
            canonical_name="waypoint",
            canonical_revision="latest",
            workload_type="gateway",
            workload_name="waypoint",
            services=(WAYPOINT_KEY,),
        ),
    ]
    (workload,) = [r for r in found if isinstance(r, Workload)]
    assert workload.spiffe_id == "spiffe://td.example/ns/demo/sa/waypoint"


def test_annotations_name_the_service_account_and_node() -> None:
    node = (
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-2, labels: "
        "{topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-1b}}\n"
        "status: {addresses: [{type: InternalIP, address: 127.0.10.2}]}"
    )
    annotations = "{istio.io/service-account: wp-sa, ambient-lite.io/node: node-2}"
    found = waypoint_resources(objects(node, gateway(annotations=annotations)), MeshConfig())
    (workload,) = by_key(found, Workload).values()
    assert (workload.service_account, workload.node) == ("wp-sa", "node-2")
    assert workload.locality == Locality("eu", "eu-1b", "")


def test_only_ip_addresses_are_used_and_status_is_the_fallback() -> None:
    spec_and_hostname = (
        "gatewayClassName: istio-waypoint\n"
        "listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n"
        "addresses: [{type: Hostname, value: wp.example}, {value: 127.0.40.2}]"
    )
    found = waypoint_resources(objects(gateway(spec=spec_and_hostname)), MeshConfig())
    assert [w.addresses for w in by_key(found, Workload).values()] == [("127.0.40.2",)]

    assigned = CANONICAL_WAYPOINT + "status:\n  addresses: [{type: IPAddress, value: 127.0.40.9}]"
    found = waypoint_resources(objects(assigned), MeshConfig())
    assert [s.addresses for s in by_key(found, Service).values()] == [
        (NetworkAddress("", "127.0.40.9"),)
    ]


def test_waypoint_without_addresses_or_pods_is_left_out_with_a_warning() -> None:
    with capture_logs() as logs:
        assert waypoint_resources(objects(CANONICAL_WAYPOINT), MeshConfig()) == []
    assert [w["gateway"] for w in warnings(logs)] == ["demo/waypoint"]


def test_missing_hbone_listener_is_a_warning_but_still_translated() -> None:
    spec = (
        "gatewayClassName: istio-waypoint\n"
        "listeners: [{name: http, port: 80, protocol: HTTP}]\n"
        "addresses: [{value: 127.0.40.1}]"
    )
    with capture_logs() as logs:
        found = waypoint_resources(objects(gateway(spec=spec)), MeshConfig())
    assert len(found) == 2
    (warning,) = warnings(logs)
    assert "15008" in warning["event"] and warning["gateway"] == "demo/waypoint"


def test_other_gateway_classes_are_not_waypoints() -> None:
    ingress = gateway(name="ingress", spec="gatewayClassName: istio\n"
                      "listeners: [{name: http, port: 80, protocol: HTTP}]")
    assert waypoint_resources(objects(ingress), MeshConfig()) == []


def test_kubernetes_mode_pods_are_the_waypoint_workloads() -> None:
    waypoint_pod = pod("waypoint-7d9f", "127.0.20.9", "{gateway.networking.k8s.io/gateway-name: "
                       "waypoint}")
    with capture_logs() as logs:
        assert waypoint_resources(objects(gateway(), waypoint_pod), MeshConfig()) == []
    assert "no Service" in warnings(logs)[0]["event"]

    # With the Service the deployment controller creates, the normal path gives the pod its
    # Service, and the Service (labelled with the gateway name) gets no waypoint itself.
    controller_service = service(
        "waypoint",
        labels="{gateway.networking.k8s.io/gateway-name: waypoint}",
        selector="{gateway.networking.k8s.io/gateway-name: waypoint}",
    )
    cluster = objects(gateway(), waypoint_pod, controller_service)
    with capture_logs() as logs:
        assert waypoint_resources(cluster, MeshConfig()) == []
    assert warnings(logs) == []
    translated = translate(cluster)
    (workload,) = by_key(translated, Workload).values()
    assert workload.services == (WAYPOINT_KEY,)
    assert by_key(translated, Service)[WAYPOINT_KEY].waypoint is None


def test_an_existing_service_means_kubernetes_shape_and_no_synthetic_workload() -> None:
    # A Service named after the Gateway selects the waypoint's pods; with none (scaled to
    # zero) the waypoint has no endpoint, and ztunnels must fail closed rather than be sent
    # to an invented workload at the Service's address.
    found = waypoint_resources(objects(gateway(), service("waypoint")), MeshConfig())
    assert found == []


def test_a_broken_gateway_is_skipped_not_fatal() -> None:
    broken = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "bad", "namespace": "demo"},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"port": "x"}],
                 "addresses": [{"value": "127.0.40.3"}]},
    }
    good = parse_documents(gateway(), "g.yaml").objects[0]
    with capture_logs() as logs:
        found = waypoint_resources(ClusterObjects.from_objects([broken, good]), MeshConfig())
    assert [r.name for r in found] == ["waypoint", "waypoint"]  # type: ignore[union-attr]
    (warning,) = warnings(logs)
    assert warning["key"] == "demo/bad" and "ValueError" in warning["reason"]


@pytest.mark.parametrize(
    ("label", "expected"),
    [(None, "service"), ("service", "service"), ("workload", "workload"), ("all", "all"),
     ("none", "none")],
)
def test_waypoint_for(label: str | None, expected: str) -> None:
    labels = {"istio.io/waypoint-for": label} if label else {}
    assert waypoint_for({"metadata": {"name": "w", "labels": labels}}) == expected


def test_unknown_waypoint_for_reads_as_service_with_a_warning() -> None:
    with capture_logs() as logs:
        found = waypoint_for(
            {"kind": "Gateway", "metadata": {"name": "w", "namespace": "demo",
                                             "labels": {"istio.io/waypoint-for": "pods"}}}
        )
    assert found == "service"
    assert warnings(logs)[0]["value"] == "pods"


def test_waypoint_gateway_lookup() -> None:
    cluster = objects(gateway(), gateway(name="ingress", spec="gatewayClassName: istio"))
    assert waypoint_gateway(cluster, "demo", "waypoint") is not None
    assert waypoint_gateway(cluster, "demo", "ingress") is None
    assert waypoint_gateway(cluster, "other", "waypoint") is None


# -- selection: istio.io/use-waypoint --------------------------------------------------------


def waypoints_of(*documents: str) -> dict[str, GatewayAddress | None]:
    """name -> waypoint of every translated Service and Pod workload."""
    found: dict[str, GatewayAddress | None] = {}
    for resource in translate(objects(*documents)):
        if isinstance(resource, Service | Workload):
            found[f"{type(resource).__name__}/{resource.name}"] = resource.waypoint
    return found


AT = GatewayAddress("waypoint.demo.svc.cluster.local")


@pytest.mark.parametrize(
    ("waypoint_for_label", "service_gets", "pod_gets"),
    [("service", AT, None), ("workload", None, AT), ("all", AT, AT), ("none", None, None)],
)
def test_waypoint_for_decides_who_gets_the_waypoint(
    waypoint_for_label: str, service_gets: GatewayAddress | None, pod_gets: GatewayAddress | None
) -> None:
    found = waypoints_of(
        AMBIENT_NS,
        gateway(labels=f"{{istio.io/waypoint-for: {waypoint_for_label}}}", spec=(
            "gatewayClassName: istio-waypoint\n"
            "listeners: [{name: mesh, port: 15008, protocol: HBONE}]")),
        service("httpbin", labels="{istio.io/use-waypoint: waypoint}"),
        pod("httpbin", "127.0.20.1", labels="{istio.io/use-waypoint: waypoint}"),
    )
    assert found == {"Service/httpbin": service_gets, "Workload/httpbin": pod_gets}


def test_namespace_label_other_namespace_and_opt_out() -> None:
    namespace = (
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: "
        "{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}"
    )
    found = waypoints_of(
        namespace,
        gateway(labels="{istio.io/waypoint-for: all}"),
        gateway(name="shared", namespace="infra", labels="{istio.io/waypoint-for: all}",
                spec="gatewayClassName: istio-waypoint\n"
                     "addresses: [{type: IPAddress, value: 127.0.40.2}]"),
        service("inherits"),
        service("elsewhere", labels="{istio.io/use-waypoint: shared, "
                                    "istio.io/use-waypoint-namespace: infra}"),
        service("opted-out", labels="{istio.io/use-waypoint: none}"),
        pod("inherits", "127.0.20.1"),
        pod("opted-out", "127.0.20.2", labels="{istio.io/use-waypoint: none}"),
        pod("plain", "127.0.20.3", namespace="other"),
    )
    shared = GatewayAddress("shared.infra.svc.cluster.local")
    assert found == {
        "Service/inherits": AT,
        "Service/elsewhere": shared,
        "Service/opted-out": None,
        "Workload/inherits": AT,
        "Workload/opted-out": None,
        "Workload/plain": None,
        # The waypoints' own Service and Workload never use a waypoint.
        "Service/waypoint": None,
        "Service/shared": None,
        "Workload/waypoint": None,
        "Workload/shared": None,
    }


def test_the_waypoint_pods_and_service_never_get_a_waypoint() -> None:
    namespace = (
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: "
        "{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}"
    )
    found = waypoints_of(
        namespace,
        gateway(labels="{istio.io/waypoint-for: all}"),
        pod("waypoint-abc", "127.0.20.9", labels="{gateway.networking.k8s.io/gateway-name: "
                                                  "waypoint}"),
        service("waypoint", labels="{gateway.networking.k8s.io/gateway-name: waypoint}"),
        pod("app", "127.0.20.1"),
    )
    assert found == {"Service/waypoint": None, "Workload/waypoint-abc": None, "Workload/app": AT}


@pytest.mark.parametrize(
    "gateways",
    [
        [],  # missing
        [gateway(spec="gatewayClassName: istio\n")],  # not a waypoint
        [gateway(namespace="other")],  # in another namespace than the label says
    ],
)
def test_a_label_naming_no_waypoint_sets_nothing_and_is_logged(gateways: list[str]) -> None:
    with capture_logs() as logs:
        found = waypoints_of(
            AMBIENT_NS,
            *gateways,
            service("httpbin", labels="{istio.io/use-waypoint: waypoint}"),
        )
    assert found["Service/httpbin"] is None
    (warning,) = [w for w in warnings(logs) if "use-waypoint" in w["event"]]
    assert warning["object"] == "Service demo/httpbin"
    assert warning["gateway"] == "demo/waypoint"


# -- validation of the Gateway shape (sources/objects.py) -----------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("listeners: []", "spec.gatewayClassName must be a non-empty string"),
        ("gatewayClassName: istio-waypoint\nlisteners: [{name: mesh, port: 0, protocol: HBONE}]",
         "spec.listeners[0].port: 0 is not a port number"),
        ("gatewayClassName: istio-waypoint\nlisteners: [{name: mesh, port: 15008}]",
         "spec.listeners[0].protocol must be a non-empty string"),
        ("gatewayClassName: istio-waypoint\naddresses: [{type: IPAddress, value: nope}]",
         "spec.addresses[0].value: 'nope' is not an IP address"),
    ],
)
def test_invalid_gateways_are_rejected_with_the_field(spec: str, message: str) -> None:
    with pytest.raises(InvalidObject) as raised:
        parse_documents(gateway(spec=spec), "gw.yaml")
    assert message in str(raised.value)
    assert "Gateway demo/waypoint" in str(raised.value)
