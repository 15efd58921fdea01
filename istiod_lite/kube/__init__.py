"""Talking to a Kubernetes API server with the official (synchronous) ``kubernetes`` client
from Trio code: building the client, and running its blocking calls in worker threads."""

from istiod_lite.kube.client import (
    KubeConfigError,
    ResponseLines,
    StreamAborted,
    build_api_client,
    open_response_lines,
    run_blocking,
)

__all__ = [
    "KubeConfigError",
    "ResponseLines",
    "StreamAborted",
    "build_api_client",
    "open_response_lines",
    "run_blocking",
]
