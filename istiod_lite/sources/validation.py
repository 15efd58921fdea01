"""Reading Kubernetes objects: YAML documents -> validated objects (``parse_documents``), and
the check of one object (``validate_object``) every source runs.

Validation happens here, once, so that translation can trust the fields it relies on and a
user gets an error naming the file, the document and the field instead of a translation that
silently drops a pod.

Error policy, per document of a file:

* a YAML syntax error, a document that is not a mapping, a missing ``apiVersion``/``kind``/
  ``metadata.name``, or a known kind with an invalid field (e.g. a Pod without
  ``spec.nodeName`` or ``status.podIP``) raises ``InvalidObject``: the whole file is broken
  and a source keeps serving that file's last good objects;
* a well-formed object of a kind istiod_lite does not use (``apps/v1 Deployment``,
  ``v1 ConfigMap``, a typo in ``kind``...) is skipped with a *warning* ``SourceError`` and the
  rest of the file is used, because real manifests mix such objects with the ones we read.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import yaml

from ambient_common.flags import parse_duration
from istiod_lite.sources.objects import (
    CLUSTER_SCOPED_KINDS,
    KIND_FIELDS,
    InvalidObject,
    SourceError,
    describe,
)

AUTHORIZATION_ACTIONS = frozenset({"ALLOW", "DENY", "AUDIT", "CUSTOM"})
MTLS_MODES = frozenset({"UNSET", "DISABLE", "PERMISSIVE", "STRICT"})
SELECTOR_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


@dataclass(frozen=True)
class ParsedDocuments:
    """The usable objects of one file plus warnings about the documents that were skipped."""

    objects: tuple[dict[str, Any], ...]
    warnings: tuple[SourceError, ...] = ()


# libyaml's safe loader when PyYAML was built with it: ~10x faster on a 10,000-pod file.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_error_reason(exc: yaml.YAMLError, text: str = "") -> str:
    """One line naming where the YAML broke: the line of the typo, not where the parser
    noticed it. A scanner error points at the token it was scanning when it gave up (``b 2``,
    a missing ``:``, is only noticed on the next line, so the token's start, the context mark,
    is the typo); "mapping values are not allowed" after a key that lost its ``:`` is noticed
    on the line that plain scalar runs into, so ``text`` is searched for where it began."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"YAML error: {' '.join(str(exc).split())}"
    scanner = isinstance(exc, yaml.scanner.ScannerError) and exc.context_mark is not None
    mark = exc.context_mark if scanner else exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    if scanner and exc.context:
        problem = f"{problem} ({exc.context})"
    if mark is not None and problem.startswith("mapping values are not allowed"):
        started = _plain_scalar_start(text.splitlines(), mark.line)
        if started is not None:
            line, column = started
            return (
                f"YAML syntax error at line {line + 1}, column {column + 1}: no ':' after this "
                f"key, so line {mark.line + 1} reads as its continuation ({problem})"
            )
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"YAML syntax error at {where}{problem}"


def _plain_scalar_start(lines: list[str], line: int) -> tuple[int, int] | None:
    """The (line, column) where a plain scalar that runs into ``line`` began: the lines just
    above it, indented at least as deep, with no ``:`` (else None: the error is on ``line``)."""
    if line >= len(lines):
        return None
    indent = len(lines[line]) - len(lines[line].lstrip())
    start = None
    for above in range(line - 1, -1, -1):
        content = lines[above].lstrip()
        depth = len(lines[above]) - len(content)
        if not content or ":" in content or content.startswith(("-", "#")) or depth < indent:
            break
        start = (above, depth)
    return start


