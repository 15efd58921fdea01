"""Parsing and validation of Kubernetes YAML, and the polling file source."""

from __future__ import annotations

import os
from pathlib import Path

import kubernetes_validate
import pytest
import trio
import yaml

from ambient_api.model import Authorization, Service, TunnelProtocol, Workload
from istiod_lite.sources import (
    ClusterObjects,
    FileSource,
    InvalidObject,
    SourceError,
    parse_documents,
)
from istiod_lite.translate import translate

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n"
POD = """\
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: demo}
spec: {nodeName: node-1}
status: {podIP: 127.0.20.1}
"""


def pod_yaml(name: str, ip: str, namespace: str = "demo") -> str:
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec: {{nodeName: node-1}}\nstatus: {{podIP: {ip}}}\n"
    )


# -- parse_documents -------------------------------------------------------------------------


def test_multi_document_file_with_empty_documents() -> None:
    parsed = parse_documents(f"---\n{NAMESPACE}---\n---\n{POD}---\n", "f.yaml")
    objects = ClusterObjects.from_objects(parsed.objects)
    assert list(objects.namespaces) == ["demo"]
    assert list(objects.pods) == ["demo/sleep"]
    assert parsed.warnings == ()


def test_kind_list_items_are_objects() -> None:
    text = yaml.safe_dump(
        {"apiVersion": "v1", "kind": "List", "items": [yaml.safe_load(NAMESPACE),
                                                       yaml.safe_load(POD)]}
    )
    objects = ClusterObjects.from_objects(parse_documents(text, "list.yaml").objects)
    assert objects.count() == 2


def test_namespace_defaults_to_default() -> None:
    (obj,) = parse_documents(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa}\n", "f.yaml"
    ).objects
    assert obj["metadata"]["namespace"] == "default"
    assert list(ClusterObjects.from_objects([obj]).service_accounts) == ["default/sa"]


def test_every_known_kind_lands_in_its_field() -> None:
    docs = [
        NAMESPACE,
        POD,
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\n",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, namespace: demo}\n",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: demo}\n",
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n"
        "metadata: {name: d, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        "metadata: {name: waypoint, namespace: demo}\nspec: {gatewayClassName: istio-waypoint}\n",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        "metadata: {name: r, namespace: demo}\n",
    ]
    objects = ClusterObjects.from_objects(parse_documents("---\n".join(docs), "f").objects)
    assert objects == ClusterObjects(
        namespaces={"demo": objects.namespaces["demo"]},
        pods={"demo/sleep": objects.pods["demo/sleep"]},
        services={"demo/s": objects.services["demo/s"]},
        service_accounts={"demo/a": objects.service_accounts["demo/a"]},
        nodes={"node-1": objects.nodes["node-1"]},
        authorization_policies={"demo/p": objects.authorization_policies["demo/p"]},
        peer_authentications={"demo/d": objects.peer_authentications["demo/d"]},
        gateways={"demo/waypoint": objects.gateways["demo/waypoint"]},
        httproutes={"demo/r": objects.httproutes["demo/r"]},
    )
    assert objects.gateways["demo/waypoint"]["spec"] == {"gatewayClassName": "istio-waypoint"}


