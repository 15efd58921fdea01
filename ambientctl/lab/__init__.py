"""``ambientctl lab``: the mesh in a small cluster of network namespaces (root only).

``lab up`` turns the same Kubernetes YAML the embedded mode reads into a network namespace per
node and per pod, nodes joined by a bridge, and runs istiod_lite, one ztunnel per node (in-pod
capture) and the sample apps inside; ``lab down`` removes every trace, even after a crash.
Nothing here changes the host's namespace: every command names a lab namespace. One module per
concept, each importing only those above it:

- ``errors``: ``LabPlanError`` (the YAML or flags do not describe a lab) and ``LabError``.
- ``steps``: the typed network steps, each one command with its inverse (sans-IO).
- ``plan``: ``plan_lab``, which decides names, addresses, routes and the steps (sans-IO).
- ``state``: the state directory (``LabPaths``) and the record ``lab.json``.
- ``netns``: the ``ip`` commands run on the host (``CommandRunner`` is the tests' seam).
- ``config``: the YAML with lab addresses and the netns maps the lab's mesh reads.
- ``network``: ``build_network`` and ``take_down``, the record kept step by step.
- ``probe``: readiness probes run inside a lab namespace (``python -m ambientctl.lab.probe``).
- ``mesh``: ``run_lab`` and ``Lab``, the mesh's processes inside the built network.
- ``status`` and ``execute``: ``lab status`` and ``lab exec``.
- ``cli``: the ``lab`` command's flags and handlers.
"""