def parse_documents(text: str, path: str) -> ParsedDocuments:
    """Parse a (multi-document) YAML file into validated objects.

    Raises ``InvalidObject`` naming the file, the document (1-based, ``item`` too inside a
    ``kind: List``) and the problem if any document is broken; objects of kinds istiod_lite
    does not use come back as warnings instead (see the module docstring).
    """
    try:
        documents = list(yaml.load_all(text, Loader=_SAFE_LOADER))
    except yaml.YAMLError as exc:
        raise InvalidObject(path, yaml_error_reason(exc, text)) from None

    objects: list[dict[str, Any]] = []
    warnings: list[SourceError] = []
    for index, document in enumerate(documents, start=1):
        if document is None:  # an empty document, e.g. a trailing "---"
            continue
        where = f"document {index}"
        if not isinstance(document, dict):
            raise InvalidObject(
                path, f"{where}: expected a mapping, got {_type_name(document)}"
            )
        if document.get("kind") == "List" and document.get("apiVersion") == "v1":
            items = document.get("items") or []
            if not isinstance(items, list):
                raise InvalidObject(path, f"{where}: items must be a list")
            for item_index, item in enumerate(items, start=1):
                _collect(item, path, f"{where} item {item_index}", objects, warnings)
        else:
            _collect(document, path, where, objects, warnings)
    return ParsedDocuments(tuple(objects), tuple(warnings))


def _collect(
    document: Any,
    path: str,
    where: str,
    objects: list[dict[str, Any]],
    warnings: list[SourceError],
) -> None:
    try:
        obj = validate_object(document)
    except UnknownKind as exc:
        warnings.append(SourceError(path, f"{where}: {exc}; ignored", "warning"))
        return
    except ValueError as exc:
        raise InvalidObject(path, f"{where}: {exc}") from None
    objects.append(obj)


class UnknownKind(ValueError):
    """A well-formed object of a kind istiod_lite does not read."""


def validate_object(document: Any) -> dict[str, Any]:
    """Check one object and return a normalised copy (``metadata.namespace`` defaulted to
    ``default`` for namespaced kinds). Raises ``UnknownKind`` for kinds istiod_lite does not
    use and ``ValueError`` saying what is wrong otherwise. The Kubernetes source uses this too.
    """
    if not isinstance(document, dict):
        raise ValueError(f"expected a mapping, got {_type_name(document)}")
    api_version = document.get("apiVersion")
    kind = document.get("kind")
    if not isinstance(api_version, str) or not api_version:
        raise ValueError("apiVersion is missing")
    if not isinstance(kind, str) or not kind:
        raise ValueError("kind is missing")
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        raise ValueError(f"{kind}: metadata is missing or not a mapping")
    name = metadata.get("name")
    if name is None or name == "":
        raise ValueError(f"{kind}: metadata.name is missing")
    if not isinstance(name, str):
        raise ValueError(
            f"{kind}: metadata.name must be a string, got {_type_name(name)} (quote it in YAML)"
        )
    if (api_version, kind) not in KIND_FIELDS:
        raise UnknownKind(f"{api_version} {kind} {name!r} is not a kind istiod_lite reads")

    obj = dict(document)
    obj["metadata"] = dict(metadata)
    if kind not in CLUSTER_SCOPED_KINDS:
        namespace = metadata.get("namespace", "default")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"{kind} {name}: metadata.namespace must be a non-empty string")
        obj["metadata"]["namespace"] = namespace
    label = describe(obj)
    try:
        _string_map(metadata.get("labels"), "metadata.labels")
        _string_map(metadata.get("annotations"), "metadata.annotations")
        _VALIDATORS.get(kind, _no_checks)(obj)
    except ValueError as exc:
        raise ValueError(f"{label}: {exc}") from None
    return obj


def _no_checks(obj: dict[str, Any]) -> None:
    pass


