"""``kubectl ambient``: talking to a Kubernetes API server, and enrolling namespaces.

Every cluster command goes through ``Kube``: a thin layer over the ``kubernetes`` client's
``ApiClient`` (kubeconfig loading, TLS, bearer tokens and exec plugins are the client's) that
speaks plain REST paths and returns plain JSON dicts. Plain dicts rather than the client's
typed models keep the analysis code sans-IO (it reads ``obj["spec"]["podSelector"]`` exactly as
the YAML a user wrote) and avoid the models' client-side validation choking on a field the
models do not know. Kubeconfig: ``--kubeconfig`` if given, else the client's default loading
rules (``$KUBECONFIG`` or ``~/.kube/config``, read by the library as kubectl does); no module
of ours reads the environment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from istiod_lite.labels import AMBIENT, DATAPLANE_MODE_LABEL

DEFAULT_NAMESPACE = "default"
REQUEST_TIMEOUT = 15.0
LIST_PAGE_SIZE = 500

MERGE_PATCH = "application/merge-patch+json"

Obj = dict[str, Any]


class KubeError(Exception):
    """A cluster command failed for a reason the message explains (exit code 1)."""


class KubeApiError(KubeError):
    """The API server answered with an error status (a Kubernetes ``Status`` object)."""

    def __init__(self, method: str, path: str, status: int, reason: str, message: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{method} {path}: {status} {reason}: {message}".rstrip(": "))


class NotFound(KubeApiError):
    """404: the object (or the whole API, for a CRD that is not installed) does not exist."""


class AlreadyExists(KubeApiError):
    """409 on create."""


class Conflict(KubeApiError):
    """409 on replace: the object changed since it was read."""


def api_error(method: str, path: str, status: int, body: bytes) -> KubeApiError:
    """The typed error for a failed request, with the Status object's reason and message."""
    reason, message = "", body.decode("utf-8", "replace").strip()[:300]
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, Mapping) and parsed.get("kind") == "Status":
        reason = str(parsed.get("reason") or "")
        message = str(parsed.get("message") or message)
    if status == 404:
        return NotFound(method, path, status, reason or "NotFound", message)
    if status == 409:
        cls = AlreadyExists if reason == "AlreadyExists" or method == "POST" else Conflict
        return cls(method, path, status, reason or "Conflict", message)
    return KubeApiError(method, path, status, reason or _STATUS_REASONS.get(status, ""), message)


_STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    410: "Gone",
    422: "Invalid",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def api_path(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The REST path of a collection or object: ``v1`` is the core group under ``/api``."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespace is not None:
        parts.append(f"namespaces/{quote(namespace, safe='')}")
    parts.append(plural)
    if name is not None:
        parts.append(quote(name, safe=""))
        if subresource is not None:
            parts.append(subresource)
    return "/".join(parts)


@dataclass(frozen=True)
class KubeOptions:
    """The kubectl-style connection flags."""

    kubeconfig: Path | None = None
    context: str | None = None


class Kube:
    """A connection to one API server (one kubeconfig context)."""

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.timeout = timeout

    @property
    def host(self) -> str:
        return str(self.api_client.configuration.host)

    @classmethod
    def connect(cls, options: KubeOptions, *, timeout: float = REQUEST_TIMEOUT) -> Kube:
        """Load the kubeconfig as kubectl would; the namespace is the context's, else default."""
        config_file = str(options.kubeconfig) if options.kubeconfig is not None else None
        if options.kubeconfig is not None and not options.kubeconfig.is_file():
            raise KubeError(f"kubeconfig {options.kubeconfig} does not exist")
        try:
            contexts, current = k8s_config.list_kube_config_contexts(config_file)
            configuration = k8s_client.Configuration()
            k8s_config.load_kube_config(
                config_file=config_file,
                context=options.context,
                client_configuration=configuration,
                persist_config=False,
            )
        except ConfigException as exc:
            raise KubeError(f"kubeconfig: {exc}") from None
        except OSError as exc:  # e.g. the default ~/.kube/config is missing
            raise KubeError(f"kubeconfig: {exc}") from None
        # One quick retry for a blip; a dead server should fail fast, not after urllib3's 3.
        configuration.retries = 1
        wanted = options.context or (current or {}).get("name")
        namespace = context_namespace(contexts or [], wanted)
        return cls(k8s_client.ApiClient(configuration), namespace, timeout=timeout)

    def close(self) -> None:
        self.api_client.close()

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------
    # REST

    def request_raw(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int | bool] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """One request; the body of a 2xx answer, else a ``KubeApiError``."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        query_params = [(k, _query_value(v)) for k, v in (query or {}).items()]
        try:
            serialized = self.api_client.param_serialize(
                method,
                path,
                query_params=query_params or None,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.api_client.call_api(
                *serialized, _request_timeout=timeout or self.timeout
            )
            data: bytes = response.read()
        except urllib3.exceptions.HTTPError as exc:
            raise KubeError(
                f"cannot reach the API server at {self.host}: {connection_problem(exc)}"
            ) from None
        except k8s_client.ApiException as exc:  # TLS failures surface as status 0
            raise KubeError(f"cannot reach the API server at {self.host}: {exc.reason}") from None
        if not 200 <= response.status < 300:
            raise api_error(method, path, response.status, data)
        return data

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        data = self.request_raw(method, path, **kwargs)
        try:
            return json.loads(data) if data else None
        except ValueError:
            raise KubeError(f"{method} {path}: the answer is not JSON: {data[:200]!r}") from None

    def get(self, path: str, query: Mapping[str, str | int | bool] | None = None) -> Obj:
        result = self.request("GET", path, query=query)
        if not isinstance(result, dict):
            raise KubeError(f"GET {path}: expected an object, got {type(result).__name__}")
        return result

    def get_optional(self, path: str) -> Obj | None:
        try:
            return self.get(path)
        except NotFound:
            return None

    def list(self, path: str, **selectors: str | None) -> list[Obj]:
        """Every item of a collection, following ``continue`` tokens page by page.

        ``selectors``: ``label_selector`` / ``field_selector``."""
        return list(self.iter_list(path, **selectors))

    def iter_list(self, path: str, **selectors: str | None) -> Iterator[Obj]:
        query: dict[str, str | int | bool] = {"limit": LIST_PAGE_SIZE}
        for key, value in selectors.items():
            if value:
                query[_camel(key)] = value
        while True:
            page = self.get(path, query)
            items = page.get("items") or []
            if not isinstance(items, list):
                raise KubeError(f"GET {path}: 'items' is not a list")
            yield from (item for item in items if isinstance(item, dict))
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return
            query["continue"] = token

    def create(self, path: str, body: Mapping[str, Any]) -> Obj:
        return _object(self.request("POST", path, body=dict(body)), "POST", path)

    def replace(self, path: str, body: Mapping[str, Any]) -> Obj:
        return _object(self.request("PUT", path, body=dict(body)), "PUT", path)

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Obj:
        result = self.request("PATCH", path, body=dict(patch), content_type=MERGE_PATCH)
        return _object(result, "PATCH", path)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def served(self, api_version: str, plural: str) -> bool:
        """Is this resource served (its CRD installed)? Asks for one item, not the CRD object,
        so it needs only list permission on the resource itself."""
        try:
            self.get(api_path(api_version, plural), {"limit": 1})
        except NotFound:
            return False
        return True


def connection_problem(exc: urllib3.exceptions.HTTPError) -> str:
    """The cause of a failed connection without urllib3's pool and retry wrapping
    (``Failed to establish a new connection: [Errno 111] Connection refused``)."""
    cause: BaseException = exc
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        cause = exc.reason
    text = str(cause)
    _, sep, rest = text.partition("): ")  # drop "HTTPConnection(host=..., port=...)"
    return rest if sep and rest else text


def _object(result: Any, method: str, path: str) -> Obj:
    if not isinstance(result, dict):
        raise KubeError(f"{method} {path}: expected an object in the answer")
    return result


def _query_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


def context_namespace(contexts: Sequence[Mapping[str, Any]], name: str | None) -> str:
    """The namespace a kubeconfig context names, else ``default`` (kubectl's rule)."""
    for context in contexts:
        if context.get("name") == name:
            namespace = (context.get("context") or {}).get("namespace")
            return str(namespace) if namespace else DEFAULT_NAMESPACE
    return DEFAULT_NAMESPACE


# ---------------------------------------------------------------------------------------------
# Object field access shared by the commands (sans-IO)


def metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def name_of(obj: Mapping[str, Any]) -> str:
    return str(metadata(obj).get("name", ""))


def namespace_of(obj: Mapping[str, Any]) -> str:
    return str(metadata(obj).get("namespace", ""))


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels = metadata(obj).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def conditions_of(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    status = obj.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    if not isinstance(conditions, list):
        return []
    return [c for c in conditions if isinstance(c, Mapping)]


def condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in conditions_of(obj):
        if cond.get("type") == kind:
            return cond
    return None


# ---------------------------------------------------------------------------------------------
# enroll / unenroll


@dataclass(frozen=True)
class LabelChange:
    namespace: str
    label: str
    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def describe(self) -> str:
        if not self.changed:
            state = f"{self.label}={self.after}" if self.after is not None else f"no {self.label}"
            return f"namespace {self.namespace} unchanged (already {state})"
        if self.after is None:
            return f"namespace {self.namespace}: removed label {self.label}={self.before}"
        if self.before is None:
            return f"namespace {self.namespace}: labeled {self.label}={self.after}"
        return f"namespace {self.namespace}: {self.label} {self.before} -> {self.after}"


def set_namespace_label(kube: Kube, namespace: str, label: str, value: str | None) -> LabelChange:
    """Set (or, with None, remove) one label of a Namespace by JSON merge patch; a missing
    namespace is an error naming it. Nothing is written when the label is already so."""
    path = api_path("v1", "namespaces", name=namespace)
    current = kube.get_optional(path)
    if current is None:
        raise KubeError(f"namespace {namespace!r} does not exist")
    before = labels_of(current).get(label)
    before = None if before is None else str(before)
    if before != value:
        kube.merge_patch(path, {"metadata": {"labels": {label: value}}})
    return LabelChange(namespace, label, before, value)


def enroll(kube: Kube, namespace: str) -> LabelChange:
    """Put ``namespace``'s pods in the ambient mesh: ``istio.io/dataplane-mode=ambient``."""
    return set_namespace_label(kube, namespace, DATAPLANE_MODE_LABEL, AMBIENT)


def unenroll(kube: Kube, namespace: str) -> LabelChange:
    return set_namespace_label(kube, namespace, DATAPLANE_MODE_LABEL, None)
