"""The data-plane library every proxy stands on (ztunnel, the waypoint, the east-west gateway).

HBONE (client, server, sessions, pool, splice), TLS, workload certificates, the control-plane
connection and discovery client, the proxy state built from discovery, drain, the admin
server, the policy matchers and metric labels both policy engines and telemetries share, and
the runtime that owns a proxy's lifecycle. It imports the wire contract (``ambient_api``) and
``ambient_common``, never a proxy and never the control plane.
"""
