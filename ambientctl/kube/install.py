"""``kubectl ambient install`` / ``uninstall``: apply or delete the kustomize output.

``kubectl kustomize DIR`` renders the documents (kustomize already orders them: Namespaces and
CRDs first, workloads last). ``install`` creates each object, or replaces it when it exists
(with the live ``resourceVersion``, and a Service's allocated ``clusterIP`` kept, since it is
immutable). ``uninstall`` deletes in reverse order; CustomResourceDefinitions are kept unless
``--purge`` (deleting a CRD deletes every user object of that kind, as ``istioctl uninstall``
also keeps them by default).

The REST path of a kind comes from API discovery (``/api/v1``, ``/apis/<group>/<version>``) when
the server offers it, else from a table of the kinds our manifests use plus English plurals.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ambientctl.bundled import DEFAULT_KUSTOMIZATION
from ambientctl.kube.api import AlreadyExists, Conflict, Kube, KubeApiError, KubeError, api_path

KUSTOMIZE_TIMEOUT = 60.0
CRD_KIND = "CustomResourceDefinition"

# kind -> (plural, namespaced) for when discovery is unavailable.
KNOWN_KINDS: dict[str, tuple[str, bool]] = {
    "Namespace": ("namespaces", False),
    "Node": ("nodes", False),
    "CustomResourceDefinition": ("customresourcedefinitions", False),
    "ClusterRole": ("clusterroles", False),
    "ClusterRoleBinding": ("clusterrolebindings", False),
    "MutatingWebhookConfiguration": ("mutatingwebhookconfigurations", False),
    "ValidatingWebhookConfiguration": ("validatingwebhookconfigurations", False),
    "PriorityClass": ("priorityclasses", False),
    "GatewayClass": ("gatewayclasses", False),
    "StorageClass": ("storageclasses", False),
    "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True),
    "ServiceAccount": ("serviceaccounts", True),
    "Service": ("services", True),
    "ConfigMap": ("configmaps", True),
    "Secret": ("secrets", True),
    "Deployment": ("deployments", True),
    "DaemonSet": ("daemonsets", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "NetworkPolicy": ("networkpolicies", True),
    "Lease": ("leases", True),
    "AuthorizationPolicy": ("authorizationpolicies", True),
    "PeerAuthentication": ("peerauthentications", True),
    "RequestAuthentication": ("requestauthentications", True),
}


class InstallError(KubeError):
    """Rendering or applying the manifests failed; the message names the object."""


@dataclass(frozen=True)
class ResourceRef:
    api_version: str
    kind: str
    namespace: str | None
    name: str

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"


# ---------------------------------------------------------------------------------------------
# Rendering


def render_kustomization(
    directory: Path, *, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR`` (or ``kustomize build DIR``) as a list of documents."""
    if (
        not (directory / "kustomization.yaml").is_file()
        and not (directory / "kustomization.yml").is_file()
    ):
        raise InstallError(
            f"{directory} has no kustomization.yaml; pass the manifests with -k DIR "
            f"(default: the manifests shipped with ambientctl, {DEFAULT_KUSTOMIZATION})"
        )
    if shutil.which("kubectl"):
        argv = ["kubectl", "kustomize", str(directory)]
    elif shutil.which("kustomize"):
        argv = ["kustomize", "build", str(directory)]
    else:
        raise InstallError("rendering needs kubectl or kustomize on PATH; neither was found")
    try:
        done = run(argv, capture_output=True, text=True, timeout=KUSTOMIZE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        raise InstallError(f"{' '.join(argv)} failed: {done.stderr.strip()[:500]}")
    return parse_documents(done.stdout, source=" ".join(argv))


def parse_documents(text: str, *, source: str) -> list[dict[str, Any]]:
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InstallError(f"{source}: not YAML: {exc}") from None
    for index, doc in enumerate(documents):
        if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
            raise InstallError(f"{source}: document {index + 1} has no kind/apiVersion")
        if not (doc.get("metadata") or {}).get("name"):
            raise InstallError(f"{source}: {doc['kind']} document {index + 1} has no name")
    return documents


# ---------------------------------------------------------------------------------------------
# Where each kind lives


def pluralize(kind: str) -> str:
    """English plural of a lower-cased kind, as Kubernetes names its resources."""
    lower = kind.lower()
    if lower.endswith("y") and lower[-2:-1] not in tuple("aeiou"):
        return lower[:-1] + "ies"
    if lower.endswith(("s", "x", "z", "ch", "sh")):
        return lower + "es"
    return lower + "s"


class ResourceResolver:
    """kind -> (plural, namespaced), by discovery when served, else ``KNOWN_KINDS``."""

    def __init__(self, kube: Kube | None) -> None:
        self.kube = kube
        self._discovered: dict[str, dict[str, tuple[str, bool]]] = {}

    def _discover(self, api_version: str) -> dict[str, tuple[str, bool]]:
        if api_version not in self._discovered:
            found: dict[str, tuple[str, bool]] = {}
            if self.kube is not None:
                path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
                try:
                    answer = self.kube.get(path)
                except KubeApiError:
                    answer = {}
                for resource in answer.get("resources") or ():
                    name = str(resource.get("name", ""))
                    if isinstance(resource, Mapping) and resource.get("kind") and "/" not in name:
                        found[str(resource["kind"])] = (name, bool(resource.get("namespaced")))
            self._discovered[api_version] = found
        return self._discovered[api_version]

    def resolve(self, doc: Mapping[str, Any]) -> tuple[str, bool]:
        kind = str(doc["kind"])
        discovered = self._discover(str(doc["apiVersion"])).get(kind)
        if discovered is not None:
            return discovered
        if kind in KNOWN_KINDS:
            return KNOWN_KINDS[kind]
        return pluralize(kind), bool((doc.get("metadata") or {}).get("namespace"))

    def ref(self, doc: Mapping[str, Any], default_namespace: str) -> tuple[ResourceRef, str]:
        """The object's identity and its collection's path."""
        plural, namespaced = self.resolve(doc)
        meta = doc.get("metadata") or {}
        namespace = str(meta.get("namespace") or default_namespace) if namespaced else None
        ref = ResourceRef(str(doc["apiVersion"]), str(doc["kind"]), namespace, str(meta["name"]))
        return ref, api_path(ref.api_version, plural, namespace)


# ---------------------------------------------------------------------------------------------
# Applying and deleting


@dataclass(frozen=True)
class Outcome:
    ref: ResourceRef
    action: str  # created | configured | unchanged | deleted | not found | kept | would apply


def prepare_replacement(doc: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` made fit to PUT over ``live``: its resourceVersion, and the fields the server
    allocated that may not change (a Service's cluster IPs)."""
    result = dict(doc)
    meta = dict(result.get("metadata") or {})
    meta["resourceVersion"] = (live.get("metadata") or {}).get("resourceVersion")
    result["metadata"] = meta
    if doc.get("kind") == "Service" and doc.get("apiVersion") == "v1":
        spec = dict(result.get("spec") or {})
        live_spec = live.get("spec") or {}
        for immutable in ("clusterIP", "clusterIPs"):
            if immutable in live_spec and immutable not in spec:
                spec[immutable] = live_spec[immutable]
        result["spec"] = spec
    return result


def apply_document(
    kube: Kube, doc: Mapping[str, Any], resolver: ResourceResolver, default_namespace: str
) -> Outcome:
    ref, collection = resolver.ref(doc, default_namespace)
    body = dict(doc)
    if ref.namespace is not None:
        body["metadata"] = {**(doc.get("metadata") or {}), "namespace": ref.namespace}
    try:
        try:
            kube.create(collection, body)
            return Outcome(ref, "created")
        except AlreadyExists:
            pass
        object_path = f"{collection}/{ref.name}"
        for _attempt in range(3):  # someone else may write between our GET and PUT
            live = kube.get(object_path)
            try:
                stored = kube.replace(object_path, prepare_replacement(body, live))
            except Conflict:
                continue
            # An update that changes nothing keeps the resourceVersion (as kubectl's
            # "unchanged").
            before = (live.get("metadata") or {}).get("resourceVersion")
            after = (stored.get("metadata") or {}).get("resourceVersion")
            return Outcome(ref, "unchanged" if before == after else "configured")
        raise InstallError(f"{ref}: kept changing while being replaced; try again")
    except InstallError:
        raise
    except KubeError as exc:
        raise InstallError(f"{ref}: {exc}") from None


def install(
    kube: Kube, documents: Sequence[Mapping[str, Any]], *, report: Callable[[Outcome], None]
) -> list[Outcome]:
    resolver = ResourceResolver(kube)
    outcomes = []
    for doc in documents:
        outcome = apply_document(kube, doc, resolver, kube.namespace)
        report(outcome)
        outcomes.append(outcome)
    return outcomes


def dry_run(documents: Sequence[Mapping[str, Any]], default_namespace: str) -> list[Outcome]:
    """What ``install`` would apply, without contacting the cluster."""
    resolver = ResourceResolver(None)
    return [Outcome(resolver.ref(doc, default_namespace)[0], "would apply") for doc in documents]


def uninstall(
    kube: Kube,
    documents: Sequence[Mapping[str, Any]],
    *,
    purge: bool = False,
    report: Callable[[Outcome], None],
) -> list[Outcome]:
    """Delete in reverse order; a missing object is reported, not an error."""
    resolver = ResourceResolver(kube)
    outcomes = []
    for doc in reversed(documents):
        ref, collection = resolver.ref(doc, kube.namespace)
        if ref.kind == CRD_KIND and not purge:
            outcome = Outcome(ref, "kept")
        else:
            try:
                kube.delete(f"{collection}/{ref.name}")
                outcome = Outcome(ref, "deleted")
            except KubeApiError as exc:
                if exc.status != 404:
                    raise InstallError(f"{ref}: {exc}") from None
                outcome = Outcome(ref, "not found")
        report(outcome)
        outcomes.append(outcome)
    return outcomes


def outcome_row(outcome: Outcome) -> dict[str, Any]:
    return {
        "kind": outcome.ref.kind,
        "namespace": outcome.ref.namespace or "",
        "name": outcome.ref.name,
        "action": outcome.action,
    }
