"""Discovery updates built from resources, as istiod_lite sends them: for tests that feed
``ProxyState.apply`` or script a control plane's stream."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from ambient_api import codec, kinds
from ambient_api.discovery import DeltaUpdate, ResourceRemoval, ResourceUpdate

_nonces = itertools.count(1)


def resource_update(resource: kinds.AnyResource) -> ResourceUpdate:
    """``resource`` as one entry of a ``DeltaUpdate``: its kind, key, version and JSON."""
    return ResourceUpdate(
        kind=kinds.KIND_BY_TYPE[type(resource)],
        name=kinds.resource_key(resource),
        version=codec.content_version(resource),
        resource=codec.to_jsonable(resource),
    )


def delta(*resources: kinds.AnyResource, removed: Iterable[tuple[str, str]] = ()) -> DeltaUpdate:
    """An update adding or changing ``resources`` and removing each ``(kind, name)``; its
    nonce and system version count up with every call."""
    nonce = next(_nonces)
    return DeltaUpdate(
        nonce=str(nonce),
        system_version=nonce,
        resources=tuple(resource_update(r) for r in resources),
        removed=tuple(ResourceRemoval(kind, name) for kind, name in removed),
    )
