"""Turning one discovery ``ResourceUpdate`` into the model object it names, validated as the
state's indexes need it: all of an update is decoded before any of it is applied, so a bad
resource (``DecodeError`` naming kind/name) rejects the update as a whole.
"""

from __future__ import annotations

from typing import Any

from ambient_api import codec, kinds
from ambient_api.codec import DecodeError
from ambient_api.discovery import ResourceUpdate
from ambient_api.model import Node, Service, Workload
from ambient_dataplane.state.addresses import canonical_ip


def decode_resource(item: ResourceUpdate) -> Any:
    """Decode and validate one resource; raises DecodeError naming kind/name."""
    where = f"{item.kind}/{item.name}"
    cls = kinds.TYPE_BY_KIND.get(item.kind)
    if cls is None:
        raise DecodeError(f"{where}: unknown resource kind {item.kind!r}")
    if not isinstance(item.resource, dict):
        raise DecodeError(f"{where}: expected an object, got {type(item.resource).__name__}")
    try:
        resource: Any = codec.from_jsonable(cls, item.resource, where)
    except DecodeError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. an unhashable value where an enum goes
        raise DecodeError(f"{where}: {exc}") from None
    key = kinds.resource_key(resource)
    if key != item.name:
        raise DecodeError(f"{where}: the resource's key is {key!r}, not {item.name!r}")
    _validate(resource, where)
    return resource


def _validate(resource: Any, where: str) -> None:
    """Reject what the decoder lets through but the indexes cannot hold."""
    if isinstance(resource, Workload):
        for address in resource.addresses:
            _require_ip(address, f"{where}.addresses")
    elif isinstance(resource, Service):
        for network_address in resource.addresses:
            _require_ip(network_address.address, f"{where}.addresses")
        for mapping in resource.ports:
            if not 1 <= mapping.service_port <= 65535:
                raise DecodeError(f"{where}.ports: service_port {mapping.service_port} "
                                  "is not in 1-65535")
            if not 0 <= mapping.target_port <= 65535:
                raise DecodeError(f"{where}.ports: target_port {mapping.target_port} "
                                  "is not in 0-65535")
    elif isinstance(resource, Node):
        _require_ip(resource.address, f"{where}.address")


def _require_ip(value: str, where: str) -> None:
    if canonical_ip(value) is None:
        raise DecodeError(f"{where}: {value!r} is not an IP address")
