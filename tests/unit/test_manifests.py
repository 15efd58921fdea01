"""manifests/, the Dockerfile and the samples, checked offline: what `kubectl kustomize`
renders must pass kubernetes-validate --strict, our CRD schemas must be structural, accept
Istio's YAML (the demo's policies) and refuse malformed objects, RBAC must stay least
privilege, and every container's arguments must be flags its program really has."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from istiod_lite.config import build_parser as istiod_parser
from istiod_lite.sources.objects import KIND_FIELDS
from istiod_lite.sources.validation import validate_object
from ztunnel.config import Ports
from ztunnel.config import build_parser as ztunnel_parser

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
DEMO = REPO / "examples" / "demo"
KUBERNETES_VERSION = "1.30.0"
IMAGE = "ghcr.io/ambient-lite/ambient-lite:0.1.0"

# Kinds our CRDs define; Gateway API kinds are referenced, not vendored (no schema here).
CRD_GROUPS = {"security.istio.io", "networking.istio.io", "policy.ambient-lite.io"}
GATEWAY_API_GROUP = "gateway.networking.k8s.io"

# istiod_lite flags the Deployment passes for the Kubernetes mode that is being written
# alongside these manifests. Until istiod_lite/config.py has them they are allowed here by
# name; once it does, their values are checked like every other flag's.
ASSUMED_KUBERNETES_FLAGS = frozenset({
    "--kubernetes",
    "--pod-name",
    "--pod-namespace",
    "--trusted-node-accounts",
    "--waypoint-image",
})

Doc = dict[str, Any]


# -- rendering ----------------------------------------------------------------------------

def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (`make kubectl`, run by `make test` as root, "
                    "installs Debian's kubernetes-client); manifests/ rendering not checked")
    return kubectl


@functools.cache
def _kustomize_supports_directories() -> bool:
    """kubectl < 1.21 embeds kustomize v2.0.3, which cannot list a directory in
    `resources:` (manifests/kustomization.yaml does); it reports no kustomizeVersion."""
    out = subprocess.run([_kubectl(), "version", "--client", "-o", "json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    version = json.loads(out).get("kustomizeVersion", "v2.0.3")
    return int(version.lstrip("v").split(".")[0]) >= 4


@functools.cache
def _rendered(relative: str) -> tuple[Doc, ...]:
    directory = MANIFESTS / relative
    result = subprocess.run([_kubectl(), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    assert docs, f"manifests/{relative} rendered nothing"
    return docs


def render(relative: str) -> list[Doc]:
    """The documents `kubectl kustomize manifests/<relative>` prints (a fresh copy)."""
    return copy.deepcopy(list(_rendered(relative)))


def group_of(doc: Doc) -> str:
    api_version: str = doc["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def key_of(doc: Doc) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def load_yaml_dir(directory: Path) -> list[Doc]:
    return [d for path in sorted(directory.glob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if d]


# -- CRD schema -> JSON Schema ----------------------------------------------------------

@functools.cache
def crds() -> dict[tuple[str, str], Doc]:
    """(group, kind) -> our CustomResourceDefinition, read from manifests/base/crds (no
    kubectl needed; test_rendered_crds_are_the_files ties them to the rendering). Shared:
    do not modify."""
    return {(d["spec"]["group"], d["spec"]["names"]["kind"]): d
            for d in load_yaml_dir(MANIFESTS / "base" / "crds")}


def walk_schema(schema: Doc, path: str = "") -> Iterator[tuple[str, Doc]]:
    """Every schema node with its path (properties, items, additionalProperties, *Of)."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk_schema(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk_schema(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk_schema(schema["additionalProperties"], f"{path}{{}}")
    for keyword in ("allOf", "anyOf", "oneOf"):
        for i, child in enumerate(schema.get(keyword, [])):
            yield from walk_schema(child, f"{path}.{keyword}[{i}]")