def test_unknown_kind_is_a_warning_and_the_rest_is_used() -> None:
    deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: demo}\n"
    parsed = parse_documents(f"{NAMESPACE}---\n{deployment}", "mixed.yaml")
    assert [o["kind"] for o in parsed.objects] == ["Namespace"]
    assert parsed.warnings == (
        SourceError(
            "mixed.yaml",
            "document 2: apps/v1 Deployment 'web' is not a kind istiod_lite reads; ignored",
            "warning",
        ),
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a: [1, 2\nb: 3\n", "YAML syntax error at line 2, column 2"),
        ("key: value\n  bad: indent\n", "YAML syntax error at line 2"),
        (f"{NAMESPACE}---\n- just\n- a list\n", "document 2: expected a mapping, got a list"),
        ("just a string\n", "document 1: expected a mapping, got a string"),
        ("kind: Pod\nmetadata: {name: x}\n", "document 1: apiVersion is missing"),
        ("apiVersion: v1\nmetadata: {name: x}\n", "document 1: kind is missing"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {namespace: demo}\n",
         "document 1: Pod: metadata.name is missing"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: no}\n",
         "metadata.name must be a string, got a boolean (quote it in YAML)"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: demo}\n"
         "status: {podIP: 127.0.20.1}\n", "document 1: Pod demo/x: spec.nodeName is missing"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: demo}\n"
         "spec: {nodeName: n}\n", "document 1: Pod demo/x: status.podIP is missing"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: demo}\n"
         "spec: {nodeName: n}\nstatus: {podIP: 300.1.1.1}\n",
         "Pod demo/x: status.podIP: '300.1.1.1' is not an IP address"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x, labels: {version: 2}}\n",
         "Pod default/x: metadata.labels.version must be a string, got a number"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}\n",
         "Service default/s: spec.ports[0].port: 70000 is not a port number"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
         "spec: {action: REJECT}\n",
         "AuthorizationPolicy default/p: spec.action 'REJECT' is not one of"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
         "spec: {rules: [{to: [{operation: {ports: [http]}}]}]}\n",
         "spec.rules[0].to[0].operation.ports: 'http' is not a port number"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
         "spec: {rules: [{from: [{source: {principals: x}}]}]}\n",
         "spec.rules[0].from[0].source.principals must be a list, got a string"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
         "spec: {rules: [{when: [{key: source.ip}]}]}\n",
         "spec.rules[0].when[0] needs values or notValues"),
        ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n"
         "spec: {mtls: {mode: STRICTER}}\n", "spec.mtls.mode 'STRICTER' is not one of"),
        ("apiVersion: v1\nkind: List\nitems:\n  - " + NAMESPACE.replace("\n", "\n    ")
         + "\n  - {apiVersion: v1, kind: Pod, metadata: {name: p}}\n",
         "document 1 item 2: Pod default/p: spec.nodeName is missing"),
    ],
)
def test_invalid_documents_name_file_document_and_problem(text: str, reason: str) -> None:
    with pytest.raises(InvalidObject) as caught:
        parse_documents(text, "dir/broken.yaml")
    assert caught.value.path == "dir/broken.yaml"
    assert reason in caught.value.reason
    assert str(caught.value).startswith("dir/broken.yaml: ")


# -- FileSource.load -------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_load_reads_yaml_files_recursively_and_skips_the_rest(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", NAMESPACE)
    write(tmp_path / "sub" / "deeper" / "b.yml", pod_yaml("b", "127.0.20.2"))
    write(tmp_path / "notes.txt", "not: yaml for us\n")
    write(tmp_path / ".hidden.yaml", pod_yaml("hidden", "127.0.20.3"))
    write(tmp_path / "..2024_01_01" / "c.yaml", pod_yaml("configmap-data", "127.0.20.4"))
    result = FileSource(tmp_path).load()
    assert result.errors == []
    assert list(result.objects.namespaces) == ["demo"]
    assert list(result.objects.pods) == ["demo/b"]


def test_load_of_missing_directory_reports_it(tmp_path: Path) -> None:
    result = FileSource(tmp_path / "nope").load()
    assert result.objects == ClusterObjects()
    assert result.errors == [SourceError(str(tmp_path / "nope"), "directory does not exist")]


def test_broken_file_keeps_its_last_good_objects(tmp_path: Path) -> None:
    source = FileSource(tmp_path)
    write(tmp_path / "ns.yaml", NAMESPACE)
    write(tmp_path / "pods.yaml", pod_yaml("a", "127.0.20.1"))
    assert list(source.load().objects.pods) == ["demo/a"]

    write(tmp_path / "pods.yaml", pod_yaml("a", "127.0.20.1") + "---\nkind: [oops\n")
    result = source.load()
    assert list(result.objects.pods) == ["demo/a"]
    assert list(result.objects.namespaces) == ["demo"]
    (error,) = result.errors
    assert error.path == str(tmp_path / "pods.yaml")
    assert error.reason.startswith("YAML syntax error at line")

    write(tmp_path / "pods.yaml", pod_yaml("b", "127.0.20.2"))
    result = source.load()
    assert list(result.objects.pods) == ["demo/b"]
    assert result.errors == []


