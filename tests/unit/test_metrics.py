"""Istio's TCP metric names and labels, from the label function to the exposition text."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ambient_api.identity import SpiffeId
from ambient_api.model import NetworkAddress, Service, TunnelProtocol, Workload
from ambient_dataplane.labels import LABEL_NAMES, ConnectionLabels, connection_labels
from ztunnel.metrics import ZtunnelMetrics

SLEEP = Workload(
    uid="Kubernetes//Pod/default/sleep-1",
    name="sleep-1",
    namespace="default",
    addresses=("127.0.20.1",),
    service_account="sleep",
    node="node-1",
    canonical_name="sleep",
    canonical_revision="v1",
    workload_name="sleep",
)
HTTPBIN = Workload(
    uid="Kubernetes//Pod/apps/httpbin-1",
    name="httpbin-1",
    namespace="apps",
    addresses=("127.0.20.2",),
    service_account="httpbin",
    node="node-2",
    cluster_id="east",
)
HTTPBIN_SERVICE = Service(
    name="httpbin",
    namespace="apps",
    hostname="httpbin.apps.svc.cluster.local",
    addresses=(NetworkAddress("", "10.0.0.7"),),
)
SLEEP_ID = SpiffeId("cluster.local", "default", "sleep")

ISTIO_LABELS = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
]


def test_label_names_are_istios() -> None:
    assert list(LABEL_NAMES) == ISTIO_LABELS


def test_outbound_mtls_labels() -> None:
    labels = connection_labels(
        "source", SLEEP, SLEEP_ID, HTTPBIN, HTTPBIN_SERVICE, mtls=True
    )
    assert labels == ConnectionLabels(
        reporter="source",
        source_workload="sleep",
        source_canonical_service="sleep",
        source_canonical_revision="v1",
        source_workload_namespace="default",
        source_principal="spiffe://cluster.local/ns/default/sa/sleep",
        source_app="sleep",
        source_version="v1",
        source_cluster="Kubernetes",
        destination_workload="httpbin-1",  # no workload_name: the pod name
        destination_workload_namespace="apps",
        destination_principal="spiffe://cluster.local/ns/apps/sa/httpbin",
        destination_service="httpbin.apps.svc.cluster.local",
        destination_service_name="httpbin",
        destination_service_namespace="apps",
        destination_canonical_service="httpbin-1",
        destination_canonical_revision="latest",
        destination_cluster="east",
        request_protocol="tcp",
        response_flags="-",
        connection_security_policy="mutual_tls",
    )


def test_plaintext_inbound_from_outside_the_mesh_knows_no_principals() -> None:
    labels = connection_labels("destination", None, None, HTTPBIN, None, mtls=False)
    assert labels.reporter == "destination"
    assert labels.source_workload == "unknown"
    assert labels.source_principal == "unknown"
    assert labels.destination_principal == "unknown"
    assert labels.destination_service == "127.0.20.2"  # pod targeted directly
    assert labels.destination_service_name == "unknown"
    assert labels.connection_security_policy == "unknown"


def test_destination_outside_the_mesh_has_no_principal() -> None:
    legacy = Workload(
        uid="u", name="legacy", namespace="old", addresses=("127.0.20.9",),
        service_account="default", node="n", tunnel_protocol=TunnelProtocol.NONE,
    )
    labels = connection_labels("source", SLEEP, SLEEP_ID, legacy, None, mtls=True,
                               response_flags="UF")
    assert labels.destination_principal == "unknown"
    assert labels.response_flags == "UF"


def test_bad_reporter_is_refused() -> None:
    with pytest.raises(ValueError, match="reporter"):
        connection_labels("sidecar", None, None, None, None, mtls=False)  # type: ignore[arg-type]


def samples(metrics: ZtunnelMetrics) -> dict[tuple[str, str], float]:
    """(sample name, reporter) -> value, from the exposition text."""
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, sample.labels["reporter"])] = sample.value
            assert set(sample.labels) == set(ISTIO_LABELS)
    return found


def test_exposition_has_istio_names_and_values() -> None:
    metrics = ZtunnelMetrics()
    outbound = connection_labels("source", SLEEP, SLEEP_ID, HTTPBIN, HTTPBIN_SERVICE, mtls=True)
    inbound = connection_labels("destination", SLEEP, SLEEP_ID, HTTPBIN, HTTPBIN_SERVICE,
                                mtls=True)
    metrics.connection_opened(outbound)
    metrics.connection_opened(outbound)
    metrics.connection_opened(inbound)
    metrics.bytes_transferred(outbound, sent=100, received=0)
    metrics.connection_closed(outbound, sent=23, received=4000)

    assert samples(metrics) == {
        ("istio_tcp_connections_opened_total", "source"): 2,
        ("istio_tcp_connections_opened_total", "destination"): 1,
        ("istio_tcp_connections_closed_total", "source"): 1,
        ("istio_tcp_connections_closed_total", "destination"): 0,
        ("istio_tcp_sent_bytes_total", "source"): 123,
        ("istio_tcp_sent_bytes_total", "destination"): 0,
        ("istio_tcp_received_bytes_total", "source"): 4000,
        ("istio_tcp_received_bytes_total", "destination"): 0,
    }
    text = metrics.render().decode()
    assert "# TYPE istio_tcp_connections_opened_total counter" in text
    assert "_created" not in text
    (sent_line,) = [
        line for line in text.splitlines()
        if line.startswith("istio_tcp_sent_bytes_total{") and 'reporter="source"' in line
    ]
    assert sent_line.endswith("} 123.0")
    for pair in (
        'source_principal="spiffe://cluster.local/ns/default/sa/sleep"',
        'destination_service="httpbin.apps.svc.cluster.local"',
        'request_protocol="tcp"',
        'connection_security_policy="mutual_tls"',
    ):
        assert pair in sent_line


def test_each_ztunnel_has_its_own_registry() -> None:
    first, second = ZtunnelMetrics(), ZtunnelMetrics()
    labels = connection_labels("source", SLEEP, SLEEP_ID, None, None, mtls=False)
    first.connection_opened(labels)
    assert samples(first)[("istio_tcp_connections_opened_total", "source")] == 1
    assert samples(second) == {}


def test_negative_byte_counts_are_refused() -> None:
    metrics = ZtunnelMetrics()
    labels = connection_labels("source", None, None, None, None, mtls=False)
    with pytest.raises(ValueError, match="negative"):
        metrics.connection_closed(labels, sent=-1)
