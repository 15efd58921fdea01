"""Kubernetes objects -> the L4 wire model (Workloads, Services, Authorizations, Nodes).

This is what istiod does for ztunnel, reduced to what an L4 node proxy needs. Decisions worth
knowing (Istio's behaviour unless said otherwise):

* A pod is a Workload once it has ``status.podIP``; pods that finished (``Succeeded``/
  ``Failed``) are left out because their IP may already belong to another pod. A pod is
  HEALTHY unless its phase is not ``Running`` (a missing phase reads as ``Running``, for
  hand-written files), a ``Ready`` condition is ``False`` or it is being deleted.
* HBONE only for pods in a namespace labelled ``istio.io/dataplane-mode=ambient`` whose own
  label is not ``istio.io/dataplane-mode=none`` (and not ``hostNetwork`` pods).
* Principals are kept exactly as Istio users write them: *without* the ``spiffe://`` scheme,
  e.g. ``cluster.local/ns/demo/sa/sleep`` (a leading ``spiffe://`` is stripped). A proxy
  matches them against its peer's SPIFFE id with the scheme removed. Source
  ``serviceAccounts: [ns/sa]`` (or a bare ``sa``: the policy's namespace) become principals
  ``<trust domain>/ns/<ns>/sa/<sa>``.
* AuthorizationPolicy is enforced at L4 (rules: ``authorization.py``): an ALLOW rule that
  needs HTTP-only attributes is dropped, since it can never match (fail closed); in a DENY
  rule those attributes are ignored, so it denies more. AUDIT policies (they decide nothing)
  and policies with ``targetRefs`` (waypoint policies) are not translated. A policy with a
  selector in the root namespace selects workloads of every namespace.
* **No translation error widens access** (a deliberate difference from Istio, whose
  validating webhook keeps such policies out): a broken ALLOW rule is dropped and a broken
  part of a DENY rule left out (as for HTTP-only attributes); ``rules`` that are not a list
  leave an ALLOW policy without rules (it allows nothing: the workloads it selects now need
  another ALLOW policy) and make a DENY one deny everything it selects; an unknown action
  denies everything; a selector that cannot be read makes the policy namespace-wide
  (mesh-wide in the root namespace), since the workloads it meant are among those, and an
  ALLOW one then has no rules (its rules would add to the other workloads' ALLOW policies,
  widening them; without rules it only takes away). Each
  error is logged (``policy not translated as written; failing closed``: the policy, the
  field, the reason, the effect) and kept in ``policy_errors`` for istiod's metrics.
* ``action: CUSTOM`` needs an ext_authz provider, which istiod_lite does not have: the
  policy becomes a DENY of what its rules match (HTTP-only parts left out, so it denies
  more), as Istio's sidecar builder does for a CUSTOM policy whose provider it cannot use
  ("will generate deny configs"). Istio's ambient translation drops CUSTOM at ztunnel
  instead, which fails open; we do not. Logged once per policy (``CUSTOM needs an
  ext_authz provider; denying``).
* PeerAuthentication STRICT -> a DENY Authorization ``converted-peer-authentication-<name>``
  matching peers without an authenticated principal. PERMISSIVE/UNSET produce nothing;
  DISABLE is not supported yet (it produces nothing, so a broader STRICT still applies, as
  does a broader STRICT over a narrower PERMISSIVE); ``portLevelMtls`` is ignored with a
  warning.
* A named ``targetPort`` is resolved against the first selected pod (sorted by key) that
  declares that container port name; the model carries one mapping per Service port.
* UDP/SCTP Service ports are left out: the data plane proxies TCP only.
* ``istio.io/use-waypoint`` (object, else namespace; ``none`` opts out) sets a waypoint only
  if it names an existing ``istio-waypoint`` Gateway (else logged) whose
  ``istio.io/waypoint-for`` takes that traffic: ``service`` (default) -> Services,
  ``workload`` -> Workloads, ``all`` -> both, ``none`` -> neither. The waypoint's own pods and
  Service (labelled ``gateway.networking.k8s.io/gateway-name``) never get one.

``L4Translator`` converts one object at a time (``incremental.py`` decides which objects
need it); AuthorizationPolicy rules are converted in ``authorization.py``. A broken object
never stops translation: it is skipped with a logged warning, except that a broken policy
fails closed (above).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from ambient_api.model import (
    Authorization,
    AuthorizationAction,
    AuthorizationScope,
    Clause,
    GatewayAddress,
    Match,
    NetworkAddress,
    Node,
    PortMapping,
    Rule,
    Service,
    TunnelProtocol,
    Workload,
)
from istiod_lite.labels import (
    AMBIENT,
    DATAPLANE_MODE_LABEL,
    GATEWAY_NAME_LABEL,
    NETWORK_LABEL,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
)
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate.authorization import l4_rules
from istiod_lite.translate.common import (
    AUTHORIZATION_POLICY,
    CUSTOM_DENIED,
    PolicyError,
    check_selector,
    custom_provider,
    labels_of,
    name_of,
    namespace_of,
    record_policy_error,
    selector_matches,
    service_hostname,
)
from istiod_lite.translate.mesh import MeshConfig
from istiod_lite.translate.waypoints import waypoint_for, waypoint_gateway
from istiod_lite.translate.workload_fields import (
    CANONICAL_NAME_LABELS,
    CANONICAL_REVISION_LABELS,
    EXCLUDE_INBOUND_ANNOTATION,
    EXCLUDE_OUTBOUND_ANNOTATION,
    app_protocol,
    first_label,
    locality,
    pod_status,
    port_list_annotation,
    target_port,
    workload_owner,
)

logger = structlog.get_logger(__name__)

CONVERTED_PEER_AUTHENTICATION_PREFIX = "converted-peer-authentication-"
PEER_AUTHENTICATION = "PeerAuthentication"


@dataclass(frozen=True)
class SelectorPolicy:
    """A WORKLOAD_SELECTOR Authorization with what it selects."""

    key: str
    namespace: str
    selector: Mapping[str, Any]
    all_namespaces: bool

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if not self.all_namespaces and namespace != self.namespace:
            return False
        return selector_matches(self.selector, labels)


class L4Translator:
    """Converts one object at a time, given the rest of the cluster (with indexes built once
    per snapshot, so that matching pods and Services is not a scan of either)."""

    def __init__(
        self, objects: ClusterObjects, mesh: MeshConfig, selector_policies: list[SelectorPolicy]
    ) -> None:
        self.objects = objects
        self.mesh = mesh
        self.selector_policies = selector_policies
        self.policy_errors: list[PolicyError] = []
        self._services_by_label = _index_by_selector(objects.services)
        self._pods_by_label: dict[tuple[str, str, str], list[str]] | None = None

    def _namespace_labels(self, namespace: str) -> dict[str, str]:
        return labels_of(self.objects.namespaces.get(namespace) or {})

    # -- nodes --------------------------------------------------------------------------

    def node(self, node: dict[str, Any]) -> Node | None:
        addresses = (node.get("status") or {}).get("addresses") or []
        internal = [a["address"] for a in addresses if a.get("type") == "InternalIP"]
        if not internal:
            logger.warning("node has no InternalIP address; left out", node=name_of(node))
            return None
        return Node(
            name=name_of(node),
            address=internal[0],
            cluster_id=self.mesh.cluster_id,
            locality=locality(labels_of(node)),
        )

    # -- services -----------------------------------------------------------------------

    def service(self, service: dict[str, Any]) -> Service | None:
        name, namespace = name_of(service), namespace_of(service)
        spec = service.get("spec") or {}
        if spec.get("type") == "ExternalName":
            return None
        cluster_ips = list(spec.get("clusterIPs") or [])
        if spec.get("clusterIP") and spec["clusterIP"] not in cluster_ips:
            cluster_ips.insert(0, spec["clusterIP"])
        addresses = tuple(
            NetworkAddress(network=self.mesh.network, address=ip)
            for ip in cluster_ips
            if ip not in ("", "None")
        )
        ports = []
        for port in spec.get("ports") or []:
            if str(port.get("protocol", "TCP")).upper() != "TCP":
                continue
            ports.append(
                PortMapping(
                    service_port=int(port["port"]),
                    target_port=target_port(port, lambda: self._pods_selected_by(service)),
                    app_protocol=app_protocol(port),
                )
            )
        labels = labels_of(service)
        waypoint = None
        if GATEWAY_NAME_LABEL not in labels:
            waypoint = self._waypoint(labels, namespace, "service", f"Service {namespace}/{name}")
        return Service(
            name=name,
            namespace=namespace,
            hostname=service_hostname(name, namespace, self.mesh),
            addresses=addresses,
            ports=tuple(ports),
            waypoint=waypoint,
        )

    def _pods_selected_by(self, service: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The pods ``service`` selects, sorted by key."""
        selector = (service.get("spec") or {}).get("selector") or {}
        if not selector:
            return []
        if self._pods_by_label is None:
            self._pods_by_label = _index_by_labels(self.objects.pods)
        namespace = namespace_of(service)
        candidates = min(
            (self._pods_by_label.get((namespace, k, v), []) for k, v in selector.items()),
            key=len,
        )
        pods = self.objects.pods
        return [
            pods[key]
            for key in candidates
            if all(labels_of(pods[key]).get(k) == v for k, v in selector.items())
        ]

    def _services_selecting(self, namespace: str, labels: Mapping[str, str]) -> list[str]:
        """The names of the Services of ``namespace`` whose selector ``labels`` satisfy, in
        key order."""
        found = set()
        for label, value in labels.items():
            for key, selector in self._services_by_label.get((namespace, label, value), ()):
                if all(labels.get(k) == v for k, v in selector.items()):
                    found.add(key)
        return [name_of(self.objects.services[key]) for key in sorted(found)]

    def _waypoint(
        self,
        labels: Mapping[str, str],
        namespace: str,
        traffic: Literal["service", "workload"],
        subject: str,
    ) -> GatewayAddress | None:
        """From the object's own ``istio.io/use-waypoint`` label (``none`` opts out), else the
        namespace's; ``istio.io/use-waypoint-namespace`` on the same object names another
        namespace's waypoint. The named Gateway must exist, be an ``istio-waypoint`` and take
        this ``traffic`` (its ``istio.io/waypoint-for``), else there is no waypoint."""
        source = labels
        if USE_WAYPOINT_LABEL not in labels:
            source = self._namespace_labels(namespace)
        waypoint = source.get(USE_WAYPOINT_LABEL, "")
        if not waypoint or waypoint == "none":
            return None
        waypoint_namespace = source.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace
        gateway = waypoint_gateway(self.objects, waypoint_namespace, waypoint)
        if gateway is None:
            logger.warning(
                "istio.io/use-waypoint names no istio-waypoint Gateway; no waypoint used",
                object=subject,
                gateway=f"{waypoint_namespace}/{waypoint}",
            )
            return None
        if waypoint_for(gateway) not in (traffic, "all"):
            logger.debug(
                "waypoint does not take this traffic (istio.io/waypoint-for)",
                object=subject,
                gateway=f"{waypoint_namespace}/{waypoint}",
            )
            return None
        return GatewayAddress(
            destination=service_hostname(waypoint, waypoint_namespace, self.mesh)
        )

    # -- workloads ----------------------------------------------------------------------

    def workload(self, pod: dict[str, Any]) -> Workload | None:
        name, namespace = name_of(pod), namespace_of(pod)
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        pod_ip = status.get("podIP")
        phase = status.get("phase", "Running")
        if not pod_ip or phase in ("Succeeded", "Failed"):
            return None
        addresses = [pod_ip]
        for entry in status.get("podIPs") or []:
            if entry.get("ip") and entry["ip"] not in addresses:
                addresses.append(entry["ip"])
        labels = labels_of(pod)
        namespace_labels = self._namespace_labels(namespace)
        ambient = (
            namespace_labels.get(DATAPLANE_MODE_LABEL) == AMBIENT
            and labels.get(DATAPLANE_MODE_LABEL) != "none"
            and not spec.get("hostNetwork", False)
        )
        workload_type, workload_name = workload_owner(pod)
        node_name = spec["nodeName"]
        node = self.objects.nodes.get(node_name) or {}
        waypoint = None
        if GATEWAY_NAME_LABEL not in labels:
            waypoint = self._waypoint(labels, namespace, "workload", f"Pod {namespace}/{name}")
        services = tuple(
            f"{namespace}/{service_hostname(service_name, namespace, self.mesh)}"
            for service_name in self._services_selecting(namespace, labels)
        )
        policies = tuple(
            p.key for p in self.selector_policies if p.selects(namespace, labels)
        )
        return Workload(
            uid=f"{self.mesh.cluster_id}//Pod/{namespace}/{name}",
            name=name,
            namespace=namespace,
            addresses=tuple(addresses),
            service_account=spec.get("serviceAccountName") or "default",
            node=node_name,
            trust_domain=self.mesh.trust_domain,
            network=labels.get(NETWORK_LABEL)
            or namespace_labels.get(NETWORK_LABEL)
            or self.mesh.network,
            cluster_id=self.mesh.cluster_id,
            tunnel_protocol=TunnelProtocol.HBONE if ambient else TunnelProtocol.NONE,
            status=pod_status(pod),
            locality=locality(labels_of(node)),
            canonical_name=first_label(labels, CANONICAL_NAME_LABELS) or workload_name,
            canonical_revision=first_label(labels, CANONICAL_REVISION_LABELS) or "latest",
            workload_type=workload_type,
            workload_name=workload_name,
            waypoint=waypoint,
            services=services,
            authorization_policies=policies,
            capture_exclude_inbound_ports=port_list_annotation(pod, EXCLUDE_INBOUND_ANNOTATION),
            capture_exclude_outbound_ports=port_list_annotation(
                pod, EXCLUDE_OUTBOUND_ANNOTATION
            ),
        )

    # -- authorization ------------------------------------------------------------------

    def _scope(self, namespace: str, selector: Mapping[str, Any] | None) -> AuthorizationScope:
        if _has_selector(selector):
            return AuthorizationScope.WORKLOAD_SELECTOR
        if namespace == self.mesh.root_namespace:
            return AuthorizationScope.GLOBAL
        return AuthorizationScope.NAMESPACE

    def _usable_selector(
        self, kind: str, where: str, spec: Mapping[str, Any], effect: str
    ) -> tuple[Any, bool]:
        """(the policy's selector, True), or (None, False) when it cannot be read: the
        policy then covers its namespace (the mesh, in the root namespace), which holds the
        workloads it meant, instead of vanishing."""
        selector = spec.get("selector")
        try:
            check_selector(selector)
        except ValueError as exc:
            record_policy_error(self.policy_errors, f"{kind} {where}", "spec.selector",
                                str(exc), effect)
            return None, False
        return selector, True

    def _register_selector(
        self, authorization: Authorization, selector: Mapping[str, Any] | None,
        *, root_applies_everywhere: bool,
    ) -> None:
        if authorization.scope is AuthorizationScope.WORKLOAD_SELECTOR and selector:
            self.selector_policies.append(
                SelectorPolicy(
                    key=authorization.key,
                    namespace=authorization.namespace,
                    selector=selector,
                    all_namespaces=root_applies_everywhere
                    and authorization.namespace == self.mesh.root_namespace,
                )
            )

    def authorization(self, policy: dict[str, Any]) -> Authorization | None:
        """The policy for ztunnel, None for a waypoint's. One whose translation fails (even
        unexpectedly) denies all traffic of its namespace: a policy never just vanishes."""
        try:
            return self._authorization(policy)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return self._deny_namespace(policy, "spec", f"{type(exc).__name__}: {exc}")

    def _deny_namespace(self, policy: dict[str, Any], field: str, reason: str) -> Authorization:
        name, namespace = name_of(policy), namespace_of(policy)
        record_policy_error(self.policy_errors, f"{AUTHORIZATION_POLICY} {namespace}/{name}",
                            field, reason, "denies all traffic of its namespace")
        return Authorization(name, namespace, self._scope(namespace, None),
                             AuthorizationAction.DENY, (Rule(),))

    def _authorization(self, policy: dict[str, Any]) -> Authorization | None:
        name, namespace = name_of(policy), namespace_of(policy)
        where = f"{namespace}/{name}"
        spec = policy.get("spec") or {}
        if not isinstance(spec, Mapping):
            return self._deny_namespace(policy, "spec", "must be a mapping")
        if spec.get("targetRefs") or spec.get("targetRef"):
            logger.debug("policy targets a waypoint; not for ztunnel", policy=where)
            return None
        action_name = spec.get("action", "ALLOW")
        if action_name == "AUDIT":
            # AUDIT only reports; not enforcing it changes no decision (Istio: ztunnel does
            # not support it either).
            logger.warning("authorization policy action not supported; policy ignored",
                           policy=where, action=action_name)
            return None
        if action_name in ("ALLOW", "DENY", "CUSTOM"):
            custom = action_name == "CUSTOM"
            if custom:
                logger.warning(CUSTOM_DENIED, policy=where, provider=custom_provider(spec))
            action = AuthorizationAction.DENY if custom else AuthorizationAction(action_name)
            rules = l4_rules(spec, action, where, namespace, self.mesh, self.policy_errors,
                             quiet=custom)
        else:
            record_policy_error(self.policy_errors, f"{AUTHORIZATION_POLICY} {where}",
                                "spec.action",
                                f"{action_name!r} is not ALLOW, DENY, AUDIT or CUSTOM",
                                "denies everything it selects")
            action, rules = AuthorizationAction.DENY, [Rule()]
        allow = action is AuthorizationAction.ALLOW
        selector, selector_usable = self._usable_selector(
            AUTHORIZATION_POLICY, where, spec,
            # Its rules OR'd into the other workloads' ALLOW policies would widen theirs.
            "applies to its whole namespace, allowing nothing" if allow
            else "applies to its whole namespace",
        )
        if allow and not selector_usable:
            rules = []
        authorization = Authorization(
            name=name,
            namespace=namespace,
            scope=self._scope(namespace, selector),
            action=action,
            rules=tuple(rules),
        )
        self._register_selector(authorization, selector, root_applies_everywhere=True)
        return authorization

    def peer_authentication(self, peer_authentication: dict[str, Any]) -> Authorization | None:
        name, namespace = name_of(peer_authentication), namespace_of(peer_authentication)
        spec = peer_authentication.get("spec") or {}
        if spec.get("portLevelMtls"):
            logger.warning(
                "PeerAuthentication portLevelMtls is not supported; ignored",
                policy=f"{namespace}/{name}",
            )
        mode = (spec.get("mtls") or {}).get("mode", "UNSET")
        if mode == "DISABLE":
            logger.warning(
                "PeerAuthentication mode DISABLE is not supported yet; ignored",
                policy=f"{namespace}/{name}",
            )
        if mode != "STRICT":
            return None
        selector, _ = self._usable_selector(
            PEER_AUTHENTICATION, f"{namespace}/{name}", spec, "applies to its whole namespace"
        )
        authorization = Authorization(
            name=f"{CONVERTED_PEER_AUTHENTICATION_PREFIX}{name}",
            namespace=namespace,
            scope=self._scope(namespace, selector),
            action=AuthorizationAction.DENY,
            rules=(Rule(clauses=(Clause(matches=(Match(not_principals=("*",)),)),)),),
        )
        self._register_selector(authorization, selector, root_applies_everywhere=False)
        return authorization


