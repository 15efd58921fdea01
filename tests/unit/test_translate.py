"""Translation of Kubernetes objects into the wire model (Istio's ambient semantics)."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from ambient_api.codec import from_jsonable, to_jsonable
from ambient_api.model import (
    Authorization,
    AuthorizationAction,
    AuthorizationScope,
    Clause,
    GatewayAddress,
    Locality,
    Match,
    NetworkAddress,
    Node,
    PortMapping,
    Resource,
    Rule,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    resource_key,
)
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.sources.validation import parse_documents
from istiod_lite.translate import MeshConfig, translate
from istiod_lite.translate.common import selector_matches

AMBIENT_NS = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
"""
NODE = """
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels:
    topology.kubernetes.io/region: eu
    topology.kubernetes.io/zone: eu-1a
    topology.istio.io/subzone: rack-7
status:
  addresses:
    - {type: Hostname, address: node-1}
    - {type: InternalIP, address: 127.0.10.1}
"""


def pod(
    name: str = "sleep",
    namespace: str = "demo",
    labels: dict[str, str] | None = None,
    ip: str = "127.0.20.1",
    extra_spec: str = "",
    extra_status: str = "",
    extra_metadata: str = "",
) -> str:
    label_yaml = "{" + ", ".join(f"{k}: {v!r}" for k, v in (labels or {}).items()) + "}"
    return textwrap.dedent(
        f"""
        apiVersion: v1
        kind: Pod
        metadata:
          name: {name}
          namespace: {namespace}
          labels: {label_yaml}
        """
    ) + textwrap.indent(textwrap.dedent(extra_metadata), "  ") + textwrap.dedent(
        """
        spec:
          nodeName: node-1
        """
    ) + textwrap.indent(textwrap.dedent(extra_spec), "  ") + textwrap.dedent(
        f"""
        status:
          podIP: {ip}
        """
    ) + textwrap.indent(textwrap.dedent(extra_status), "  ")


def objects(*documents: str) -> ClusterObjects:
    text = "\n---\n".join(textwrap.dedent(d) for d in documents)
    parsed = parse_documents(text, "test.yaml")
    assert parsed.warnings == ()
    return ClusterObjects.from_objects(parsed.objects)


def of_type(resources: list[Resource], cls: type) -> dict[str, Any]:
    return {resource_key(r): r for r in resources if isinstance(r, cls)}


def workloads(*documents: str, mesh: MeshConfig | None = None) -> dict[str, Workload]:
    return of_type(translate(objects(*documents), mesh), Workload)


def one_workload(*documents: str, mesh: MeshConfig | None = None) -> Workload:
    (workload,) = workloads(*documents, mesh=mesh).values()
    return workload


def authorizations(*documents: str, mesh: MeshConfig | None = None) -> dict[str, Authorization]:
    return of_type(translate(objects(*documents), mesh), Authorization)


def policy(spec: str, name: str = "p", namespace: str = "demo") -> str:
    return (
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n"
        + textwrap.indent(textwrap.dedent(spec), "  ")
    )


# -- selector_matches ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {"app": "x"}, True),
        (None, {}, True),
        ({"matchLabels": {"app": "x"}}, {"app": "x", "v": "1"}, True),
        ({"matchLabels": {"app": "x"}}, {"app": "y"}, False),
        ({"matchLabels": {"app": "x"}}, {}, False),
        ({"matchExpressions": [{"key": "v", "operator": "In", "values": ["1", "2"]}]},
         {"v": "2"}, True),
        ({"matchExpressions": [{"key": "v", "operator": "In", "values": ["1"]}]}, {}, False),
        ({"matchExpressions": [{"key": "v", "operator": "NotIn", "values": ["1"]}]},
         {"v": "1"}, False),
        ({"matchExpressions": [{"key": "v", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "v", "operator": "Exists"}]}, {"v": ""}, True),
        ({"matchExpressions": [{"key": "v", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "v", "operator": "DoesNotExist"}]}, {}, True),
        ({"matchExpressions": [{"key": "v", "operator": "DoesNotExist"}]}, {"v": "1"}, False),
        ({"matchLabels": {"app": "x"},
          "matchExpressions": [{"key": "v", "operator": "Exists"}]}, {"app": "x"}, False),
    ],
)
def test_selector_matches(
    selector: dict[str, Any] | None, labels: dict[str, str], expected: bool
) -> None:
    assert selector_matches(selector, labels) is expected