def to_json_schema(schema: Doc, *, root: bool = True) -> Doc:
    """A structural openAPIV3Schema as a JSON Schema that judges like the API server with
    kubectl's strict field validation: unknown fields are errors (not silently pruned),
    except under x-kubernetes-preserve-unknown-fields. The subset we use maps directly;
    `nullable` becomes a null type."""
    out = {k: v for k, v in schema.items()
           if not k.startswith("x-kubernetes-") and k not in ("description", "nullable")}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in schema:
        out["properties"] = {name: to_json_schema(child, root=False)
                             for name, child in schema["properties"].items()}
    if isinstance(schema.get("items"), dict):
        out["items"] = to_json_schema(schema["items"], root=False)
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(schema["additionalProperties"],
                                                     root=False)
    for keyword in ("allOf", "anyOf", "oneOf"):
        if keyword in schema:
            out[keyword] = [to_json_schema(c, root=False) for c in schema[keyword]]
    if root:
        out.setdefault("properties", {}).update(
            apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"})
    if (schema.get("type") == "object" and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    group, version = api_version.split("/")
    definition = crds().get((group, kind))
    assert definition is not None, f"no CRD for {group} {kind}"
    served = {v["name"]: v for v in definition["spec"]["versions"] if v["served"]}
    assert version in served, f"{api_version} {kind} is not served"
    schema = to_json_schema(served[version]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def check_custom_object(doc: Doc) -> None:
    """Validate a custom object against our CRD for its kind and version; raises
    jsonschema.ValidationError naming the path when it is refused."""
    error = jsonschema.exceptions.best_match(
        _validator(doc["apiVersion"], doc["kind"]).iter_errors(doc))
    if error is not None:
        raise error


# -- rendering and strict validation ------------------------------------------------------

@pytest.mark.parametrize("directory", ["base", "samples"])
def test_renders_and_every_builtin_kind_passes_strict_validation(directory: str) -> None:
    custom = 0
    for doc in render(directory):
        if group_of(doc) in CRD_GROUPS | {GATEWAY_API_GROUP}:
            custom += 1
            continue
        # Raises ValidationError (naming the field) or SchemaNotFoundError (unknown kind).
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert custom == (0 if directory == "base" else 10)


def test_strict_validation_catches_a_misspelt_field() -> None:
    daemonset = find(render("base"), "DaemonSet", "ztunnel")
    daemonset["spec"]["template"]["spec"]["tolerration"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_top_level_kustomization_is_the_base() -> None:
    if not _kustomize_supports_directories():
        pytest.skip("this kubectl embeds kustomize v2.0.3, which cannot render "
                    "manifests/kustomization.yaml's directory resource; install kubectl >= 1.21")
    assert sorted(map(key_of, render("."))) == sorted(map(key_of, render("base")))


def test_base_holds_the_control_plane() -> None:
    keys = set(map(key_of, render("base")))
    expected = {
        ("Namespace", "", "istio-system"),
        ("ServiceAccount", "istio-system", "istiod"),
        ("ServiceAccount", "istio-system", "ztunnel"),
        ("ClusterRole", "", "istiod-ambient-lite"),
        ("ClusterRoleBinding", "", "istiod-ambient-lite"),
        ("Role", "istio-system", "istiod-ambient-lite"),
        ("RoleBinding", "istio-system", "istiod-ambient-lite"),
        ("Deployment", "istio-system", "istiod"),
        ("Service", "istio-system", "istiod"),
        ("PodDisruptionBudget", "istio-system", "istiod"),
        ("DaemonSet", "istio-system", "ztunnel"),
    }
    assert expected <= keys
    assert {(group, kind) for group, kind in crds()} == {
        ("security.istio.io", "AuthorizationPolicy"),
        ("security.istio.io", "PeerAuthentication"),
        ("security.istio.io", "RequestAuthentication"),
        ("networking.istio.io", "VirtualService"),
        ("networking.istio.io", "DestinationRule"),
        ("policy.ambient-lite.io", "LocalRateLimit"),
    }


def test_gateway_api_overlays_pin_a_release() -> None:
    for relative in ("gateway-api", "gateway-api/experimental"):
        kustomization = yaml.safe_load((MANIFESTS / relative / "kustomization.yaml").read_text())
        (url,) = kustomization["resources"]
        channel = "experimental" if "experimental" in relative else "standard"
        assert re.fullmatch(r"https://github\.com/kubernetes-sigs/gateway-api/releases/"
                            rf"download/v1\.\d+\.\d+/{channel}-install\.yaml", url), url


# -- CRDs -----------------------------------------------------------------------------------

def test_rendered_crds_are_the_files() -> None:
    rendered = [d for d in render("base") if d["kind"] == "CustomResourceDefinition"]
    assert sorted(rendered, key=key_of) == sorted(crds().values(), key=key_of)


def test_crds_pass_strict_validation_without_kubectl() -> None:
    for definition in crds().values():
        kubernetes_validate.validate(definition, KUBERNETES_VERSION, strict=True)


def test_crd_versions_share_one_schema_and_one_storage_version() -> None:
    expected_versions = {
        "security.istio.io": ["v1", "v1beta1"],
        "networking.istio.io": ["v1", "v1beta1", "v1alpha3"],
        "policy.ambient-lite.io": ["v1alpha1"],
    }
    for (group, kind), definition in crds().items():
        versions = definition["spec"]["versions"]
        assert [v["name"] for v in versions] == expected_versions[group], kind
        assert all(v["served"] for v in versions), kind
        assert [v["name"] for v in versions if v["storage"]] == [versions[0]["name"]], kind
        schemas = [v["schema"]["openAPIV3Schema"] for v in versions]
        assert all(s == schemas[0] for s in schemas), f"{kind}: versions' schemas differ"
        # Every Istio version istiod_lite's parser reads is served, and nothing else.
        readable = {api.split("/")[1] for api, k in KIND_FIELDS if k == kind}
        assert readable == set(expected_versions[group]), kind


def test_crd_schemas_are_structural() -> None:
    """The API server's structural-schema rules we rely on: every node has a type (or
    preserves unknown fields), properties and additionalProperties never meet, metadata
    is left to the server, and spec is typed."""
    for (_, kind), definition in crds().items():
        schema = definition["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["type"] == "object"
        assert schema["properties"]["spec"]["type"] == "object", kind
        assert schema["properties"]["spec"].get("properties"), f"{kind}: spec is untyped"
        assert "metadata" not in schema["properties"], kind
        for path, node in walk_schema(schema):
            if ".anyOf[" in path or ".oneOf[" in path or ".allOf[" in path:
                continue
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), (
                f"{kind}{path}: no type")
            assert not ("properties" in node and "additionalProperties" in node), (
                f"{kind}{path}: properties with additionalProperties")
            if node.get("x-kubernetes-preserve-unknown-fields"):
                assert node.get("type") == "object", f"{kind}{path}"


DESTINATION_RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: demo
spec:
  host: reviews.demo.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100}
      http: {http1MaxPendingRequests: 10, maxRequestsPerConnection: 1}
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 10s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
  subsets:
    - name: v1
      labels: {version: v1}
    - name: v2
      labels: {version: v2}
      trafficPolicy:
        loadBalancer: {simple: ROUND_ROBIN}
"""


def demo_custom_objects() -> list[Doc]:
    docs = [d for d in load_yaml_dir(DEMO) if group_of(d) in CRD_GROUPS]
    return [*docs, yaml.safe_load(DESTINATION_RULE)]


def test_crds_accept_the_demo_policies() -> None:
    docs = demo_custom_objects()
    assert {d["kind"] for d in docs} == {
        "AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication",
        "VirtualService", "DestinationRule", "LocalRateLimit"}
    for doc in docs:
        validate_object(doc)  # istiod_lite reads it too
        check_custom_object(doc)
        # v1beta1 (and v1alpha3 for networking) objects are accepted the same way.
        older = dict(doc, apiVersion=doc["apiVersion"].replace("/v1", "/v1beta1"))
        if group_of(doc) != "policy.ambient-lite.io":
            check_custom_object(older)


def _demo(kind: str, name: str) -> Doc:
    if kind == "DestinationRule":
        return yaml.safe_load(DESTINATION_RULE)
    (doc,) = [d for d in demo_custom_objects()
              if d["kind"] == kind and d["metadata"]["name"] == name]
    return copy.deepcopy(doc)


def _set(doc: Doc, path: str, value: Any) -> Doc:
    """Set `a.b[0].c` in doc (a value of None deletes the key)."""
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    target: Any = doc
    for part in parts[:-1]:
        target = target[part]
    if value is None:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return doc


@pytest.mark.parametrize(("kind", "name", "path", "value"), [
    ("AuthorizationPolicy", "httpbin-allow-sleep", "spec.action", "MAYBE"),
    ("AuthorizationPolicy", "httpbin-allow-sleep", "spec.rules[0].form",
     [{"source": {"principals": ["x"]}}]),
    ("AuthorizationPolicy", "httpbin-allow-sleep", "spec.rules[0].from[0].source.principals",
     "cluster.local/ns/demo/sa/sleep"),
    ("AuthorizationPolicy", "reviews-no-admin", "spec.targetRefs[0].name", None),
    ("PeerAuthentication", "default", "spec.mtls.mode", "SOMETIMES"),
    ("RequestAuthentication", "details-jwt", "spec.jwtRules[0].issuer", None),
    ("RequestAuthentication", "details-jwt", "spec.jwtRules[0].forwardOriginalToken", "yes"),
    ("VirtualService", "details", "spec.http[0].route[0].destination.host", None),
    ("VirtualService", "details", "spec.http[1].fault.abort.httpStatus", "teapot"),
    ("DestinationRule", "reviews", "spec.host", None),
    ("DestinationRule", "reviews", "spec.subsets[0].name", None),
    ("LocalRateLimit", "details", "spec.tokenBucket.maxTokens", 0),
    ("LocalRateLimit", "details", "spec.tokenBucket.fillInterval", "soon"),
    ("LocalRateLimit", "details", "spec.targetRefs[0].kind", "Pod"),
    ("LocalRateLimit", "details", "spec.targetRefs", []),
    ("LocalRateLimit", "details", "spec.burst", 5),
])
def test_crds_refuse_malformed_objects(kind: str, name: str, path: str, value: Any) -> None:
    doc = _set(_demo(kind, name), path, value)
    with pytest.raises(jsonschema.ValidationError) as refused:
        check_custom_object(doc)
    field = re.findall(r"[A-Za-z]+", path)[-1]
    assert field in refused.value.message + refused.value.json_path, refused.value


def test_crds_keep_open_what_istio_types_deeply() -> None:
    """VirtualService match/retries and DestinationRule pools are Istio-typed subtrees that
    waypoints read loosely: any Istio field there is accepted."""
    service = _demo("VirtualService", "details")
    service["spec"]["http"][0]["match"][0]["headers"] = {"x-user": {"exact": "tester"}}
    service["spec"]["http"][0]["retries"] = {"attempts": 3, "retryOn": "5xx,reset"}
    check_custom_object(service)


# -- samples ------------------------------------------------------------------------------

def test_sample_custom_objects_pass_our_crds_and_istiod_lite() -> None:
    samples = render("samples")
    gateway_api = [d["kind"] for d in samples if group_of(d) == GATEWAY_API_GROUP]
    assert sorted(gateway_api) == ["Gateway", "HTTPRoute", "HTTPRoute"]
    for doc in samples:
        if group_of(doc) in CRD_GROUPS:
            check_custom_object(doc)
        if (doc["apiVersion"], doc["kind"]) in KIND_FIELDS:
            validate_object(doc)


def _strip_embedded_only(doc: Doc) -> Doc:
    """What only the embedded mode needs, as manifests/samples/kustomization.yaml lists."""
    doc = copy.deepcopy(doc)
    doc["metadata"].pop("annotations", None)
    if doc["kind"] == "Service":
        doc["spec"].pop("clusterIP", None)
        doc["spec"].pop("clusterIPs", None)
    if doc["kind"] == "Gateway":
        doc["spec"].pop("addresses", None)
    return doc


def test_samples_are_the_demo_topology() -> None:
    demo = load_yaml_dir(DEMO)
    samples = {key_of(d): d for d in render("samples")}
    waypoint_accounts = {("ServiceAccount", d["metadata"]["namespace"], d["metadata"]["name"])
                         for d in demo if d["kind"] == "Gateway"}
    for doc in demo:
        key = key_of(doc)
        if doc["kind"] == "Node" or key in waypoint_accounts:
            continue  # real nodes; the waypoint controller creates the waypoint's account
        if doc["kind"] == "Pod":
            deployment = samples.get(("Deployment", key[1], key[2]))
            assert deployment is not None, f"no Deployment for demo Pod {key}"
            template = deployment["spec"]["template"]
            assert deployment["spec"]["selector"]["matchLabels"] == doc["metadata"]["labels"]
            assert template["metadata"]["labels"] == doc["metadata"]["labels"], key
            assert (template["spec"].get("serviceAccountName")
                    == doc["spec"].get("serviceAccountName")), key
            ports = [[(p.get("name"), p["containerPort"]) for p in c.get("ports", [])]
                     for c in doc["spec"]["containers"]]
            assert ports == [[(p.get("name"), p["containerPort"]) for p in c.get("ports", [])]
                             for c in template["spec"]["containers"]], key
            continue
        assert key in samples, f"samples lack demo object {key}"
        assert _strip_embedded_only(samples[key]) == _strip_embedded_only(doc), key
    demo_keys = {key_of(d) for d in demo}
    extra = {k for k in samples if k not in demo_keys and k[0] != "Deployment"}
    assert not extra, f"samples hold objects the demo does not: {extra}"
    for doc in samples.values():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get(
                "containers", []):
            assert re.fullmatch(r"docker\.io/[\w.-]+/[\w.-]+:[\w.-]+", container["image"])
            assert not container["image"].endswith(":latest"), container["image"]


# -- RBAC -----------------------------------------------------------------------------------

def test_rbac_has_no_wildcards_and_secrets_stay_in_istio_system() -> None:
    docs = render("base")
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{role['kind']} wildcard {field}"
                assert not any("*" in item for item in rule.get(field, [])), rule
            if "secrets" in rule["resources"]:
                assert role["kind"] == "Role", "secrets must never be granted cluster-wide"
                assert role["metadata"]["namespace"] == "istio-system"
                if rule["verbs"] != ["create"]:
                    assert sorted(rule["resourceNames"]) == ["cacerts", "istio-ca-secret"]
            assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"]
            assert "impersonate" not in rule["verbs"]


def _granted(docs: list[Doc], kind: str) -> set[tuple[str, str, str]]:
    role = next(d for d in docs if d["kind"] == kind)
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_istiod_can_do_what_the_kubernetes_mode_needs() -> None:
    docs = render("base")
    cluster = _granted(docs, "ClusterRole")
    watched = [("", "namespaces"), ("", "pods"), ("", "services"), ("", "serviceaccounts"),
               ("", "nodes"), ("discovery.k8s.io", "endpointslices"),
               ("gateway.networking.k8s.io", "gateways"),
               ("gateway.networking.k8s.io", "httproutes"),
               ("security.istio.io", "authorizationpolicies"),
               ("security.istio.io", "peerauthentications"),
               ("security.istio.io", "requestauthentications"),
               ("networking.istio.io", "virtualservices"),
               ("networking.istio.io", "destinationrules"),
               ("policy.ambient-lite.io", "localratelimits")]
    for group, resource in watched:
        assert {(group, resource, v) for v in ("get", "list", "watch")} <= cluster, resource
    assert ("authentication.k8s.io", "tokenreviews", "create") in cluster
    assert ("gateway.networking.k8s.io", "gateways/status", "update") in cluster
    for group, resource in [("", "configmaps"), ("apps", "deployments"), ("", "services"),
                            ("", "serviceaccounts")]:
        assert {(group, resource, v) for v in ("create", "update", "patch", "delete")} <= cluster
    namespaced = _granted(docs, "Role")
    assert ("coordination.k8s.io", "leases", "update") in namespaced
    assert ("", "secrets", "get") in namespaced
    # Never more than these verbs anywhere.
    allowed = {"get", "list", "watch", "create", "update", "patch", "delete"}
    assert {verb for _, _, verb in cluster | namespaced} <= allowed


def test_only_istiod_is_bound_and_ztunnel_has_no_api_token() -> None:
    docs = render("base")
    subjects = [(s["namespace"], s["name"]) for d in docs
                if d["kind"] in ("ClusterRoleBinding", "RoleBinding") for s in d["subjects"]]
    assert set(subjects) == {("istio-system", "istiod")}
    account = find(docs, "ServiceAccount", "ztunnel")
    assert account["automountServiceAccountToken"] is False
    pod = find(docs, "DaemonSet", "ztunnel")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False


# -- workloads ------------------------------------------------------------------------------

def _expand(arg: str) -> str:
    """The kubelet's $(VAR) expansion, with plausible values."""
    values = {"NODE_NAME": "node-1", "POD_IP": "10.244.1.7", "POD_NAME": "istiod-abc",
              "POD_NAMESPACE": "istio-system"}
    return re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg)


def _container(doc: Doc) -> Doc:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def test_ztunnel_daemonset_runs_ztunnel_with_its_real_flags() -> None:
    daemonset = find(render("base"), "DaemonSet", "ztunnel")
    pod = daemonset["spec"]["template"]["spec"]
    container = _container(daemonset)
    module, *argv = container["args"]
    assert module == "ztunnel" and importlib.util.find_spec("ztunnel.__main__")
    args = ztunnel_parser().parse_args([_expand(a) for a in argv])
    assert args.xds_address == ("istiod.istio-system.svc", 15012)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert str(args.root_cert).startswith(mounts["istiod-ca-cert"] + "/")
    assert volumes["istiod-ca-cert"]["configMap"]["name"] == "istio-ca-root-cert"
    assert str(args.token_file).startswith(mounts["istio-token"] + "/")
    (source,) = volumes["istio-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "istio-ca"
    assert Path(args.token_file).name == source["serviceAccountToken"]["path"]
    # Drains within the grace period.
    assert args.drain_timeout < pod["terminationGracePeriodSeconds"]


def test_ztunnel_daemonset_privileges_are_those_of_in_pod_redirection() -> None:
    daemonset = find(render("base"), "DaemonSet", "ztunnel")
    pod = daemonset["spec"]["template"]["spec"]
    container = _container(daemonset)
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"],
                                        "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}
    assert security["readOnlyRootFilesystem"] is True
    host_paths = [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v]
    assert host_paths == ["/var/run/ztunnel"]
    assert pod["priorityClassName"] == "system-node-critical"
    effects = {t.get("effect") for t in pod["tolerations"] if t["operator"] == "Exists"}
    assert {"NoSchedule", "NoExecute"} <= effects
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["port"], probe["path"]) == (Ports().readiness, "/healthz/ready")
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == Ports().metrics
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]


def test_istiod_deployment_flags_service_probe_and_disruption_budget() -> None:
    docs = render("base")
    deployment = find(docs, "Deployment", "istiod")
    pod = deployment["spec"]["template"]
    container = _container(deployment)
    module, *argv = container["args"]
    assert module == "istiod_lite" and importlib.util.find_spec("istiod_lite.__main__")
    known = {option: action for action in istiod_parser()._actions
             for option in action.option_strings}
    for arg in argv:
        flag, _, value = _expand(arg).partition("=")
        if flag in known:
            convert = known[flag].type
            if value and callable(convert):
                convert(value)  # raises on a value istiod_lite would refuse
            continue
        assert flag in ASSUMED_KUBERNETES_FLAGS, f"istiod_lite has no flag {flag}"
    assert deployment["spec"]["replicas"] == 2
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["port"], probe["path"], probe["scheme"]) == (15012, "/ready", "HTTPS")
    assert container["resources"]["requests"]["memory"]
    labels = pod["metadata"]["labels"]
    service = find(docs, "Service", "istiod")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("grpc-xds", 15012)]
    budget = find(docs, "PodDisruptionBudget", "istiod")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_one_image_for_every_program_and_the_waypoints() -> None:
    docs = render("base")
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "DaemonSet")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {IMAGE}
    args = _container(find(docs, "Deployment", "istiod"))["args"]
    assert f"--waypoint-image={IMAGE}" in args


def test_dockerfile_builds_one_non_root_image_with_module_entry_points() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines()
                    if line and not line.startswith(("#", " "))]
    assert instructions[0] == "FROM python:3.11-slim"
    assert 'ENTRYPOINT ["python", "-m"]' in instructions
    (user,) = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    for package in ("ambient_common", "istiod_lite", "ztunnel", "waypoint", "ambientctl"):
        assert f"COPY {package} ./{package}" in dockerfile
        assert f"!{package}/" in (REPO / ".dockerignore").read_text()
    for program in ("istiod_lite", "ztunnel", "waypoint"):
        assert importlib.util.find_spec(f"{program}.__main__"), program
