"""The names of the Istio and Kubernetes labels and annotations the mesh reads or writes.

One definition each, because the control plane (translation, the waypoint controller, the
root-certificate publisher) and ``ambientctl`` must agree on them to the letter: a typo in one
place would silently leave a namespace out of the mesh.
"""

from __future__ import annotations

# Mesh enrolment: a namespace labelled ``ambient`` is in the mesh; a pod labelled ``none``
# opts out.
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
AMBIENT = "ambient"

# Which waypoint an object (or its namespace) uses, and which traffic a waypoint takes.
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"

# Gateway API: the pods (and Service) deployed for a Gateway carry its name.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"

# The service account a waypoint Gateway's embedded workload runs as.
SERVICE_ACCOUNT_ANNOTATION = "istio.io/service-account"

# Telemetry names: what a workload's metrics are labelled with.
CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL = "service.istio.io/canonical-revision"

# Topology, on nodes (locality) and on pods or namespaces (network).
NETWORK_LABEL = "topology.istio.io/network"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"

# The GatewayClass that makes a Gateway a waypoint (Istio's).
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"