def test_selector_with_unknown_operator_is_an_error() -> None:
    with pytest.raises(ValueError, match="Near"):
        selector_matches({"matchExpressions": [{"key": "v", "operator": "Near"}]}, {})


# -- workloads -------------------------------------------------------------------------------


def test_workload_basic_fields_and_locality_from_node() -> None:
    workload = one_workload(
        AMBIENT_NS,
        NODE,
        pod(
            labels={"app": "sleep"},
            extra_spec="serviceAccountName: sleep\n",
            extra_status="phase: Running\npodIPs: [{ip: 127.0.20.1}, {ip: 'fd00::1'}]\n",
        ),
    )
    assert workload == Workload(
        uid="Kubernetes//Pod/demo/sleep",
        name="sleep",
        namespace="demo",
        addresses=("127.0.20.1", "fd00::1"),
        service_account="sleep",
        node="node-1",
        tunnel_protocol=TunnelProtocol.HBONE,
        status=WorkloadStatus.HEALTHY,
        locality=Locality(region="eu", zone="eu-1a", subzone="rack-7"),
        canonical_name="sleep",
        canonical_revision="latest",
        workload_type="pod",
        workload_name="sleep",
    )


def test_workload_mesh_config_is_applied() -> None:
    mesh = MeshConfig(trust_domain="example.org", cluster_id="c1", network="net-a")
    workload = one_workload(AMBIENT_NS, pod(), mesh=mesh)
    assert workload.uid == "c1//Pod/demo/sleep"
    assert workload.cluster_id == "c1"
    assert workload.trust_domain == "example.org"
    assert workload.network == "net-a"
    assert workload.service_account == "default"
    assert workload.spiffe_id == "spiffe://example.org/ns/demo/sa/default"


def test_network_label_on_pod_then_namespace_then_mesh() -> None:
    namespace = """
    apiVersion: v1
    kind: Namespace
    metadata: {name: demo, labels: {topology.istio.io/network: ns-net}}
    """
    found = workloads(
        namespace,
        pod("a", labels={"topology.istio.io/network": "pod-net"}, ip="127.0.20.1"),
        pod("b", ip="127.0.20.2"),
        pod("c", namespace="other", ip="127.0.20.3"),
        mesh=MeshConfig(network="mesh-net"),
    )
    assert found["Kubernetes//Pod/demo/a"].network == "pod-net"
    assert found["Kubernetes//Pod/demo/b"].network == "ns-net"
    assert found["Kubernetes//Pod/other/c"].network == "mesh-net"


def test_tunnel_protocol_follows_namespace_enrollment_and_pod_opt_out() -> None:
    found = workloads(
        AMBIENT_NS,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n",
        pod("in-mesh", ip="127.0.20.1"),
        pod("opted-out", labels={"istio.io/dataplane-mode": "none"}, ip="127.0.20.2"),
        pod("host-net", extra_spec="hostNetwork: true\n", ip="127.0.20.3"),
        pod("legacy", namespace="legacy", ip="127.0.20.4"),
        pod("no-namespace-object", namespace="nowhere", ip="127.0.20.5"),
    )
    protocols = {w.name: w.tunnel_protocol for w in found.values()}
    assert protocols == {
        "in-mesh": TunnelProtocol.HBONE,
        "opted-out": TunnelProtocol.NONE,
        "host-net": TunnelProtocol.NONE,
        "legacy": TunnelProtocol.NONE,
        "no-namespace-object": TunnelProtocol.NONE,
    }


def test_workload_status() -> None:
    found = workloads(
        pod("no-phase", ip="127.0.20.1"),
        pod("running", extra_status="phase: Running\n", ip="127.0.20.2"),
        pod("pending", extra_status="phase: Pending\n", ip="127.0.20.3"),
        pod(
            "not-ready",
            extra_status="phase: Running\nconditions: [{type: Ready, status: 'False'}]\n",
            ip="127.0.20.4",
        ),
        pod(
            "ready",
            extra_status="phase: Running\nconditions: [{type: Ready, status: 'True'}]\n",
            ip="127.0.20.5",
        ),
        pod("terminating", extra_metadata="deletionTimestamp: '2024-01-01T00:00:00Z'\n",
            ip="127.0.20.6"),
        pod("finished", extra_status="phase: Succeeded\n", ip="127.0.20.7"),
        pod("failed", extra_status="phase: Failed\n", ip="127.0.20.8"),
    )
    statuses = {w.name: w.status for w in found.values()}
    assert statuses == {
        "no-phase": WorkloadStatus.HEALTHY,
        "running": WorkloadStatus.HEALTHY,
        "pending": WorkloadStatus.UNHEALTHY,
        "not-ready": WorkloadStatus.UNHEALTHY,
        "ready": WorkloadStatus.HEALTHY,
        "terminating": WorkloadStatus.UNHEALTHY,
    }