def test_file_broken_from_the_start_contributes_nothing(tmp_path: Path) -> None:
    write(tmp_path / "bad.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    write(tmp_path / "good.yaml", NAMESPACE)
    result = FileSource(tmp_path).load()
    assert result.objects.count() == 1
    assert [e.path for e in result.errors] == [str(tmp_path / "bad.yaml")]
    assert "spec.nodeName is missing" in result.errors[0].reason


def test_not_utf8_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (error,) = FileSource(tmp_path).load().errors
    assert error.reason.startswith("not UTF-8 text")


def test_removed_file_removes_its_objects(tmp_path: Path) -> None:
    source = FileSource(tmp_path)
    write(tmp_path / "a.yaml", pod_yaml("a", "127.0.20.1"))
    write(tmp_path / "b.yaml", pod_yaml("b", "127.0.20.2"))
    assert sorted(source.load().objects.pods) == ["demo/a", "demo/b"]
    (tmp_path / "a.yaml").unlink()
    assert sorted(source.load().objects.pods) == ["demo/b"]


def test_duplicates_last_file_in_path_order_wins(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", pod_yaml("same", "127.0.20.1"))
    write(tmp_path / "b.yaml", pod_yaml("same", "127.0.20.2"))
    result = FileSource(tmp_path).load()
    assert result.objects.pods["demo/same"]["status"]["podIP"] == "127.0.20.2"
    assert result.errors == [
        SourceError(
            str(tmp_path / "b.yaml"),
            f"Pod demo/same is also defined in {tmp_path / 'a.yaml'}; this definition wins",
        )
    ]


def test_unknown_kind_warning_is_listed_but_file_is_used(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", NAMESPACE + "---\napiVersion: v1\nkind: ConfigMap\n"
          "metadata: {name: cm, namespace: demo}\n")
    result = FileSource(tmp_path).load()
    assert list(result.objects.namespaces) == ["demo"]
    (warning,) = result.errors
    assert warning.severity == "warning"
    assert "v1 ConfigMap 'cm'" in warning.reason


def test_same_size_rewrite_within_one_timestamp_tick_is_seen(tmp_path: Path) -> None:
    source = FileSource(tmp_path)
    path = tmp_path / "a.yaml"
    write(path, pod_yaml("a", "127.0.20.1"))
    before = path.stat()
    assert list(source.load().objects.pods) == ["demo/a"]
    write(path, pod_yaml("b", "127.0.20.1"))
    # Force the worst case: identical mtime and size.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert list(source.load().objects.pods) == ["demo/b"]


# -- FileSource.run --------------------------------------------------------------------------

POLL = 0.01


async def next_snapshot(receive: trio.MemoryReceiveChannel[ClusterObjects]) -> ClusterObjects:
    with trio.fail_after(2):
        return await receive.receive()


async def assert_quiet(receive: trio.MemoryReceiveChannel[ClusterObjects]) -> None:
    await trio.sleep(POLL * 10)
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


async def test_run_sends_a_snapshot_after_each_effective_change(tmp_path: Path) -> None:
    write(tmp_path / "ns.yaml", NAMESPACE)
    source = FileSource(tmp_path, poll_interval=POLL)
    send, receive = trio.open_memory_channel[ClusterObjects](10)
    async with trio.open_nursery() as nursery:
        initial = await nursery.start(source.run, send)
        assert list(initial.namespaces) == ["demo"]
        assert await next_snapshot(receive) == initial
        await assert_quiet(receive)

        write(tmp_path / "sub" / "pods.yaml", pod_yaml("a", "127.0.20.1"))
        assert list((await next_snapshot(receive)).pods) == ["demo/a"]

        write(tmp_path / "sub" / "pods.yaml", pod_yaml("a", "127.0.20.9"))
        changed = await next_snapshot(receive)
        assert changed.pods["demo/a"]["status"]["podIP"] == "127.0.20.9"

        # Touching or rewriting identical content is not a change.
        os.utime(tmp_path / "sub" / "pods.yaml")
        write(tmp_path / "ns.yaml", NAMESPACE)
        await assert_quiet(receive)

        # A broken edit keeps the file's last good objects and sends nothing.
        write(tmp_path / "sub" / "pods.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {}\n")
        await assert_quiet(receive)
        assert list(source.load().objects.pods) == ["demo/a"]

        # Fixing it is a change again.
        write(tmp_path / "sub" / "pods.yaml", pod_yaml("b", "127.0.20.2"))
        assert list((await next_snapshot(receive)).pods) == ["demo/b"]

        (tmp_path / "sub" / "pods.yaml").unlink()
        removed = await next_snapshot(receive)
        assert removed.pods == {}
        assert list(removed.namespaces) == ["demo"]
        nursery.cancel_scope.cancel()


async def test_run_with_unbuffered_channel_does_not_deadlock(tmp_path: Path) -> None:
    write(tmp_path / "ns.yaml", NAMESPACE)
    source = FileSource(tmp_path, poll_interval=POLL)
    send, receive = trio.open_memory_channel[ClusterObjects](0)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(2):
            await nursery.start(source.run, send)
        assert list((await next_snapshot(receive)).namespaces) == ["demo"]
        nursery.cancel_scope.cancel()


async def test_run_copes_with_the_directory_appearing_later(tmp_path: Path) -> None:
    directory = tmp_path / "later"
    source = FileSource(directory, poll_interval=POLL)
    send, receive = trio.open_memory_channel[ClusterObjects](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        assert await next_snapshot(receive) == ClusterObjects()
        write(directory / "ns.yaml", NAMESPACE)
        assert list((await next_snapshot(receive)).namespaces) == ["demo"]
        nursery.cancel_scope.cancel()


# -- the demo topology -----------------------------------------------------------------------


def test_demo_topology_loads_without_errors_and_translates() -> None:
    result = FileSource(DEMO).load()
    assert result.errors == []
    resources = translate(result.objects)
    workloads = {r.name: r for r in resources if isinstance(r, Workload)}
    summary = {
        name: (w.namespace, w.addresses, w.node, w.service_account, w.tunnel_protocol)
        for name, w in workloads.items()
    }
    assert summary == {
        "sleep": ("demo", ("127.0.20.1",), "node-1", "sleep", TunnelProtocol.HBONE),
        "notsleep": ("demo", ("127.0.20.2",), "node-1", "notsleep", TunnelProtocol.HBONE),
        "httpbin-v1": ("demo", ("127.0.20.3",), "node-2", "httpbin", TunnelProtocol.HBONE),
        "httpbin-v2": ("demo", ("127.0.20.4",), "node-2", "httpbin", TunnelProtocol.HBONE),
        "legacy-client": ("legacy", ("127.0.20.5",), "node-1", "default", TunnelProtocol.NONE),
        "reviews-v1": ("demo", ("127.0.20.6",), "node-2", "bookinfo-reviews",
                       TunnelProtocol.HBONE),
        "reviews-v2": ("demo", ("127.0.20.7",), "node-2", "bookinfo-reviews",
                       TunnelProtocol.HBONE),
        "reviews-shadow": ("demo", ("127.0.20.8",), "node-1", "bookinfo-reviews",
                           TunnelProtocol.HBONE),
        "ratings-v1": ("demo", ("127.0.20.9",), "node-2", "bookinfo-ratings",
                       TunnelProtocol.HBONE),
        "details-v1": ("demo", ("127.0.20.10",), "node-1", "bookinfo-details",
                       TunnelProtocol.HBONE),
        # The embedded waypoint (a Gateway with an address): its own workload, no node.
        "waypoint": ("demo", ("127.0.40.1",), "", "waypoint", TunnelProtocol.HBONE),
    }
    assert workloads["httpbin-v1"].services == (
        "demo/echo.demo.svc.cluster.local",
        "demo/httpbin.demo.svc.cluster.local",
    )
    assert workloads["httpbin-v1"].authorization_policies == ("demo/httpbin-allow-sleep",)
    assert workloads["httpbin-v2"].canonical_revision == "v2"
    services = {r.name: r for r in resources if isinstance(r, Service)}
    assert [(p.service_port, p.target_port) for p in services["echo"].ports] == [(9000, 9000)]
    assert services["httpbin"].addresses[0].address == "127.0.30.1"
    policies = {r.key for r in resources if isinstance(r, Authorization)}
    assert policies == {
        "demo/httpbin-allow-sleep",
        "demo/converted-peer-authentication-default",
    }
    nodes = {n["metadata"]["name"] for n in result.objects.nodes.values()}
    assert nodes == {"node-1", "node-2"}


# API groups defined by CRDs: kubernetes-validate has no schema for them (their own tests
# check them).
CRD_GROUPS = {
    "security.istio.io", "networking.istio.io", "gateway.networking.k8s.io",
    "policy.ambient-lite.io",
}


def _is_core(api_version: str) -> bool:
    group = api_version.rpartition("/")[0]
    return group not in CRD_GROUPS


def test_demo_core_objects_are_valid_kubernetes() -> None:
    """The demo must stay what users could kubectl apply (Istio CRDs are not in the schema
    set, so only core kinds are checked, strictly: no unknown fields)."""
    checked = 0
    for path in sorted(DEMO.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None or not _is_core(document["apiVersion"]):
                continue
            kubernetes_validate.validate(document, "1.30.0", strict=True)
            checked += 1
    assert checked >= 14



async def test_run_sends_a_change_that_a_concurrent_load_already_read(tmp_path: Path) -> None:
    write(tmp_path / "ns.yaml", NAMESPACE)
    source = FileSource(tmp_path, poll_interval=POLL)
    send, receive = trio.open_memory_channel[ClusterObjects](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        await next_snapshot(receive)
        write(tmp_path / "pods.yaml", pod_yaml("a", "127.0.20.1"))
        assert list(source.load().objects.pods) == ["demo/a"]
        assert list((await next_snapshot(receive)).pods) == ["demo/a"]
        nursery.cancel_scope.cancel()