def _validate_pod(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    node = spec.get("nodeName")
    if not isinstance(node, str) or not node:
        raise ValueError("spec.nodeName is missing (istiod_lite must know the pod's node)")
    pod_ip = status.get("podIP")
    if not isinstance(pod_ip, str) or not pod_ip:
        raise ValueError("status.podIP is missing (istiod_lite must know the pod's address)")
    _ip(pod_ip, "status.podIP")
    for i, entry in enumerate(_list(status.get("podIPs"), "status.podIPs")):
        entry = _mapping(entry, f"status.podIPs[{i}]")
        _ip(entry.get("ip"), f"status.podIPs[{i}].ip")
    _optional_string(spec.get("serviceAccountName"), "spec.serviceAccountName")
    _optional_string(status.get("phase"), "status.phase")
    for i, container in enumerate(_list(spec.get("containers"), "spec.containers")):
        container = _mapping(container, f"spec.containers[{i}]")
        for j, port in enumerate(_list(container.get("ports"), f"spec.containers[{i}].ports")):
            where = f"spec.containers[{i}].ports[{j}]"
            port = _mapping(port, where)
            _port(port.get("containerPort"), f"{where}.containerPort")
            _optional_string(port.get("name"), f"{where}.name")
    for i, condition in enumerate(_list(status.get("conditions"), "status.conditions")):
        _mapping(condition, f"status.conditions[{i}]")
    for i, owner in enumerate(
        _list(obj["metadata"].get("ownerReferences"), "metadata.ownerReferences")
    ):
        owner = _mapping(owner, f"metadata.ownerReferences[{i}]")
        _string(owner.get("kind"), f"metadata.ownerReferences[{i}].kind")
        _string(owner.get("name"), f"metadata.ownerReferences[{i}].name")


def _validate_service(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    _string_map(spec.get("selector"), "spec.selector")
    _optional_string(spec.get("clusterIP"), "spec.clusterIP")
    for address in [spec.get("clusterIP"), *_list(spec.get("clusterIPs"), "spec.clusterIPs")]:
        if address not in (None, "", "None"):
            _ip(address, "spec.clusterIP(s)")
    for i, port in enumerate(_list(spec.get("ports"), "spec.ports")):
        where = f"spec.ports[{i}]"
        port = _mapping(port, where)
        _port(port.get("port"), f"{where}.port")
        target = port.get("targetPort")
        if target is not None and not isinstance(target, str):
            _port(target, f"{where}.targetPort")
        _optional_string(port.get("name"), f"{where}.name")
        _optional_string(port.get("appProtocol"), f"{where}.appProtocol")
        _optional_string(port.get("protocol"), f"{where}.protocol")


def _validate_node(obj: dict[str, Any]) -> None:
    status = _mapping(obj.get("status"), "status")
    for i, address in enumerate(_list(status.get("addresses"), "status.addresses")):
        address = _mapping(address, f"status.addresses[{i}]")
        _string(address.get("type"), f"status.addresses[{i}].type")
        _string(address.get("address"), f"status.addresses[{i}].address")


def _validate_authorization_policy(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    action = spec.get("action", "ALLOW")
    if not _is_one_of(action, AUTHORIZATION_ACTIONS):
        raise ValueError(
            f"spec.action {action!r} is not one of {', '.join(sorted(AUTHORIZATION_ACTIONS))}"
        )
    _workload_selector(spec.get("selector"), "spec.selector")
    for i, rule in enumerate(_list(spec.get("rules"), "spec.rules")):
        where = f"spec.rules[{i}]"
        rule = _mapping(rule, where)
        for j, entry in enumerate(_list(rule.get("from"), f"{where}.from")):
            source = _mapping(_mapping(entry, f"{where}.from[{j}]").get("source"),
                              f"{where}.from[{j}].source")
            for key, value in source.items():
                _string_list(value, f"{where}.from[{j}].source.{key}")
        for j, entry in enumerate(_list(rule.get("to"), f"{where}.to")):
            operation = _mapping(_mapping(entry, f"{where}.to[{j}]").get("operation"),
                                 f"{where}.to[{j}].operation")
            for key, value in operation.items():
                values = _string_list(value, f"{where}.to[{j}].operation.{key}")
                if key in ("ports", "notPorts"):
                    for port in values:
                        _port(port, f"{where}.to[{j}].operation.{key}", allow_zero=True)
        for j, condition in enumerate(_list(rule.get("when"), f"{where}.when")):
            condition = _mapping(condition, f"{where}.when[{j}]")
            _string(condition.get("key"), f"{where}.when[{j}].key")
            _string_list(condition.get("values"), f"{where}.when[{j}].values")
            _string_list(condition.get("notValues"), f"{where}.when[{j}].notValues")
            if not condition.get("values") and not condition.get("notValues"):
                raise ValueError(f"{where}.when[{j}] needs values or notValues")
            if condition.get("key") == "destination.port":
                for port in [*condition.get("values", []), *condition.get("notValues", [])]:
                    _port(port, f"{where}.when[{j}] destination.port", allow_zero=True)


def _validate_peer_authentication(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    _workload_selector(spec.get("selector"), "spec.selector")
    mtls = _mapping(spec.get("mtls"), "spec.mtls")
    mode = mtls.get("mode", "UNSET")
    if not _is_one_of(mode, MTLS_MODES):
        raise ValueError(f"spec.mtls.mode {mode!r} is not one of {', '.join(sorted(MTLS_MODES))}")
    _mapping(spec.get("portLevelMtls"), "spec.portLevelMtls")


def _validate_gateway(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    _string(spec.get("gatewayClassName"), "spec.gatewayClassName")
    for i, listener in enumerate(_list(spec.get("listeners"), "spec.listeners")):
        where = f"spec.listeners[{i}]"
        listener = _mapping(listener, where)
        _optional_string(listener.get("name"), f"{where}.name")
        _port(listener.get("port"), f"{where}.port")
        _string(listener.get("protocol"), f"{where}.protocol")
    status = _mapping(obj.get("status"), "status")
    for section, name in ((spec, "spec"), (status, "status")):
        for i, address in enumerate(_list(section.get("addresses"), f"{name}.addresses")):
            where = f"{name}.addresses[{i}]"
            address = _mapping(address, where)
            _optional_string(address.get("type"), f"{where}.type")
            value = _string(address.get("value"), f"{where}.value")
            if address.get("type", "IPAddress") == "IPAddress":
                _ip(value, f"{where}.value")


def _validate_http_route(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    _parent_refs(spec.get("parentRefs"), "spec.parentRefs")
    _string_list(spec.get("hostnames"), "spec.hostnames")
    for i, rule in enumerate(_list(spec.get("rules"), "spec.rules")):
        where = f"spec.rules[{i}]"
        rule = _mapping(rule, where)
        for j, match in enumerate(_list(rule.get("matches"), f"{where}.matches")):
            at = f"{where}.matches[{j}]"
            match = _mapping(match, at)
            path = _mapping(match.get("path"), f"{at}.path")
            _optional_string(path.get("type"), f"{at}.path.type")
            _optional_string(path.get("value"), f"{at}.path.value")
            for key in ("headers", "queryParams"):
                for k, item in enumerate(_list(match.get(key), f"{at}.{key}")):
                    item = _mapping(item, f"{at}.{key}[{k}]")
                    _string(item.get("name"), f"{at}.{key}[{k}].name")
                    _optional_string(item.get("value"), f"{at}.{key}[{k}].value")
                    _optional_string(item.get("type"), f"{at}.{key}[{k}].type")
            _optional_string(match.get("method"), f"{at}.method")
        _backend_refs(rule.get("backendRefs"), f"{where}.backendRefs")
        for j, route_filter in enumerate(_list(rule.get("filters"), f"{where}.filters")):
            route_filter = _mapping(route_filter, f"{where}.filters[{j}]")
            _string(route_filter.get("type"), f"{where}.filters[{j}].type")
        timeouts = _mapping(rule.get("timeouts"), f"{where}.timeouts")
        _optional_string(timeouts.get("request"), f"{where}.timeouts.request")
        _optional_string(timeouts.get("backendRequest"), f"{where}.timeouts.backendRequest")
        retry = _mapping(rule.get("retry"), f"{where}.retry")
        for code in _list(retry.get("codes"), f"{where}.retry.codes"):
            _integer(code, f"{where}.retry.codes", minimum=100)
        if retry.get("attempts") is not None:
            _integer(retry["attempts"], f"{where}.retry.attempts", minimum=0)
        _optional_string(retry.get("backoff"), f"{where}.retry.backoff")


def _validate_tcp_route(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    _parent_refs(spec.get("parentRefs"), "spec.parentRefs")
    for i, rule in enumerate(_list(spec.get("rules"), "spec.rules")):
        rule = _mapping(rule, f"spec.rules[{i}]")
        _backend_refs(rule.get("backendRefs"), f"spec.rules[{i}].backendRefs")


def _parent_refs(value: Any, where: str) -> None:
    for i, ref in enumerate(_list(value, where)):
        ref = _mapping(ref, f"{where}[{i}]")
        _string(ref.get("name"), f"{where}[{i}].name")
        for key in ("group", "kind", "namespace", "sectionName"):
            _optional_string(ref.get(key), f"{where}[{i}].{key}")
        if ref.get("port") is not None:
            _port(ref["port"], f"{where}[{i}].port")


def _backend_refs(value: Any, where: str) -> None:
    for i, ref in enumerate(_list(value, where)):
        ref = _mapping(ref, f"{where}[{i}]")
        _string(ref.get("name"), f"{where}[{i}].name")
        for key in ("group", "kind", "namespace"):
            _optional_string(ref.get(key), f"{where}[{i}].{key}")
        if ref.get("port") is not None:
            _port(ref["port"], f"{where}[{i}].port")
        if ref.get("weight") is not None:
            _integer(ref["weight"], f"{where}[{i}].weight", minimum=0)
        _list(ref.get("filters"), f"{where}[{i}].filters")


def _validate_virtual_service(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    _string_list(spec.get("hosts"), "spec.hosts")
    _string_list(spec.get("gateways"), "spec.gateways")
    for i, http in enumerate(_list(spec.get("http"), "spec.http")):
        where = f"spec.http[{i}]"
        http = _mapping(http, where)
        for j, match in enumerate(_list(http.get("match"), f"{where}.match")):
            _mapping(match, f"{where}.match[{j}]")
        for j, route in enumerate(_list(http.get("route"), f"{where}.route")):
            route = _mapping(route, f"{where}.route[{j}]")
            destination = _mapping(route.get("destination"), f"{where}.route[{j}].destination")
            _string(destination.get("host"), f"{where}.route[{j}].destination.host")
            if route.get("weight") is not None:
                _integer(route["weight"], f"{where}.route[{j}].weight", minimum=0)
        for key in ("fault", "retries", "rewrite", "redirect", "headers", "mirror"):
            _mapping(http.get(key), f"{where}.{key}")
    _list(spec.get("tcp"), "spec.tcp")
    _list(spec.get("tls"), "spec.tls")


def _validate_destination_rule(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    _string(spec.get("host"), "spec.host")
    policy = _mapping(spec.get("trafficPolicy"), "spec.trafficPolicy")
    _mapping(policy.get("connectionPool"), "spec.trafficPolicy.connectionPool")
    _mapping(policy.get("outlierDetection"), "spec.trafficPolicy.outlierDetection")
    _list(spec.get("subsets"), "spec.subsets")


def _validate_request_authentication(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    _workload_selector(spec.get("selector"), "spec.selector")
    refs = _list(spec.get("targetRefs"), "spec.targetRefs")
    if spec.get("targetRef") is not None:
        refs = [*refs, _mapping(spec["targetRef"], "spec.targetRef")]
    for i, ref in enumerate(refs):
        ref = _mapping(ref, f"spec.targetRefs[{i}]")
        _string(ref.get("kind"), f"spec.targetRefs[{i}].kind")
        _string(ref.get("name"), f"spec.targetRefs[{i}].name")
        _optional_string(ref.get("group"), f"spec.targetRefs[{i}].group")
    for i, rule in enumerate(_list(spec.get("jwtRules"), "spec.jwtRules")):
        where = f"spec.jwtRules[{i}]"
        rule = _mapping(rule, where)
        _string(rule.get("issuer"), f"{where}.issuer")
        _string_list(rule.get("audiences"), f"{where}.audiences")
        _optional_string(rule.get("jwks"), f"{where}.jwks")
        _optional_string(rule.get("jwksUri"), f"{where}.jwksUri")
        for j, header in enumerate(_list(rule.get("fromHeaders"), f"{where}.fromHeaders")):
            header = _mapping(header, f"{where}.fromHeaders[{j}]")
            _string(header.get("name"), f"{where}.fromHeaders[{j}].name")
            _optional_string(header.get("prefix"), f"{where}.fromHeaders[{j}].prefix")
        for j, output in enumerate(
            _list(rule.get("outputClaimToHeaders"), f"{where}.outputClaimToHeaders")
        ):
            output = _mapping(output, f"{where}.outputClaimToHeaders[{j}]")
            _string(output.get("header"), f"{where}.outputClaimToHeaders[{j}].header")
            _string(output.get("claim"), f"{where}.outputClaimToHeaders[{j}].claim")
        forward = rule.get("forwardOriginalToken")
        if forward is not None and not isinstance(forward, bool):
            raise ValueError(f"{where}.forwardOriginalToken must be true or false")


RATE_LIMIT_TARGET_KINDS = frozenset({"Service", "Gateway"})


def _validate_local_rate_limit(obj: dict[str, Any]) -> None:
    spec = _mapping(obj.get("spec"), "spec")
    refs = _list(spec.get("targetRefs"), "spec.targetRefs")
    if not refs:
        raise ValueError("spec.targetRefs must name at least one Service or Gateway")
    for i, ref in enumerate(refs):
        ref = _mapping(ref, f"spec.targetRefs[{i}]")
        kind = ref.get("kind")
        if not _is_one_of(kind, RATE_LIMIT_TARGET_KINDS):
            raise ValueError(f"spec.targetRefs[{i}].kind {kind!r} is not Service or Gateway")
        _string(ref.get("name"), f"spec.targetRefs[{i}].name")
        _optional_string(ref.get("group"), f"spec.targetRefs[{i}].group")
    bucket = spec.get("tokenBucket")
    if not isinstance(bucket, dict):
        raise ValueError("spec.tokenBucket is missing or not a mapping")
    _integer(bucket.get("maxTokens"), "spec.tokenBucket.maxTokens", minimum=1)
    _integer(bucket.get("tokensPerFill"), "spec.tokenBucket.tokensPerFill", minimum=1)
    interval = _string(bucket.get("fillInterval"), "spec.tokenBucket.fillInterval")
    try:
        parse_duration(interval)
    except ValueError as exc:
        raise ValueError(f"spec.tokenBucket.fillInterval: {exc}") from None


_VALIDATORS = {
    "Pod": _validate_pod,
    "Service": _validate_service,
    "Node": _validate_node,
    "AuthorizationPolicy": _validate_authorization_policy,
    "PeerAuthentication": _validate_peer_authentication,
    "RequestAuthentication": _validate_request_authentication,
    "VirtualService": _validate_virtual_service,
    "DestinationRule": _validate_destination_rule,
    "Gateway": _validate_gateway,
    "HTTPRoute": _validate_http_route,
    "TCPRoute": _validate_tcp_route,
    "LocalRateLimit": _validate_local_rate_limit,
}


def _is_one_of(value: Any, allowed: frozenset[str]) -> bool:
    """A set test that an unhashable value from YAML (a list, a mapping) fails cleanly."""
    return isinstance(value, str) and value in allowed


def _workload_selector(value: Any, where: str) -> None:
    selector = _mapping(value, where)
    _string_map(selector.get("matchLabels"), f"{where}.matchLabels")
    for i, expression in enumerate(_list(selector.get("matchExpressions"),
                                         f"{where}.matchExpressions")):
        expression = _mapping(expression, f"{where}.matchExpressions[{i}]")
        _string(expression.get("key"), f"{where}.matchExpressions[{i}].key")
        operator = expression.get("operator")
        if not _is_one_of(operator, SELECTOR_OPERATORS):
            raise ValueError(
                f"{where}.matchExpressions[{i}].operator {operator!r} is not one of "
                f"{', '.join(sorted(SELECTOR_OPERATORS))}"
            )
        _string_list(expression.get("values"), f"{where}.matchExpressions[{i}].values")


def _type_name(value: Any) -> str:
    return {str: "a string", list: "a list", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """An optional mapping: ``None`` reads as empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {_type_name(value)}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list, got {_type_name(value)}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string")
    return value


def _optional_string(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {_type_name(value)}")


def _string_list(value: Any, where: str) -> list[str]:
    values = _list(value, where)
    for item in values:
        if not isinstance(item, str):
            raise ValueError(f"{where} must be a list of strings, found {item!r}")
    return values


def _string_map(value: Any, where: str) -> None:
    for key, item in _mapping(value, where).items():
        if not isinstance(item, str):
            raise ValueError(
                f"{where}.{key} must be a string, got {_type_name(item)} (quote it in YAML)"
            )


def _port(value: Any, where: str, *, allow_zero: bool = False) -> int:
    """A TCP port as an int or (as Istio's policies write them) a decimal string."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: {value!r} is not a port number")
    if isinstance(value, str) and value.isdecimal():
        value = int(value)
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or not low <= value <= 65535:
        raise ValueError(f"{where}: {value!r} is not a port number ({low}-65535)")
    return value


def _integer(value: Any, where: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {value!r} is not a whole number >= {minimum}")
    return value


def _ip(value: Any, where: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not an IP address") from None