@pytest.mark.parametrize(
    ("labels", "name", "revision"),
    [
        ({"service.istio.io/canonical-name": "cn", "app.kubernetes.io/name": "k8s", "app": "a",
          "service.istio.io/canonical-revision": "cr", "app.kubernetes.io/version": "kv",
          "version": "v"}, "cn", "cr"),
        ({"app.kubernetes.io/name": "k8s", "app": "a", "app.kubernetes.io/version": "kv",
          "version": "v"}, "k8s", "kv"),
        ({"app": "a", "version": "v"}, "a", "v"),
        ({}, "sleep", "latest"),
    ],
)
def test_canonical_name_and_revision(labels: dict[str, str], name: str, revision: str) -> None:
    workload = one_workload(pod(labels=labels))
    assert (workload.canonical_name, workload.canonical_revision) == (name, revision)


@pytest.mark.parametrize(
    ("owner", "labels", "expected"),
    [
        ("{kind: ReplicaSet, name: httpbin-7d9f8c6b5d, controller: true}",
         {"pod-template-hash": "7d9f8c6b5d"}, ("deployment", "httpbin")),
        ("{kind: ReplicaSet, name: reviews-v1-5b8c7d9f4}", {}, ("deployment", "reviews-v1")),
        ("{kind: ReplicaSet, name: plain}", {}, ("pod", "plain")),
        ("{kind: Job, name: backup-28312345}", {}, ("cronjob", "backup")),
        ("{kind: Job, name: migrate}", {}, ("job", "migrate")),
        ("{kind: StatefulSet, name: db, controller: true}", {}, ("pod", "db")),
    ],
)
def test_workload_name_from_owner(
    owner: str, labels: dict[str, str], expected: tuple[str, str]
) -> None:
    workload = one_workload(
        pod(name="instance-abcde", labels=labels, extra_metadata=f"ownerReferences: [{owner}]\n")
    )
    assert (workload.workload_type, workload.workload_name) == expected
    if not labels.get("app"):
        assert workload.canonical_name == expected[1]


def waypoint_gateway(name: str, namespace: str = "demo", waypoint_for: str = "service") -> str:
    """A waypoint Gateway as istioctl generates it: use-waypoint labels must name one."""
    return (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        f"metadata: {{name: {name}, namespace: {namespace}, "
        f"labels: {{istio.io/waypoint-for: {waypoint_for}}}}}\n"
        "spec: {gatewayClassName: istio-waypoint, "
        "listeners: [{name: mesh, port: 15008, protocol: HBONE}]}"
    )


def test_waypoint_from_pod_namespace_and_opt_out() -> None:
    namespace = """
    apiVersion: v1
    kind: Namespace
    metadata:
      name: demo
      labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: ns-waypoint}
    """
    found = workloads(
        namespace,
        waypoint_gateway("ns-waypoint", waypoint_for="workload"),
        waypoint_gateway("mine", waypoint_for="all"),
        waypoint_gateway("shared", namespace="infra", waypoint_for="workload"),
        pod("inherits", ip="127.0.20.1"),
        pod("own", labels={"istio.io/use-waypoint": "mine"}, ip="127.0.20.2"),
        pod("elsewhere", labels={"istio.io/use-waypoint": "shared",
                                 "istio.io/use-waypoint-namespace": "infra"}, ip="127.0.20.3"),
        pod("opted-out", labels={"istio.io/use-waypoint": "none"}, ip="127.0.20.4"),
        pod("the-waypoint", labels={"gateway.networking.k8s.io/gateway-name": "ns-waypoint"},
            ip="127.0.20.5"),
        pod("no-label-ns", namespace="other", ip="127.0.20.6"),
    )
    waypoints = {w.name: w.waypoint for w in found.values()}
    assert waypoints == {
        "inherits": GatewayAddress("ns-waypoint.demo.svc.cluster.local"),
        "own": GatewayAddress("mine.demo.svc.cluster.local"),
        "elsewhere": GatewayAddress("shared.infra.svc.cluster.local"),
        "opted-out": None,
        "the-waypoint": None,
        "no-label-ns": None,
    }


