"""Kubernetes objects -> the wire model: what istiod does for the proxies.

``translate(objects, mesh)`` gives every resource for one snapshot of the cluster;
``IncrementalTranslator`` does the same for successive snapshots, reusing what did not
change. The modules, one concern each:

- ``mesh``: ``MeshConfig``, the mesh-wide settings every translator reads;
- ``incremental``: which objects a snapshot needs translated again;
- ``l4``: Nodes, Services, Workloads and ztunnel's Authorizations (``authorization``
  converts AuthorizationPolicy rules to L4 rules);
- ``waypoints``: waypoint Gateways, and which objects use which waypoint;
- ``routes``: HTTPRoute, TCPRoute, VirtualService, DestinationRule and LocalRateLimit ->
  ``l7`` resources, with the field converters of ``gateway_api``, ``istio`` and ``fields``;
- ``security``: waypoint AuthorizationPolicies and RequestAuthentications;
- ``common``: what they share (skip-and-log, label selectors, metadata accessors).
"""

from istiod_lite.translate.incremental import IncrementalTranslator, translate
from istiod_lite.translate.mesh import MeshConfig

__all__ = ["IncrementalTranslator", "MeshConfig", "translate"]
