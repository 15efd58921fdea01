"""The embedded mesh: istiod_lite, one ztunnel per node and the sample apps as child processes.

``ambientctl up`` and the demo run a whole mesh on one machine without Kubernetes: the config
directory holds the Kubernetes objects (Nodes give each ztunnel its loopback address, Pods their
IPs and ports, waypoint Gateways their ``spec.addresses``), istiod_lite serves them, and this
package starts and watches the processes. One module per concept, each importing only those
above it:

- ``errors``: ``EmbeddedError`` and ``EmbeddedConfigError``.
- ``layout``: what to run (``MeshLayout``: nodes, sample apps, waypoints), read from the
  config directory; sans-IO apart from reading the files.
- ``state_dir``: the state directory (``StatePaths``: certificates, tokens, logs,
  ``mesh.json``, ``children.json``) and the bootstrap tokens written into it.
- ``istiod_log``: istiod's config problems read from its log, echoed by ``up``, listed by
  ``check``.
- ``commands``: the command line of each child (istiod, ztunnel, waypoint, sample app).
- ``supervisor``: ``Supervisor``, which starts named child processes and stops them without
  leaving orphans, also under ``ambientctl lab``.
- ``mesh``: ``EmbeddedMesh`` and ``run_embedded``, which start the children in order, wait
  for them to be ready and follow the config directory's waypoints live.
"""
