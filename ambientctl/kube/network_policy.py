"""Would a NetworkPolicy drop HBONE (TCP 15008) into enrolled pods? (sans-IO)

In ambient mode every connection to a meshed pod arrives on the pod's port 15008 (the node's
ztunnel listens there in the pod's network namespace), whatever port the app serves. A
NetworkPolicy that admits only the app's ports therefore silently drops all mesh traffic, the
most common ambient support question. Kubernetes' rules, applied per pod:

- A pod is isolated for ingress when at least one NetworkPolicy of its namespace selects it
  (``spec.podSelector``) and has ``Ingress`` in ``policyTypes`` (absent ``policyTypes`` means
  ``Ingress``, plus ``Egress`` when egress rules are present).
- Policies are additive: an isolated pod accepts a connection if any rule of any policy
  selecting it allows it. A rule without ``ports`` allows every port; a port entry matches TCP
  15008 if its protocol is TCP (the default) and its ``port`` is absent, is 15008, is a range
  ``port``..``endPort`` containing it, or is a name the pod's containers give to 15008/TCP.
- A policy with no ingress rules allows nothing (default deny).

So 15008 is blocked for a pod when it is isolated and no selecting policy has a rule allowing
15008. Peers (``from``) are not judged: a rule that allows 15008 from some sources is taken
as the user's intent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

HBONE_PORT = 15008
MAX_PODS_NAMED = 5


class SelectorError(ValueError):
    """A label selector we cannot evaluate (an unknown operator, a malformed expression)."""


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A ``LabelSelector`` (``matchLabels`` and ``matchExpressions``) against ``labels``.

    An empty selector matches everything; a missing one (None) matches everything too, as a
    NetworkPolicy's required ``podSelector: {}``."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or ():
        if not _expression_matches(expression, labels):
            return False
    return True


def validate_selector(selector: Any) -> None:
    """Raise ``SelectorError`` for a selector ``selector_matches`` could not evaluate."""
    if selector is None:
        return
    if not isinstance(selector, Mapping):
        raise SelectorError(f"podSelector is not an object: {selector!r}")
    match_labels = selector.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        raise SelectorError(f"matchLabels is not an object: {match_labels!r}")
    expressions = selector.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise SelectorError(f"matchExpressions is not a list: {expressions!r}")
    for expression in expressions:
        _expression_matches(expression, {})


def _expression_matches(expression: Any, labels: Mapping[str, str]) -> bool:
    if not isinstance(expression, Mapping) or not isinstance(expression.get("key"), str):
        raise SelectorError(f"malformed matchExpressions entry {expression!r}")
    key, operator = expression["key"], expression.get("operator")
    values = expression.get("values") or []
    if not isinstance(values, list):
        raise SelectorError(f"matchExpressions values for key {key!r} is not a list")
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise SelectorError(f"unknown matchExpressions operator {operator!r} for key {key!r}")


def policy_types(policy: Mapping[str, Any]) -> set[str]:
    spec = policy.get("spec") or {}
    declared = spec.get("policyTypes")
    if declared:
        return {str(t) for t in declared}
    return {"Ingress", "Egress"} if spec.get("egress") else {"Ingress"}


def named_ports(pod: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """The pod's container port names -> (containerPort, protocol)."""
    ports: dict[str, tuple[int, str]] = {}
    spec = pod.get("spec") or {}
    for container in [*(spec.get("containers") or ()), *(spec.get("initContainers") or ())]:
        for port in (container or {}).get("ports") or ():
            if isinstance(port, Mapping) and port.get("name") and port.get("containerPort"):
                ports[str(port["name"])] = (
                    int(port["containerPort"]),
                    str(port.get("protocol") or "TCP"),
                )
    return ports


def port_entry_allows(
    entry: Mapping[str, Any], pod_ports: Mapping[str, tuple[int, str]], port: int = HBONE_PORT
) -> bool:
    """Does one ``NetworkPolicyPort`` admit TCP ``port`` into this pod?"""
    if str(entry.get("protocol") or "TCP").upper() != "TCP":
        return False
    value = entry.get("port")
    if value is None:
        return True  # every port of the protocol
    if isinstance(value, str) and not value.isdigit():
        number, protocol = pod_ports.get(value, (0, ""))
        return number == port and protocol.upper() == "TCP"
    try:
        start = int(value)
        end = entry.get("endPort")
        return start == port if end is None else start <= port <= int(end)
    except (TypeError, ValueError):
        return False  # the API server rejects such a port; it opens nothing


