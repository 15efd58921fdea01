"""An in-test stand-in for the Kubernetes API server; see ``tests.kube.apiserver``."""
