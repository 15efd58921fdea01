"""The waypoint controller's sans-IO parts: the objects, the drift check, the status, and the
leader election decision."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from istiod_lite.kube.leader import LeaseObservation, plan_lease_update
from istiod_lite.kube.waypoint_objects import (
    InvalidWaypoint,
    desired_objects,
    gateway_status,
    is_owned_by,
    needs_update,
    updated_object,
)
from waypoint.config import build_parser

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def waypoint_gateway(name: str = "waypoint", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "shop", "uid": "uid-1", "generation": 3},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            **spec,
        },
    }


def objects_by_kind(gateway: dict[str, Any]) -> dict[str, dict[str, Any]]:
    objs = desired_objects(gateway, image="ambient-lite:1",
                           istiod_address="istiod.istio-system.svc:15012",
                           trust_domain="example.org")
    return {obj["kind"]: obj for obj in objs}


def test_objects_are_owned_by_the_gateway_and_named_after_it() -> None:
    gateway = waypoint_gateway()
    objs = objects_by_kind(gateway)
    assert sorted(objs) == ["Deployment", "Service", "ServiceAccount"]
    for obj in objs.values():
        meta = obj["metadata"]
        assert (meta["name"], meta["namespace"]) == ("waypoint", "shop")
        assert meta["ownerReferences"] == [{
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": "waypoint",
            "uid": "uid-1", "controller": True, "blockOwnerDeletion": True,
        }]
        assert meta["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller"
        assert is_owned_by(obj, gateway)
    assert not is_owned_by(objs["Service"], {"metadata": {"uid": "someone-else"}})


def test_deployment_runs_the_waypoint_with_flags_it_accepts() -> None:
    deployment = objects_by_kind(waypoint_gateway())["Deployment"]
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "gateway.networking.k8s.io/gateway-name": "waypoint"}
    labels = template["metadata"]["labels"]
    assert labels["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    assert labels["istio.io/dataplane-mode"] == "none"
    pod = template["spec"]
    assert pod["serviceAccountName"] == "waypoint"
    [container] = pod["containers"]
    assert container["image"] == "ambient-lite:1"
    args = container["args"]
    assert args[0] == "waypoint"
    # The flags parse with the waypoint's own parser once Kubernetes substitutes $(POD_IP).
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in \
        container["env"]
    parsed = build_parser().parse_args(
        [arg.replace("$(POD_IP)", "10.1.2.3") for arg in args[1:]])
    assert (parsed.name, parsed.namespace, parsed.address) == ("waypoint", "shop", "10.1.2.3")
    assert parsed.xds_address == ("istiod.istio-system.svc", 15012)
    assert parsed.trust_domain == "example.org"
    assert str(parsed.root_cert) == "/var/run/secrets/istio/root-cert.pem"
    assert str(parsed.token_file) == "/var/run/secrets/tokens/istio-token"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/var/run/secrets/istio"]]["configMap"]["name"] == "istio-ca-root-cert"
    [source] = volumes[mounts["/var/run/secrets/tokens"]]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "istio-ca"
    assert source["serviceAccountToken"]["path"] == "istio-token"
    assert {p["containerPort"] for p in container["ports"]} == {15008, 15000, 15020, 15021}
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/healthz/ready", "port": 15021, "scheme": "HTTP"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert not security["allowPrivilegeEscalation"]
    assert container["resources"]["requests"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "15020"


def test_service_selects_the_pods_on_hbone_and_status_ports() -> None:
    service = objects_by_kind(waypoint_gateway())["Service"]
    assert service["spec"]["selector"] == {"gateway.networking.k8s.io/gateway-name": "waypoint"}
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert ports[15008]["name"] == "mesh" and ports[15008]["appProtocol"] == "hbone"
    assert ports[15021]["name"] == "status-port"


@pytest.mark.parametrize(
    ("gateway", "reason"),
    [
        (waypoint_gateway(listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}]),
         "ListenersNotValid"),
        (waypoint_gateway(listeners=[]), "ListenersNotValid"),
        (waypoint_gateway(name="my.waypoint"), "Invalid"),
    ],
)
def test_a_bad_gateway_is_refused_with_a_reason(gateway: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidWaypoint) as caught:
        desired_objects(gateway, image="i", istiod_address="x:1", trust_domain="t")
    assert caught.value.reason == reason
    status = gateway_status(gateway, None, None, now=NOW)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Accepted"]["status"] == "False"
    assert conditions["Accepted"]["reason"] == reason
    assert conditions["Accepted"]["message"] == caught.value.message
    assert conditions["Programmed"]["status"] == "False"
    assert "addresses" not in status


def test_not_a_waypoint_is_refused() -> None:
    gateway = waypoint_gateway(gatewayClassName="istio")
    with pytest.raises(InvalidWaypoint):
        desired_objects(gateway, image="i", istiod_address="x:1", trust_domain="t")


def test_status_pending_until_ready_and_addressed() -> None:
    gateway = waypoint_gateway()
    objs = objects_by_kind(gateway)
    deployment, service = copy.deepcopy(objs["Deployment"]), copy.deepcopy(objs["Service"])

    def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in status["conditions"]}

    missing = conditions(gateway_status(gateway, None, None, now=NOW))
    assert missing["Accepted"]["status"] == "True"
    assert missing["Accepted"]["observedGeneration"] == 3
    assert (missing["Programmed"]["status"], missing["Programmed"]["reason"]) == (
        "False", "Pending")

    no_ip = conditions(gateway_status(gateway, deployment, service, now=NOW))
    assert no_ip["Programmed"]["reason"] == "AddressNotAssigned"

    service["spec"]["clusterIP"] = "10.96.0.7"
    not_ready = gateway_status(gateway, deployment, service, now=NOW)
    assert conditions(not_ready)["Programmed"]["reason"] == "Pending"
    assert "ready replicas" in conditions(not_ready)["Programmed"]["message"]

    deployment["status"] = {"readyReplicas": 1}
    ready = gateway_status(gateway, deployment, service, now=NOW)
    programmed = conditions(ready)["Programmed"]
    assert (programmed["status"], programmed["reason"]) == ("True", "Programmed")
    assert "waypoint.shop.svc.cluster.local:15008" in programmed["message"]
    assert ready["addresses"] == [{"type": "IPAddress", "value": "10.96.0.7"}]

    conflict = conditions(gateway_status(gateway, deployment, service, now=NOW,
                                         conflict="Deployment shop/waypoint is not ours"))
    assert (conflict["Programmed"]["status"], conflict["Programmed"]["reason"]) == (
        "False", "NoResources")


def test_status_keeps_transition_times_and_foreign_conditions() -> None:
    gateway = waypoint_gateway()
    gateway["status"] = {"conditions": [
        {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "old",
         "observedGeneration": 2, "lastTransitionTime": "2020-01-01T00:00:00Z"},
        {"type": "Programmed", "status": "True", "reason": "Programmed", "message": "old",
         "observedGeneration": 2, "lastTransitionTime": "2020-01-01T00:00:00Z"},
        {"type": "Other", "status": "True", "reason": "X", "message": "",
         "lastTransitionTime": "2020-01-01T00:00:00Z"},
    ]}
    status = gateway_status(gateway, None, None, now=NOW)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Accepted"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    assert by_type["Programmed"]["lastTransitionTime"] == "2024-05-01T12:00:00Z"
    assert by_type["Other"]["reason"] == "X"
    # Computing again from the written status changes nothing: no needless status writes.
    gateway["status"] = status
    assert gateway_status(gateway, None, None, now=datetime(2030, 1, 1, tzinfo=UTC)) == status


def test_drift_is_what_we_set_not_what_the_server_added() -> None:
    desired = objects_by_kind(waypoint_gateway())["Deployment"]
    existing = copy.deepcopy(desired)
    existing["metadata"].update(resourceVersion="7", uid="d-1")
    existing["metadata"]["labels"]["team"] = "shop"
    existing["spec"]["replicas"] = 2
    existing["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/x"
    existing["status"] = {"readyReplicas": 2}
    assert not needs_update(existing, desired)

    existing["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    assert needs_update(existing, desired)
    repaired = updated_object(existing, desired)
    assert repaired["spec"]["template"]["spec"]["containers"][0]["image"] == "ambient-lite:1"
    assert repaired["metadata"]["resourceVersion"] == "7"
    assert repaired["spec"]["replicas"] == 2  # not ours: kept
    assert "status" not in repaired
    assert not needs_update(repaired, desired)


def test_service_cluster_ip_is_not_drift() -> None:
    desired = objects_by_kind(waypoint_gateway())["Service"]
    existing = copy.deepcopy(desired)
    existing["spec"]["clusterIP"] = "10.96.0.7"
    assert not needs_update(existing, desired)
    existing["spec"]["selector"] = {"app": "other"}
    assert needs_update(existing, desired)
    assert updated_object(existing, desired)["spec"]["clusterIP"] == "10.96.0.7"


# -- leader election --------------------------------------------------------------------


def test_lease_is_taken_when_missing_and_renewed_by_its_holder() -> None:
    first = plan_lease_update(None, identity="a", lease_duration=15, now_monotonic=0,
                              now_wall=NOW)
    assert first is not None
    assert first["holderIdentity"] == "a" and first["leaseTransitions"] == 0
    assert first["renewTime"] == "2024-05-01T12:00:00.000000Z"
    observed = LeaseObservation(first, "1", observed_at=0)
    renewed = plan_lease_update(observed, identity="a", lease_duration=15, now_monotonic=5,
                                now_wall=datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC))
    assert renewed is not None
    assert renewed["acquireTime"] == first["acquireTime"]
    assert renewed["renewTime"] == "2024-05-01T12:00:05.000000Z"


def test_a_held_lease_is_taken_only_after_it_expires_by_our_clock() -> None:
    held = {"holderIdentity": "a", "leaseDurationSeconds": 15, "leaseTransitions": 4,
            "renewTime": "1999-01-01T00:00:00.000000Z"}  # a skewed clock does not matter
    observed = LeaseObservation(held, "9", observed_at=100)
    assert plan_lease_update(observed, identity="b", lease_duration=15, now_monotonic=114,
                             now_wall=NOW) is None
    taken = plan_lease_update(observed, identity="b", lease_duration=15, now_monotonic=115.5,
                              now_wall=NOW)
    assert taken is not None
    assert taken["holderIdentity"] == "b" and taken["leaseTransitions"] == 5


def test_a_released_lease_is_free_at_once() -> None:
    released = {"holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": 1}
    taken = plan_lease_update(LeaseObservation(released, "3", observed_at=50), identity="b",
                              lease_duration=15, now_monotonic=50, now_wall=NOW)
    assert taken is not None and taken["holderIdentity"] == "b"
