"""Kubernetes objects -> the wire model: what istiod does for the proxies.

``translate(objects, mesh)`` gives every resource for one snapshot of the cluster;
``IncrementalTranslator`` does the same for successive snapshots, reusing what did not
change. The modules, one concern each:

- ``mesh``: ``MeshConfig``, the mesh-wide settings every translator reads;
- ``incremental``: which objects a snapshot needs translated again;
- ``l4``: Nodes, Services, Workloads and ztunnel's Authorizations (``authorization``
  converts AuthorizationPolicy rules to L4 rules);
- ``policy_values``: the AuthorizationPolicy values both policy translators parse
  (principals, service accounts, ports, addresses);
- ``waypoints``: waypoint Gateways, and which objects use which waypoint;
- ``routes``: HTTPRoute, TCPRoute, VirtualService, DestinationRule and LocalRateLimit ->
  ``l7`` resources, with the field converters of ``gateway_api``, ``istio`` and ``fields``;
- ``security``: waypoint AuthorizationPolicies (``jwt_policies``: RequestAuthentications;
  ``targets``: the ``targetRefs`` both use);
- ``common``: what they share (skip-and-log, ``PolicyError`` and failing closed, label
  selectors, metadata accessors).

A policy that cannot be translated as written never widens access: it is made to allow less
or deny more, logged, and listed in ``IncrementalTranslator.policy_errors``.
"""

from istiod_lite.translate.common import PolicyError
from istiod_lite.translate.incremental import IncrementalTranslator, translate
from istiod_lite.translate.mesh import MeshConfig

__all__ = ["IncrementalTranslator", "MeshConfig", "PolicyError", "translate"]
