"""``kubectl ambient``: the commands that work on a Kubernetes cluster.

- ``api``: ``Kube``, the thin REST layer over the ``kubernetes`` client every command goes
  through (plain JSON dicts in and out), its errors, object accessors and namespace enrollment.
- ``cli``: the cluster commands' flags and handlers, and the embedded-or-cluster rule.
- ``install``: ``install`` / ``uninstall`` of the kustomize output.
- ``status``: ``status`` and ``check``, sans-IO rules over fetched objects.
- ``network_policy``: would a NetworkPolicy drop HBONE into enrolled pods? (sans-IO)
- ``waypoints``: ``waypoint apply|list|status|delete`` against a cluster.
- ``ztunnel_config``: a ztunnel pod's ``/config_dump`` through the API server's pod proxy.
"""
