"""The config dump in istioctl's JSON: ``ztunnel-config KIND -o json|yaml`` as scripts expect.

Our ztunnel's ``/config_dump`` carries the wire contract as ``ambient_api.codec`` encodes it
(snake_case fields, Python's enum values). ``istioctl ztunnel-config workload -o json`` prints
Istio ztunnel's own dump, camelCase with its own value spellings (``workloadIps``,
``"protocol": "TCP"``, ``"status": "Healthy"``, ``"action": "Allow"``, services' ``vips`` as
``network/address``, policy rules as lists of clauses of matches). This module turns one into
the other, so a ``jq`` line written against istioctl works unchanged; fields Istio's dump does
not have keep our name, camelCased. Sans-IO.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Entry = Mapping[str, Any]

# Istio ztunnel's value spellings of our enums.
PROTOCOLS = {"NONE": "TCP", "HBONE": "HBONE"}
STATUSES = {"HEALTHY": "Healthy", "UNHEALTHY": "Unhealthy"}
ACTIONS = {"ALLOW": "Allow", "DENY": "Deny"}
SCOPES = {"GLOBAL": "Global", "NAMESPACE": "Namespace", "WORKLOAD_SELECTOR": "WorkloadSelector"}
LOAD_BALANCING_MODES = {"STRICT": "Strict", "FAILOVER": "Failover"}

# Our field -> Istio's, where camelCasing our name is not Istio's name.
WORKLOAD_FIELDS = {"addresses": "workloadIps", "tunnel_protocol": "protocol"}
SERVICE_FIELDS = {"addresses": "vips", "load_balancing": "loadBalancer"}
STRING_MATCH_FIELDS = frozenset({"namespaces", "not_namespaces", "principals", "not_principals"})


def camel_case(name: str) -> str:
    """``service_account`` -> ``serviceAccount``."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _camel_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {camel_case(str(k)): _camel_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_keys(v) for v in value]
    return value


def _renamed(entry: Entry, renames: Mapping[str, str]) -> dict[str, Any]:
    """Renamed fields; absent ones (None) are left out, as Istio's dump omits them."""
    return {
        renames.get(k, camel_case(k)): _camel_keys(v) for k, v in entry.items() if v is not None
    }


def _spelled(table: Mapping[str, str], value: Any) -> Any:
    return table.get(value, value) if isinstance(value, str) else value


def workload_json(workload: Entry) -> dict[str, Any]:
    out = _renamed(workload, WORKLOAD_FIELDS)
    out["protocol"] = _spelled(PROTOCOLS, out.get("protocol"))
    out["status"] = _spelled(STATUSES, out.get("status"))
    return out


def service_json(service: Entry, workloads: Sequence[Entry] = ()) -> dict[str, Any]:
    """Also ``endpoints`` (by workload uid) and ``ports`` (service port -> target port), as
    Istio's service dump has them."""
    out = _renamed(service, SERVICE_FIELDS)
    out["vips"] = [
        f"{a.get('network', '')}/{a.get('address', '')}" for a in service.get("addresses") or ()
    ]
    ports = {str(p.get("service_port")): p.get("target_port") for p in service.get("ports") or ()}
    out["ports"] = ports
    balancing = out.get("loadBalancer")
    if isinstance(balancing, dict):
        balancing["mode"] = _spelled(LOAD_BALANCING_MODES, balancing.get("mode"))
        balancing["routingPreferences"] = balancing.pop("routingPreference", [])
    key = f"{service.get('namespace', '')}/{service.get('hostname', '')}"
    out["endpoints"] = {
        str(w.get("uid", "")): {"workloadUid": w.get("uid", ""), "service": key, "port": ports}
        for w in workloads
        if key in (w.get("services") or ())
    }
    return out


def string_match(pattern: str) -> dict[str, Any]:
    """Istio's string match (``*``, ``prefix*``, ``*suffix``, exact) as ztunnel dumps it."""
    if pattern == "*":
        return {"Presence": {}}
    if pattern.endswith("*"):
        return {"Prefix": pattern[:-1]}
    if pattern.startswith("*"):
        return {"Suffix": pattern[1:]}
    return {"Exact": pattern}


def _match_json(match: Entry) -> dict[str, Any]:
    return {
        camel_case(k): [string_match(str(v)) for v in values]
        if k in STRING_MATCH_FIELDS
        else list(values)
        for k, values in match.items()
        if values
    }


def policy_json(policy: Entry) -> dict[str, Any]:
    """``rules`` become Istio's lists (rules OR'd) of clauses (AND'd) of matches (OR'd)."""
    out = _renamed(policy, {})
    out["action"] = _spelled(ACTIONS, out.get("action"))
    out["scope"] = _spelled(SCOPES, out.get("scope"))
    out["rules"] = [
        [[_match_json(m) for m in clause.get("matches") or ()] for clause in rule.get("clauses")
         or ()]
        for rule in policy.get("rules") or ()
    ]  # fmt: skip
    return out


def certificate_json(certificate: Entry) -> dict[str, Any]:
    """ztunnel already dumps certificates in Istio's spelling; snake_case is camelCased."""
    return _renamed(certificate, {})


def kind_json(kind: str, entries: Sequence[Entry], dump: Mapping[str, Any]) -> list[Any]:
    """One kind's entries of ``dump`` in istioctl's JSON (``kind`` as in the dump's keys)."""
    converters: dict[str, Callable[[Entry], dict[str, Any]]] = {
        "workloads": workload_json,
        "services": lambda s: service_json(s, dump.get("workloads") or ()),
        "policies": policy_json,
        "certificates": certificate_json,
    }
    return [converters[kind](entry) for entry in entries]