SERVICE_HTTPBIN = """
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: demo}
spec:
  selector: {app: httpbin}
  clusterIP: 10.0.0.1
  clusterIPs: [10.0.0.1, 'fd00::a']
  ports:
    - {name: http, port: 8000, targetPort: 80}
    - {name: grpc-api, port: 9000, targetPort: grpc}
    - {name: metrics, port: 9090, targetPort: missing}
    - {name: raw, port: 7000, appProtocol: HTTP2}
    - {name: dns, port: 53, protocol: UDP}
"""


def test_workload_services_are_selecting_services_in_its_namespace() -> None:
    no_selector = """
    apiVersion: v1
    kind: Service
    metadata: {name: manual, namespace: demo}
    spec: {clusterIP: 10.0.0.2, ports: [{port: 80}]}
    """
    other_namespace = """
    apiVersion: v1
    kind: Service
    metadata: {name: httpbin, namespace: other}
    spec: {selector: {app: httpbin}, clusterIP: 10.0.0.3, ports: [{port: 80}]}
    """
    version_selector = """
    apiVersion: v1
    kind: Service
    metadata: {name: httpbin-v2, namespace: demo}
    spec: {selector: {app: httpbin, version: v2}, clusterIP: 10.0.0.4, ports: [{port: 80}]}
    """
    workload = one_workload(
        SERVICE_HTTPBIN,
        no_selector,
        other_namespace,
        version_selector,
        pod("httpbin-v1", labels={"app": "httpbin", "version": "v1"}),
    )
    assert workload.services == ("demo/httpbin.demo.svc.cluster.local",)


def test_service_translation() -> None:
    httpbin_pod = pod(
        "httpbin",
        labels={"app": "httpbin"},
        extra_spec="""
        containers:
          - name: main
            image: httpbin
            ports: [{name: grpc, containerPort: 9443}]
        """,
    )
    services = of_type(translate(objects(SERVICE_HTTPBIN, httpbin_pod)), Service)
    assert services == {
        "demo/httpbin.demo.svc.cluster.local": Service(
            name="httpbin",
            namespace="demo",
            hostname="httpbin.demo.svc.cluster.local",
            # The network of a Service address is the cluster's (MeshConfig.network).
            addresses=(NetworkAddress("", "10.0.0.1"), NetworkAddress("", "fd00::a")),
            ports=(
                PortMapping(8000, 80, "http"),
                PortMapping(9000, 9443, "grpc"),
                PortMapping(9090, 9090, ""),
                PortMapping(7000, 7000, "http2"),
            ),
        )
    }


def test_headless_service_has_no_addresses_and_external_name_is_skipped() -> None:
    headless = """
    apiVersion: v1
    kind: Service
    metadata: {name: db, namespace: demo}
    spec: {clusterIP: None, selector: {app: db}, ports: [{name: tcp-db, port: 5432}]}
    """
    external = """
    apiVersion: v1
    kind: Service
    metadata: {name: ext, namespace: demo}
    spec: {type: ExternalName, externalName: example.com}
    """
    services = of_type(translate(objects(headless, external)), Service)
    assert list(services) == ["demo/db.demo.svc.cluster.local"]
    db = services["demo/db.demo.svc.cluster.local"]
    assert db.addresses == ()
    assert db.ports == (PortMapping(5432, 5432, "tcp"),)


def test_service_waypoint_from_service_then_namespace() -> None:
    namespace = """
    apiVersion: v1
    kind: Namespace
    metadata: {name: demo, labels: {istio.io/use-waypoint: ns-wp}}
    """

    def service(name: str, labels: str) -> str:
        return (
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo, "
            f"labels: {labels}}}\nspec: {{clusterIP: 10.0.1.{len(name)}, ports: [{{port: 80}}]}}"
        )

    services = of_type(
        translate(
            objects(
                namespace,
                waypoint_gateway("ns-wp"),
                waypoint_gateway("svc-wp", waypoint_for="all"),
                service("a", "{}"),
                service("bb", "{istio.io/use-waypoint: svc-wp}"),
                service("ccc", "{istio.io/use-waypoint: none}"),
                service("dddd", "{gateway.networking.k8s.io/gateway-name: ns-wp}"),
            )
        ),
        Service,
    )
    assert {s.name: s.waypoint for s in services.values()} == {
        "a": GatewayAddress("ns-wp.demo.svc.cluster.local"),
        "bb": GatewayAddress("svc-wp.demo.svc.cluster.local"),
        "ccc": None,
        "dddd": None,
    }


