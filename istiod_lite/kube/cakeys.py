"""The mesh CA's keys on Kubernetes, where Istio keeps them.

1. Secret ``cacerts`` (Istio's plug-in CA: ``ca-cert.pem``, ``ca-key.pem``, ``root-cert.pem``,
   ``cert-chain.pem``), when an operator provides one;
2. else Secret ``istio-ca-secret`` (type ``istio.io/ca-root``), Istio's home of its
   self-signed root: ``ca-cert.pem`` and ``ca-key.pem`` hold it, ``root-cert.pem`` repeats the
   root (newer Istio) and ``cert-chain.pem`` / ``key.pem`` are empty. If it does not exist we
   generate a root and create it, so a restart or a second replica keeps the same root. Two
   replicas starting together both try; the loser gets 409 AlreadyExists and uses the winner's.

Both are validated by ``CertificateAuthority.from_plugin_files``, exactly as a plug-in
directory is.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import structlog
from kubernetes import client as k8s

from istiod_lite.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_CHAIN_FILE,
    DEFAULT_MAX_TTL,
    DEFAULT_TTL,
    ROOT_CERT_FILE,
    CaConfigError,
    CertificateAuthority,
    Clock,
    KeyType,
    new_self_signed_root,
    self_signed_plugin_files,
    utc_now,
)
from istiod_lite.kube.client import KubeApiError, call_json

log = structlog.get_logger()

PLUGIN_SECRET = "cacerts"
SELF_SIGNED_SECRET = "istio-ca-secret"
SELF_SIGNED_SECRET_TYPE = "istio.io/ca-root"
# Istio's istio-ca-secret also carries these two, empty.
PRIVATE_KEY_FILE = "key.pem"


class KubeCaError(CaConfigError):
    """The CA's Secret cannot be read or written."""


def decode_secret_data(secret: Mapping[str, Any], where: str) -> dict[str, bytes]:
    """A Secret's ``data`` (base64, as the API serves it) as bytes per key; ``stringData`` is
    write-only and never served. Raises CaConfigError naming a key that is not base64."""
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise CaConfigError(f"{where}: data is not a mapping")
    decoded: dict[str, bytes] = {}
    for key, value in data.items():
        if not isinstance(value, str):
            raise CaConfigError(f"{where} key {key}: not a base64 string")
        try:
            decoded[str(key)] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise CaConfigError(f"{where} key {key}: not valid base64") from None
    return decoded


def self_signed_secret_files(data: Mapping[str, bytes]) -> dict[str, bytes | None]:
    """The plug-in view of ``istio-ca-secret``: the root is ``ca-cert.pem`` itself when
    ``root-cert.pem`` is absent or empty (older Istio releases left it empty)."""
    root = data.get(ROOT_CERT_FILE)
    if root is None or not root.strip():
        root = data.get(CA_CERT_FILE)
    return {
        CA_CERT_FILE: data.get(CA_CERT_FILE),
        CA_KEY_FILE: data.get(CA_KEY_FILE),
        ROOT_CERT_FILE: root,
        CERT_CHAIN_FILE: data.get(CERT_CHAIN_FILE),
    }


def self_signed_secret_body(namespace: str, files: Mapping[str, str]) -> k8s.V1Secret:
    """``istio-ca-secret`` as Istio writes it, from ``self_signed_plugin_files`` output."""
    contents = {
        CA_CERT_FILE: files[CA_CERT_FILE],
        CA_KEY_FILE: files[CA_KEY_FILE],
        ROOT_CERT_FILE: files[ROOT_CERT_FILE],
        CERT_CHAIN_FILE: "",
        PRIVATE_KEY_FILE: "",
    }
    return k8s.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=k8s.V1ObjectMeta(name=SELF_SIGNED_SECRET, namespace=namespace),
        type=SELF_SIGNED_SECRET_TYPE,
        data={key: base64.b64encode(value.encode()).decode() for key, value in contents.items()},
    )


def _key_label(namespace: str, name: str) -> Callable[[str], str]:
    """How errors name one key of a Secret."""
    return lambda key: f"Secret {namespace}/{name} key {key}"


async def _read_secret(core: k8s.CoreV1Api, namespace: str, name: str) -> dict[str, Any] | None:
    """The Secret, or None if it does not exist."""
    try:
        return await call_json(core.read_namespaced_secret, name, namespace)
    except KubeApiError as error:
        if error.status == 404:
            return None
        raise KubeCaError(f"cannot read Secret {namespace}/{name}: {error}") from None


async def load_or_create_ca(
    api_client: k8s.ApiClient,
    namespace: str = "istio-system",
    *,
    trust_domain: str,
    key_type: KeyType = "ecdsa-p256",
    default_ttl: timedelta = DEFAULT_TTL,
    max_ttl: timedelta = DEFAULT_MAX_TTL,
    now: Clock = utc_now,
) -> CertificateAuthority:
    """The mesh CA from ``cacerts``, else from ``istio-ca-secret`` (created with a new
    self-signed root on the very first start). Raises CaConfigError (KubeCaError for API
    failures) naming the Secret and key at fault."""
    core = k8s.CoreV1Api(api_client)
    options: dict[str, Any] = {
        "trust_domain": trust_domain, "default_ttl": default_ttl, "max_ttl": max_ttl, "now": now,
    }

    plugin = await _read_secret(core, namespace, PLUGIN_SECRET)
    if plugin is not None:
        where = f"Secret {namespace}/{PLUGIN_SECRET}"
        files = decode_secret_data(plugin, where)
        ca = CertificateAuthority.from_plugin_files(
            files, where=_key_label(namespace, PLUGIN_SECRET), **options
        )
        log.info("CA loaded from plug-in Secret", secret=f"{namespace}/{PLUGIN_SECRET}")
        return ca

    existing = await _read_secret(core, namespace, SELF_SIGNED_SECRET)
    if existing is None:
        root, key = new_self_signed_root(trust_domain, key_type=key_type, now=now)
        body = self_signed_secret_body(namespace, self_signed_plugin_files(root, key))
        try:
            await call_json(core.create_namespaced_secret, namespace, body)
        except KubeApiError as error:
            if error.status != 409:
                raise KubeCaError(
                    f"cannot create Secret {namespace}/{SELF_SIGNED_SECRET}: {error}"
                ) from None
            log.info(
                "another replica created the CA Secret first; using its root",
                secret=f"{namespace}/{SELF_SIGNED_SECRET}",
            )
            existing = await _read_secret(core, namespace, SELF_SIGNED_SECRET)
            if existing is None:
                raise KubeCaError(
                    f"Secret {namespace}/{SELF_SIGNED_SECRET} already existed on create but "
                    "is gone now; retry"
                ) from None
        else:
            log.info("self-signed root created", secret=f"{namespace}/{SELF_SIGNED_SECRET}")
            return CertificateAuthority(
                trust_domain=trust_domain, signing_cert=root, signing_key=key, root=root,
                default_ttl=default_ttl, max_ttl=max_ttl, now=now,
            )

    where = f"Secret {namespace}/{SELF_SIGNED_SECRET}"
    stored = self_signed_secret_files(decode_secret_data(existing, where))
    ca = CertificateAuthority.from_plugin_files(
        stored, where=_key_label(namespace, SELF_SIGNED_SECRET), **options
    )
    ca.check_saved_root(where, f"delete {where}")
    log.info("CA loaded from self-signed Secret", secret=f"{namespace}/{SELF_SIGNED_SECRET}")
    return ca
