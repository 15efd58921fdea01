"""The mesh-wide settings every translator reads, in a module of their own so that the
translators and the code that drives them import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeshConfig:
    """Mesh-wide settings istiod would take from its MeshConfig and flags.

    ``cluster_id`` is stamped on every Workload and Node (proxies report it as the
    ``source_cluster``/``destination_cluster`` of their metrics); ``root_namespace`` is
    Istio's ``rootNamespace``: policies there apply mesh-wide."""

    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    network: str = ""
    root_namespace: str = "istio-system"
    cluster_domain: str = "cluster.local"