# -- nodes -----------------------------------------------------------------------------------


def test_nodes() -> None:
    no_address = "apiVersion: v1\nkind: Node\nmetadata: {name: node-9}\n"
    nodes = of_type(translate(objects(NODE, no_address), MeshConfig(cluster_id="c1")), Node)
    assert nodes == {
        "node-1": Node(
            name="node-1",
            address="127.0.10.1",
            cluster_id="c1",
            locality=Locality("eu", "eu-1a", "rack-7"),
        )
    }


# -- AuthorizationPolicy ---------------------------------------------------------------------


def test_policy_scopes_and_workload_lists() -> None:
    found = translate(
        objects(
            policy("{}", name="ns-wide"),
            policy("selector: {matchLabels: {app: httpbin}}", name="httpbin-only"),
            policy("action: DENY", name="mesh-wide", namespace="istio-system"),
            policy(
                "selector: {matchLabels: {app: httpbin}}\naction: DENY\nrules: [{}]",
                name="root-selector",
                namespace="istio-system",
            ),
            policy("selector: {matchLabels: {app: httpbin}}", name="other-ns", namespace="other"),
            pod("httpbin", labels={"app": "httpbin"}, ip="127.0.20.1"),
            pod("sleep", labels={"app": "sleep"}, ip="127.0.20.2"),
        )
    )
    policies = of_type(found, Authorization)
    assert {k: p.scope for k, p in policies.items()} == {
        "demo/ns-wide": AuthorizationScope.NAMESPACE,
        "demo/httpbin-only": AuthorizationScope.WORKLOAD_SELECTOR,
        "istio-system/mesh-wide": AuthorizationScope.GLOBAL,
        "istio-system/root-selector": AuthorizationScope.WORKLOAD_SELECTOR,
        "other/other-ns": AuthorizationScope.WORKLOAD_SELECTOR,
    }
    found_workloads = of_type(found, Workload)
    assert found_workloads["Kubernetes//Pod/demo/httpbin"].authorization_policies == (
        "demo/httpbin-only",
        "istio-system/root-selector",
    )
    assert found_workloads["Kubernetes//Pod/demo/sleep"].authorization_policies == ()


def test_policy_actions() -> None:
    policies = authorizations(
        policy("{}", name="default-allow"),
        policy("action: DENY\nrules: [{}]", name="deny"),
        policy("action: AUDIT\nrules: [{}]", name="audit"),
        policy("action: CUSTOM\nprovider: {name: ext}\nrules: [{}]", name="custom"),
        policy(
            "targetRefs: [{kind: Service, group: '', name: httpbin}]\nrules: [{}]",
            name="for-waypoint",
        ),
    )
    assert {k: p.action for k, p in policies.items()} == {
        "demo/default-allow": AuthorizationAction.ALLOW,
        "demo/deny": AuthorizationAction.DENY,
        "demo/custom": AuthorizationAction.DENY,  # no ext_authz: fails closed
    }
    # An ALLOW policy without rules matches nothing (denies all once it applies);
    # an empty rule matches everything.
    assert policies["demo/default-allow"].rules == ()
    assert policies["demo/deny"].rules == (Rule(clauses=()),)
    assert policies["demo/custom"].rules == (Rule(clauses=()),)


