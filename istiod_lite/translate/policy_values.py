"""AuthorizationPolicy values as both policy translators read them (``authorization.py`` for
ztunnel, ``security.py`` for waypoints), so that the two cannot drift apart.

Each parser raises ``PolicyValueError`` naming the field and the bad value. A value that is
not checked here would not fail loudly later: the proxies' matchers treat an unparsable
address as "never matches", which in a ``not_`` field excludes nothing and so would allow
what the policy meant to exclude.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from istiod_lite.translate.mesh import MeshConfig


class PolicyValueError(ValueError):
    """A policy value that cannot be translated; the message starts with the field."""


def strings(value: Any, field: str) -> tuple[str, ...]:
    """A list of strings (YAML numbers are read as their text); None reads as empty."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(v, str | int) and not isinstance(v, bool) for v in value
    ):
        raise PolicyValueError(f"{field} must be a list of strings")
    return tuple(str(v) for v in value)


def principal(value: str) -> str:
    """Principals are kept as Istio users write them, without the ``spiffe://`` scheme."""
    return value.removeprefix("spiffe://")


def principals(value: Any, field: str) -> tuple[str, ...]:
    return tuple(principal(v) for v in strings(value, field))


def service_account_principals(
    value: Any, field: str, policy_namespace: str, mesh: MeshConfig
) -> tuple[str, ...]:
    """``serviceAccounts`` entries -> principals ``<trust domain>/ns/<ns>/sa/<sa>``: an entry
    is ``<ns>/<sa>``, or a bare ``<sa>`` in the policy's own namespace (Istio's
    ``stringToServiceAccountMatch``)."""
    found = []
    for entry in strings(value, field):
        namespace, slash, account = entry.rpartition("/")
        if not slash:
            namespace = policy_namespace
        if not namespace or not account or "/" in namespace:
            raise PolicyValueError(f"{field}: {entry!r} is not <namespace>/<name> or <name>")
        found.append(f"{mesh.trust_domain}/ns/{namespace}/sa/{account}")
    return tuple(found)


def ports(value: Any, field: str) -> tuple[int, ...]:
    """Port numbers written as strings (``'8080'``), 0-65535 as Istio reads them."""
    found = []
    for text in strings(value, field):
        if not text.strip().isdecimal() or int(text) > 65535:
            raise PolicyValueError(f"{field}: {text!r} is not a port number (0-65535)")
        found.append(int(text))
    return tuple(found)


def addresses(value: Any, field: str) -> tuple[str, ...]:
    """IP addresses or CIDR blocks, checked here (see the module docstring), kept as
    written."""
    found = strings(value, field)
    for text in found:
        try:
            ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise PolicyValueError(
                f"{field}: {text!r} is not an IP address or CIDR block"
            ) from None
    return found