def _has_selector(selector: Mapping[str, Any] | None) -> bool:
    return bool(selector and (selector.get("matchLabels") or selector.get("matchExpressions")))


def _index_by_selector(
    services: Mapping[str, Mapping[str, Any]],
) -> dict[tuple[str, str, str], list[tuple[str, Mapping[str, str]]]]:
    """(namespace, label, value) -> the Services (key, selector) whose selector requires that
    label, by its first entry: a pod's candidates are then those under one of its labels. A
    Service without a selector selects nothing and is not indexed."""
    index: dict[tuple[str, str, str], list[tuple[str, Mapping[str, str]]]] = {}
    for key in sorted(services):
        selector = (services[key].get("spec") or {}).get("selector") or {}
        if selector:
            label, value = next(iter(selector.items()))
            index.setdefault((namespace_of(services[key]), label, value), []).append(
                (key, selector)
            )
    return index


def _index_by_labels(
    objects: Mapping[str, Mapping[str, Any]],
) -> dict[tuple[str, str, str], list[str]]:
    """(namespace, label, value) -> the keys of the objects carrying that label, sorted."""
    index: dict[tuple[str, str, str], list[str]] = {}
    for key in sorted(objects):
        namespace = namespace_of(objects[key])
        for label, value in labels_of(objects[key]).items():
            index.setdefault((namespace, label, value), []).append(key)
    return index