def test_from_to_and_when_become_clauses() -> None:
    spec = """
    rules:
      - from:
          - source:
              principals: [cluster.local/ns/demo/sa/sleep, spiffe://cluster.local/ns/a/sa/b]
              notNamespaces: [legacy]
          - source:
              namespaces: [demo]
              notPrincipals: [cluster.local/ns/demo/sa/notsleep]
              ipBlocks: [10.0.0.0/8]
              notIpBlocks: [10.1.0.0/16]
          - source:
              serviceAccounts: [demo/sleep]
              notServiceAccounts: [demo/other]
        to:
          - operation: {ports: ['8000', '9000']}
          - operation: {notPorts: ['15000']}
        when:
          - {key: source.ip, values: [10.2.0.0/16], notValues: [10.2.3.4]}
          - {key: source.namespace, notValues: [kube-system]}
          - {key: source.principal, values: ['spiffe://cluster.local/ns/x/sa/y']}
          - {key: destination.ip, values: [127.0.30.1], notValues: [127.0.30.2]}
          - {key: destination.port, values: ['8000'], notValues: ['8001']}
    """
    (authorization,) = authorizations(policy(spec)).values()
    assert authorization.rules == (
        Rule(
            clauses=(
                Clause(
                    matches=(
                        Match(
                            principals=(
                                "cluster.local/ns/demo/sa/sleep",
                                "cluster.local/ns/a/sa/b",
                            ),
                            not_namespaces=("legacy",),
                        ),
                        Match(
                            namespaces=("demo",),
                            not_principals=("cluster.local/ns/demo/sa/notsleep",),
                            source_ips=("10.0.0.0/8",),
                            not_source_ips=("10.1.0.0/16",),
                        ),
                        Match(
                            principals=("cluster.local/ns/demo/sa/sleep",),
                            not_principals=("cluster.local/ns/demo/sa/other",),
                        ),
                    )
                ),
                Clause(
                    matches=(
                        Match(destination_ports=(8000, 9000)),
                        Match(not_destination_ports=(15000,)),
                    )
                ),
                Clause(matches=(Match(source_ips=("10.2.0.0/16",), not_source_ips=("10.2.3.4",)),)),
                Clause(matches=(Match(not_namespaces=("kube-system",)),)),
                Clause(matches=(Match(principals=("cluster.local/ns/x/sa/y",)),)),
                Clause(
                    matches=(
                        Match(destination_ips=("127.0.30.1",), not_destination_ips=("127.0.30.2",)),
                    )
                ),
                Clause(matches=(Match(destination_ports=(8000,), not_destination_ports=(8001,)),)),
            )
        ),
    )


def test_service_accounts_use_the_mesh_trust_domain() -> None:
    spec = "rules: [{from: [{source: {serviceAccounts: [demo/sleep]}}]}]"
    (authorization,) = authorizations(
        policy(spec), mesh=MeshConfig(trust_domain="example.org")
    ).values()
    assert authorization.rules[0].clauses[0].matches == (
        Match(principals=("example.org/ns/demo/sa/sleep",)),
    )


L7_RULES = """
rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]
    to: [{operation: {ports: ['8000'], methods: [GET], paths: [/admin*]}}]
  - from: [{source: {requestPrincipals: ['*']}}]
  - when: [{key: 'request.headers[x-user]', values: [admin]}]
  - to: [{operation: {ports: ['9000']}}]
"""


def test_allow_rules_needing_l7_are_dropped() -> None:
    (authorization,) = authorizations(policy(L7_RULES)).values()
    assert authorization.action is AuthorizationAction.ALLOW
    assert authorization.rules == (
        Rule(clauses=(Clause(matches=(Match(destination_ports=(9000,)),)),)),
    )


def test_allow_policy_with_only_l7_rules_matches_nothing() -> None:
    (authorization,) = authorizations(
        policy("rules: [{to: [{operation: {methods: [GET]}}]}]")
    ).values()
    assert authorization.rules == ()


def test_deny_rules_ignore_l7_fields_and_deny_more() -> None:
    (authorization,) = authorizations(policy("action: DENY\n" + L7_RULES)).values()
    assert authorization.rules == (
        Rule(
            clauses=(
                Clause(matches=(Match(principals=("cluster.local/ns/demo/sa/sleep",)),)),
                Clause(matches=(Match(destination_ports=(8000,)),)),
            )
        ),
        Rule(clauses=(Clause(matches=(Match(),)),)),
        Rule(clauses=()),
        Rule(clauses=(Clause(matches=(Match(destination_ports=(9000,)),)),)),
    )


def test_ip_blocks_with_remote_ip_blocks_cannot_be_an_allow() -> None:
    spec = "rules: [{from: [{source: {ipBlocks: [10.0.0.0/8], remoteIpBlocks: [10.1.0.0/16]}}]}]"
    (authorization,) = authorizations(policy(spec)).values()
    assert authorization.rules == ()


# -- PeerAuthentication ----------------------------------------------------------------------


