"""ztunnel in-pod capture decisions without sockets: the netns map file, which pods get
rules and listeners, and what a change of config or map does to them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambient_api.model import TunnelProtocol, Workload
from ztunnel.capture.inpod import (
    NetnsMapError,
    PodTarget,
    ReconcilePlan,
    parse_netns_map,
    reconcile,
    wanted_pods,
)
from ztunnel.config import config_from_args

NODE = "node-1"


def pod(
    name: str,
    ip: str,
    *,
    node: str = NODE,
    protocol: TunnelProtocol = TunnelProtocol.HBONE,
    namespace: str = "demo",
) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{namespace}/{name}",
        name=name,
        namespace=namespace,
        addresses=(ip,),
        service_account=name,
        node=node,
        tunnel_protocol=protocol,
    )


def target(workload: Workload, path: str) -> PodTarget:
    return PodTarget(workload.uid, workload.addresses[0], Path(path))


SLEEP = pod("sleep", "10.244.1.2")
HTTPBIN = pod("httpbin", "10.244.1.3")
LEGACY = pod("legacy", "10.244.1.4", protocol=TunnelProtocol.NONE, namespace="legacy")
REMOTE = pod("remote", "10.244.2.2", node="node-2")


# -- the netns map file --------------------------------------------------------------------


def test_parse_netns_map_reads_uid_to_path() -> None:
    text = '{"Kubernetes//Pod/demo/sleep": "/var/run/netns/sleep", ' \
           '"Kubernetes//Pod/demo/httpbin": "/proc/42/ns/net"}'
    assert parse_netns_map(text) == {
        "Kubernetes//Pod/demo/sleep": Path("/var/run/netns/sleep"),
        "Kubernetes//Pod/demo/httpbin": Path("/proc/42/ns/net"),
    }


def test_an_empty_file_is_an_empty_map() -> None:
    assert parse_netns_map("") == {}
    assert parse_netns_map("  \n") == {}
    assert parse_netns_map("{}") == {}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("{not json", "not JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"": "/var/run/netns/x"}', "uid is empty"),
        ('{"Kubernetes//Pod/demo/sleep": 7}', "Kubernetes//Pod/demo/sleep"),
        ('{"Kubernetes//Pod/demo/sleep": ""}', "non-empty string"),
        ('{"Kubernetes//Pod/demo/sleep": "sleep"}', "not absolute"),
    ],
)
def test_a_broken_map_is_refused_naming_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(NetnsMapError, match=complaint):
        parse_netns_map(text)


# -- which pods are captured ----------------------------------------------------------------


def test_only_local_enrolled_pods_with_a_namespace_are_wanted() -> None:
    netns_map = {
        SLEEP.uid: Path("/var/run/netns/sleep"),
        LEGACY.uid: Path("/var/run/netns/legacy"),  # namespace not enrolled: untouched
        REMOTE.uid: Path("/var/run/netns/remote"),  # another node's pod: not ours
        "Kubernetes//Pod/demo/unknown": Path("/var/run/netns/unknown"),  # no config yet
    }
    wanted = wanted_pods([SLEEP, HTTPBIN, LEGACY, REMOTE], node=NODE, netns_map=netns_map)
    # httpbin is enrolled but the CNI stand-in has not told us its namespace yet.
    assert wanted == {SLEEP.uid: target(SLEEP, "/var/run/netns/sleep")}


def test_a_pod_without_an_ip_is_not_captured() -> None:
    no_ip = pod("starting", "not-an-ip")
    assert wanted_pods([no_ip], node=NODE, netns_map={no_ip.uid: Path("/run/netns/s")}) == {}


def test_ipv6_addresses_are_canonical() -> None:
    v6 = pod("v6", "fd00:0::0:1")
    wanted = wanted_pods([v6], node=NODE, netns_map={v6.uid: Path("/run/netns/v6")})
    assert wanted[v6.uid].ip == "fd00::1"


# -- reconcile ----------------------------------------------------------------------------


def test_new_pods_are_added_and_nothing_else_happens() -> None:
    sleep = target(SLEEP, "/run/netns/sleep")
    httpbin = target(HTTPBIN, "/run/netns/httpbin")
    netns_map = {SLEEP.uid: sleep.netns, HTTPBIN.uid: httpbin.netns}
    plan = reconcile({}, {SLEEP.uid: sleep, HTTPBIN.uid: httpbin}, netns_map)
    assert plan == ReconcilePlan(add=(httpbin, sleep))


def test_steady_state_is_an_empty_plan() -> None:
    sleep = target(SLEEP, "/run/netns/sleep")
    plan = reconcile({SLEEP.uid: sleep}, {SLEEP.uid: sleep}, {SLEEP.uid: sleep.netns})
    assert plan.empty


def test_a_pod_that_left_the_map_is_removed() -> None:
    sleep = target(SLEEP, "/run/netns/sleep")
    plan = reconcile({SLEEP.uid: sleep}, {}, {})
    assert plan == ReconcilePlan(remove=(sleep,))


def test_an_unenrolled_pod_is_removed_but_not_swept_again() -> None:
    # Still in the map (the pod lives on), no longer wanted (tunnel protocol NONE): its rules
    # go with the removal, so no separate sweep is planned for it.
    sleep = target(SLEEP, "/run/netns/sleep")
    plan = reconcile({SLEEP.uid: sleep}, {}, {SLEEP.uid: sleep.netns})
    assert plan == ReconcilePlan(remove=(sleep,))


def test_a_recreated_pod_is_removed_then_added() -> None:
    old = target(SLEEP, "/run/netns/sleep-1")
    new = PodTarget(SLEEP.uid, "10.244.1.9", Path("/run/netns/sleep-2"))
    plan = reconcile({SLEEP.uid: old}, {SLEEP.uid: new}, {SLEEP.uid: new.netns})
    assert plan == ReconcilePlan(remove=(old,), add=(new,))


def test_pods_in_the_map_we_do_not_serve_are_swept_once() -> None:
    # A previous ztunnel may have left rules in a pod that is no longer enrolled.
    legacy_path = Path("/run/netns/legacy")
    netns_map = {LEGACY.uid: legacy_path}
    assert reconcile({}, {}, netns_map).sweep == ((LEGACY.uid, legacy_path),)
    checked = reconcile({}, {}, netns_map, known_clean={(LEGACY.uid, legacy_path)})
    assert checked.empty
    # A new namespace for the same uid is checked again.
    moved = reconcile({}, {}, {LEGACY.uid: Path("/run/netns/legacy-2")},
                      known_clean={(LEGACY.uid, legacy_path)})
    assert moved.sweep == ((LEGACY.uid, Path("/run/netns/legacy-2")),)


def test_a_pod_waiting_for_a_retry_is_not_added_yet() -> None:
    sleep = target(SLEEP, "/run/netns/sleep")
    plan = reconcile({}, {SLEEP.uid: sleep}, {SLEEP.uid: sleep.netns}, retry_later={sleep})
    assert plan.empty


def test_enrolling_live_adds_the_pod_that_was_swept() -> None:
    sleep = target(SLEEP, "/run/netns/sleep")
    plan = reconcile({}, {SLEEP.uid: sleep}, {SLEEP.uid: sleep.netns},
                     known_clean={(SLEEP.uid, sleep.netns)})
    assert plan == ReconcilePlan(add=(sleep,))


# -- flags ----------------------------------------------------------------------------------


@pytest.fixture
def base_args(tmp_path: Path) -> list[str]:
    root_cert = tmp_path / "root.pem"
    root_cert.write_text("-----BEGIN CERTIFICATE-----\n")
    return ["--node", NODE, "--node-address", "127.0.10.1", "--xds-address",
            "127.0.9.1:15012", "--root-cert", str(root_cert), "--token", "t" * 20]


def test_capture_defaults_to_none(base_args: list[str]) -> None:
    config = config_from_args(base_args)
    assert config.capture == "none"
    assert config.netns_map is None


def test_capture_inpod_reads_the_netns_map_flag(base_args: list[str], tmp_path: Path) -> None:
    config = config_from_args([*base_args, "--capture", "inpod",
                               "--netns-map", str(tmp_path / "netns.json")])
    assert config.capture == "inpod"
    assert config.netns_map == tmp_path / "netns.json"


def test_capture_inpod_without_a_map_is_refused(
    base_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        config_from_args([*base_args, "--capture", "inpod"])
    assert "--netns-map" in capsys.readouterr().err


def test_a_map_without_capture_is_refused(
    base_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        config_from_args([*base_args, "--netns-map", "/tmp/netns.json"])
    assert "--capture inpod" in capsys.readouterr().err


def test_annotated_port_exclusions_reach_the_pod_target_and_a_change_reapplies() -> None:
    import dataclasses

    excluded = dataclasses.replace(SLEEP, capture_exclude_inbound_ports=(9090,),
                                   capture_exclude_outbound_ports=(5432, 6379))
    netns_map = {SLEEP.uid: Path("/run/netns/sleep")}
    (wanted,) = wanted_pods([excluded], node=NODE, netns_map=netns_map).values()
    assert wanted.exclude_inbound_ports == (9090,)
    assert wanted.exclude_outbound_ports == (5432, 6379)
    # Serving the pod without exclusions, the new annotation means re-applying its rules.
    plan = reconcile({SLEEP.uid: target(SLEEP, "/run/netns/sleep")}, {SLEEP.uid: wanted},
                     netns_map, known_clean=set(), retry_later=set())
    assert [t.uid for t in plan.remove] == [SLEEP.uid] and list(plan.add) == [wanted]
