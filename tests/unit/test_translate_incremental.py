"""IncrementalTranslator: successive snapshots give exactly what a fresh ``translate`` gives,
and a pods-only change re-translates only the pods it touched."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from ambient_api.model import Service, Workload
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate import IncrementalTranslator, translate
from istiod_lite.translate import incremental as incremental_module


def _meta(name: str, namespace: str | None, labels: dict[str, str] | None = None
          ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels or {})}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, labels)}


def node(name: str, zone: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": _meta(name, None, {"topology.kubernetes.io/zone": zone}),
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.10.1"}]}}


def pod(name: str, ip: str, labels: dict[str, str], *, ns: str = "demo",
        port_name: str = "web") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _meta(name, ns, labels),
            "spec": {"nodeName": "node-1", "serviceAccountName": "app",
                     "containers": [{"name": "app", "ports": [
                         {"name": port_name, "containerPort": 8000 + int(ip.rsplit(".")[-1])}]}]},
            "status": {"phase": "Running", "podIP": ip}}


def service(name: str, selector: dict[str, str], ip: str, target: int | str = 8080,
            *, ns: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, ns),
            "spec": {"selector": selector, "clusterIP": ip,
                     "ports": [{"name": "http", "port": 80, "targetPort": target}]}}


def policy(name: str, app: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": _meta(name, "demo"),
            "spec": {"selector": {"matchLabels": {"app": app}}, "action": "DENY",
                     "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}}


def cluster() -> dict[str, dict[str, Any]]:
    objects = [
        namespace("demo", {"istio.io/dataplane-mode": "ambient"}), namespace("other"),
        node("node-1", "a"),
        service("web", {"app": "web"}, "10.0.0.1"),
        service("named", {"app": "api"}, "10.0.0.2", target="web"),
        service("multi", {"app": "web", "tier": "front"}, "10.0.0.3"),
        service("elsewhere", {"app": "web"}, "10.0.0.4", ns="other"),
        policy("deny-web", "web"),
    ]
    objects += [pod(f"p{i}", f"127.0.20.{i + 1}", {"app": ("web", "api")[i % 2]})
                for i in range(6)]
    return {f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}": o
            for o in objects}


def snapshot(objects: dict[str, dict[str, Any]]) -> ClusterObjects:
    return ClusterObjects.from_objects(list(objects.values()))


def test_every_snapshot_of_a_random_change_sequence_equals_a_fresh_translation() -> None:
    rng = random.Random(7)
    objects = cluster()
    translator = IncrementalTranslator()
    assert translator.translate(snapshot(objects)) == translate(snapshot(objects))
    for step in range(120):
        pods = sorted(k for k in objects if k.startswith("Pod/"))
        choice = rng.randrange(8)
        if choice == 0:  # a new pod
            objects[f"Pod/demo/n{step}"] = pod(f"n{step}", f"127.0.21.{step + 1}",
                                               {"app": rng.choice(["web", "api", "none"])})
        elif choice == 1 and pods:  # a pod goes away
            del objects[rng.choice(pods)]
        elif choice in (2, 3) and pods:  # a pod changes (new dict, as a source hands over)
            key = rng.choice(pods)
            changed = copy.deepcopy(objects[key])
            changed["metadata"]["labels"]["app"] = rng.choice(["web", "api"])
            changed["metadata"]["labels"]["tier"] = rng.choice(["front", "back"])
            changed["spec"]["containers"][0]["ports"][0]["name"] = rng.choice(["web", "x"])
            objects[key] = changed
        elif choice == 4:  # a Service changes its selector
            changed = copy.deepcopy(objects["Service/demo/multi"])
            changed["spec"]["selector"] = {"app": rng.choice(["web", "api"])}
            objects["Service/demo/multi"] = changed
        elif choice == 5:  # the namespace leaves or joins the mesh
            mode = rng.choice(["ambient", "none"])
            objects["Namespace//demo"] = namespace("demo", {"istio.io/dataplane-mode": mode})
        elif choice == 6:  # a policy selects other pods
            objects["AuthorizationPolicy/demo/deny-web"] = policy("deny-web",
                                                                  rng.choice(["web", "api"]))
        # choice 7: nothing changed at all
        assert translator.translate(snapshot(objects)) == translate(snapshot(objects)), step


def test_a_pods_only_change_reuses_the_other_pods_workloads() -> None:
    objects = cluster()
    translator = IncrementalTranslator()
    before = {r.uid: r for r in translator.translate(snapshot(objects)) if isinstance(r, Workload)}
    objects["Pod/demo/p0"] = pod("p0", "127.0.20.99", {"app": "web"})
    objects["Pod/demo/fresh"] = pod("fresh", "127.0.20.50", {"app": "api"})
    after = {r.uid: r for r in translator.translate(snapshot(objects)) if isinstance(r, Workload)}
    assert after["Kubernetes//Pod/demo/p0"].addresses == ("127.0.20.99",)
    assert after["Kubernetes//Pod/demo/fresh"].services == (
        "demo/named.demo.svc.cluster.local",)
    untouched = [uid for uid in before if not uid.endswith(("/p0", "/fresh"))]
    assert untouched and all(after[uid] is before[uid] for uid in untouched)


def test_a_named_target_port_follows_its_pods_without_a_service_change() -> None:
    objects = {k: v for k, v in cluster().items() if not k.startswith("Pod/")}
    translator = IncrementalTranslator()

    def named_target() -> int:
        resources = translator.translate(snapshot(objects))
        named = next(r for r in resources if isinstance(r, Service) and r.name == "named")
        return named.ports[0].target_port

    assert named_target() == 80  # no pod: the Service port
    objects["Pod/demo/api"] = pod("api", "127.0.20.7", {"app": "api"})
    assert named_target() == 8007
    objects["Pod/demo/api"] = pod("api", "127.0.20.9", {"app": "api"})
    assert named_target() == 8009


def test_a_translation_that_raises_leaves_the_last_good_one_to_build_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = cluster()
    translator = IncrementalTranslator()
    translator.translate(snapshot(objects))
    objects["Pod/demo/p1"] = pod("p1", "127.0.20.77", {"app": "web"})

    def fail(*_args: object) -> list[object]:
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(incremental_module, "waypoint_resources", fail)
        with pytest.raises(RuntimeError):
            translator.translate(snapshot(objects))
    objects["Pod/demo/p2"] = pod("p2", "127.0.20.78", {"app": "api"})
    assert translator.translate(snapshot(objects)) == translate(snapshot(objects))
