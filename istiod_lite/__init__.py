"""istiod_lite: the control plane (sources, translation, CA, discovery server)."""
