"""ztunnel: the per-node L4 proxy (HBONE, identity, L4 policy, TCP telemetry)."""