def rule_allows(
    rule: Mapping[str, Any], pod_ports: Mapping[str, tuple[int, str]], port: int = HBONE_PORT
) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True  # no ports listed: every port
    return any(isinstance(p, Mapping) and port_entry_allows(p, pod_ports, port) for p in ports)


def policy_allows(
    policy: Mapping[str, Any], pod_ports: Mapping[str, tuple[int, str]], port: int = HBONE_PORT
) -> bool:
    """Does some ingress rule of ``policy`` admit TCP ``port``? (No rules: deny all.)"""
    rules = (policy.get("spec") or {}).get("ingress") or ()
    return any(isinstance(r, Mapping) and rule_allows(r, pod_ports, port) for r in rules)


@dataclass(frozen=True)
class BlockingPolicy:
    """A policy that selects pods whose port 15008 nothing opens."""

    namespace: str
    name: str
    pods: tuple[str, ...]
    default_deny: bool  # it has no ingress rules at all

    def describe(self) -> str:
        pods = ", ".join(self.pods[:MAX_PODS_NAMED])
        if len(self.pods) > MAX_PODS_NAMED:
            pods += f" and {len(self.pods) - MAX_PODS_NAMED} more"
        what = "denies all ingress" if self.default_deny else "allows no TCP 15008 ingress"
        return (
            f"NetworkPolicy {self.namespace}/{self.name} {what} to pods {pods}: the mesh's "
            f"HBONE traffic (port {HBONE_PORT}) is dropped; fix: add an ingress rule allowing "
            f"TCP port {HBONE_PORT} (ports: [{{protocol: TCP, port: {HBONE_PORT}}}])"
        )


@dataclass
class NetworkPolicyFindings:
    blocking: list[BlockingPolicy] = field(default_factory=list)
    isolated_pods: int = 0  # pods some ingress policy selects
    errors: list[str] = field(default_factory=list)  # policies we could not evaluate


def find_hbone_blockers(
    namespace: str,
    policies: Iterable[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    port: int = HBONE_PORT,
) -> NetworkPolicyFindings:
    """The policies in ``namespace`` that leave some of ``pods`` with ``port`` closed.

    ``policies`` and ``pods`` are the namespace's objects as the API returns them; a policy
    with a selector we cannot evaluate is reported in ``errors`` and skipped."""
    findings = NetworkPolicyFindings()
    selecting: dict[str, list[Mapping[str, Any]]] = {}  # pod name -> ingress policies on it
    ingress_policies = []
    for policy in policies:
        if "Ingress" not in policy_types(policy):
            continue
        selector = (policy.get("spec") or {}).get("podSelector")
        try:
            validate_selector(selector)
        except SelectorError as exc:
            findings.errors.append(f"NetworkPolicy {namespace}/{_name(policy)}: {exc}")
            continue
        ingress_policies.append(policy)
        for pod in pods:
            if selector_matches(selector, (pod.get("metadata") or {}).get("labels") or {}):
                selecting.setdefault(_name(pod), []).append(policy)
    findings.isolated_pods = len(selecting)
    blocked_by: dict[str, list[str]] = {}  # policy name -> blocked pods it selects
    for pod in pods:
        on_pod = selecting.get(_name(pod))
        if not on_pod:
            continue
        ports = named_ports(pod)
        if any(policy_allows(p, ports, port) for p in on_pod):
            continue
        for policy in on_pod:
            blocked_by.setdefault(_name(policy), []).append(_name(pod))
    for policy in ingress_policies:
        pods_blocked = blocked_by.get(_name(policy))
        if pods_blocked:
            rules = (policy.get("spec") or {}).get("ingress") or ()
            findings.blocking.append(
                BlockingPolicy(namespace, _name(policy), tuple(sorted(pods_blocked)), not rules)
            )
    return findings


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))
