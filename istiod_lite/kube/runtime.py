"""istiod_lite's Kubernetes mode, assembled: the pieces ``run_istiod`` needs, from a cluster.

- the CA from Secret ``cacerts`` (Istio's plug-in layout) or ``istio-ca-secret`` (created once
  with a self-signed root, so every replica and every restart shares it);
- proxies authenticated by TokenReview of their projected ServiceAccount tokens (node callers
  for the trusted node-agent accounts, service-account callers for the rest);
- the Kubernetes source feeding the same translation as the file source;
- leader-only duties, under a Lease: the waypoint controller and the root-certificate
  ConfigMaps. Discovery and the CA serve on every replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from kubernetes import client as kube_client

from istiod_lite.ca import CertificateAuthority
from istiod_lite.config import IstiodConfig, KubernetesMode
from istiod_lite.kube.cakeys import load_or_create_ca
from istiod_lite.kube.client import build_api_client
from istiod_lite.kube.leader import LeaderElector
from istiod_lite.kube.rootcert import RootCertPublisher, is_enrolled
from istiod_lite.kube.tokenreview import TokenReviewAuthenticator
from istiod_lite.kube.waypoints import WaypointController
from istiod_lite.sources.kubernetes import KubernetesSource
from istiod_lite.sources.objects import ClusterObjects

log = structlog.get_logger("istiod_lite.kube")


@dataclass
class KubernetesParts:
    api_client: kube_client.ApiClient
    ca: CertificateAuthority
    authenticator: TokenReviewAuthenticator
    source: KubernetesSource
    leader_duties: LeaderDuties


class LeaderDuties:
    """What only the elected replica does; ``on_snapshot`` keeps its view of namespaces."""

    def __init__(
        self, api_client: kube_client.ApiClient, mode: KubernetesMode, config: IstiodConfig,
        ca: CertificateAuthority,
    ) -> None:
        self._mode = mode
        self.leading = False
        self._namespaces: dict[str, dict[str, Any]] | None = None
        # The root goes to every enrolled namespace, and to istiod's own, where the ztunnel
        # DaemonSet mounts it from.
        self.publisher = RootCertPublisher(
            api_client, ca.trust_bundle,
            namespace_filter=lambda ns: is_enrolled(ns) or _name(ns) == mode.namespace,
        )
        self.controller = (
            WaypointController(
                api_client, image=mode.waypoint_image, trust_domain=config.trust_domain,
                cluster_id=config.cluster_id, root_namespace=config.root_namespace,
            )
            if mode.waypoint_image
            else None
        )
        self.elector = (
            LeaderElector(api_client, namespace=mode.namespace, identity=mode.pod_name)
            if mode.leader_election
            else None
        )

    async def on_snapshot(self, objects: ClusterObjects) -> None:
        self._namespaces = dict(objects.namespaces)
        if self.leading:
            await self._publish()

    async def _publish(self) -> None:
        if self._namespaces is None:
            return
        result = await self.publisher.reconcile(self._namespaces)
        if result.failed:
            log.warning("root certificate not published everywhere", failed=result.failed)

    async def _lead(self) -> None:
        self.leading = True
        log.info("leading: running the waypoint controller and root publication",
                 controller=self._mode.waypoint_image is not None)
        try:
            async with trio.open_nursery() as nursery:
                await self._publish()
                await nursery.start(self.publisher.run)
                if self.controller is not None:
                    await nursery.start(self.controller.run)
        finally:
            self.leading = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.elector is None:
            task_status.started()
            await self._lead()
            return
        await self.elector.run(self._lead, task_status=task_status)


def _name(namespace: Mapping[str, Any]) -> str:
    return str((namespace.get("metadata") or {}).get("name", ""))


async def kubernetes_parts(config: IstiodConfig) -> KubernetesParts:
    mode = config.kubernetes
    assert mode is not None
    api_client = build_api_client(
        kubeconfig=mode.kubeconfig, context=mode.context, in_cluster=mode.kubeconfig is None
    )
    ca = await load_or_create_ca(
        api_client, mode.namespace, trust_domain=config.trust_domain,
        default_ttl=config.cert_ttl, max_ttl=config.max_cert_ttl,
    )
    authenticator = TokenReviewAuthenticator(
        api_client, audiences=mode.token_audiences,
        trusted_node_accounts=mode.trusted_node_accounts, trust_domain=config.trust_domain,
    )
    return KubernetesParts(
        api_client, ca, authenticator, KubernetesSource(api_client),
        LeaderDuties(api_client, mode, config, ca),
    )