def peer_authentication(name: str, namespace: str, spec: str) -> str:
    return (
        f"apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )


STRICT_RULES = (Rule(clauses=(Clause(matches=(Match(not_principals=("*",)),)),)),)


def test_peer_authentication_strict_becomes_deny_without_principal() -> None:
    found = translate(
        objects(
            peer_authentication("default", "demo", "{mtls: {mode: STRICT}}"),
            peer_authentication("mesh", "istio-system", "{mtls: {mode: STRICT}}"),
            peer_authentication(
                "db", "demo", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}"
            ),
            peer_authentication("lenient", "other", "{mtls: {mode: PERMISSIVE}}"),
            peer_authentication("unset", "other2", "{}"),
            peer_authentication("disabled", "other3", "{mtls: {mode: DISABLE}}"),
            peer_authentication(
                "ports", "other4",
                "{mtls: {mode: PERMISSIVE}, selector: {matchLabels: {app: x}}, "
                "portLevelMtls: {'8080': {mode: STRICT}}}",
            ),
            pod("db", labels={"app": "db"}, ip="127.0.20.1"),
        )
    )
    policies = of_type(found, Authorization)
    assert policies == {
        "demo/converted-peer-authentication-default": Authorization(
            "converted-peer-authentication-default", "demo", AuthorizationScope.NAMESPACE,
            AuthorizationAction.DENY, STRICT_RULES,
        ),
        "istio-system/converted-peer-authentication-mesh": Authorization(
            "converted-peer-authentication-mesh", "istio-system", AuthorizationScope.GLOBAL,
            AuthorizationAction.DENY, STRICT_RULES,
        ),
        "demo/converted-peer-authentication-db": Authorization(
            "converted-peer-authentication-db", "demo", AuthorizationScope.WORKLOAD_SELECTOR,
            AuthorizationAction.DENY, STRICT_RULES,
        ),
    }
    (workload,) = of_type(found, Workload).values()
    assert workload.authorization_policies == ("demo/converted-peer-authentication-db",)


# -- robustness and the wire ----------------------------------------------------------------


def test_a_broken_object_is_skipped_not_fatal() -> None:
    good = objects(SERVICE_HTTPBIN, pod("httpbin", labels={"app": "httpbin"}))
    broken_service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "broken", "namespace": "demo"},
        "spec": {"ports": [{"port": "not-a-number"}]},
    }
    broken_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "broken", "namespace": "demo"},
        "spec": {},
        "status": {"podIP": "127.0.20.9"},
    }
    mixed = ClusterObjects(
        services={**good.services, "demo/broken": broken_service},
        pods={**good.pods, "demo/broken": broken_pod},
    )
    names = sorted(
        r.name for r in translate(mixed) if isinstance(r, Service | Workload)
    )
    assert names == ["httpbin", "httpbin"]


def test_a_policy_with_a_malformed_selector_does_not_take_workloads_down() -> None:
    good = objects(pod("httpbin", labels={"app": "httpbin"}))
    bad_policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad", "namespace": "demo"},
        "spec": {"selector": {"matchExpressions": [{"key": "app", "operator": "Near"}]}},
    }
    mixed = ClusterObjects(pods=good.pods, authorization_policies={"demo/bad": bad_policy})
    found = translate(mixed)
    assert [type(r) for r in found] == [Authorization, Workload]
    # It fails closed: the workloads it meant are in its namespace, so it covers them all.
    (authorization,) = of_type(found, Authorization).values()
    assert authorization.scope is AuthorizationScope.NAMESPACE
    assert authorization.action is AuthorizationAction.ALLOW


def test_translated_resources_survive_the_codec() -> None:
    found = translate(
        objects(AMBIENT_NS, NODE, SERVICE_HTTPBIN, pod(labels={"app": "httpbin"}),
                policy("rules: [{from: [{source: {namespaces: [demo]}}]}]"))
    )
    assert len(found) == 4
    for resource in found:
        assert from_jsonable(type(resource), to_jsonable(resource)) == resource


def test_capture_port_exclusions_come_from_istio_annotations() -> None:
    annotated = pod(extra_metadata="""
        annotations:
          traffic.sidecar.istio.io/excludeInboundPorts: '9090, 8081'
          traffic.sidecar.istio.io/excludeOutboundPorts: '5432,not-a-port,70000'
        """)
    workload = one_workload(AMBIENT_NS, annotated)
    assert workload.capture_exclude_inbound_ports == (8081, 9090)
    assert workload.capture_exclude_outbound_ports == (5432,)  # bad entries skipped, logged
