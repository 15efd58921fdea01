"""The ``kubernetes`` client under Trio.

The official client is synchronous (urllib3 underneath), so every call runs in a worker thread.
A cancelled Trio task must not wait for a thread blocked on the network: ``run_blocking``
abandons the thread (``abandon_on_cancel=True``) and calls an ``on_abandon`` hook that makes the
thread finish promptly, e.g. ``ResponseLines.abort`` shuts down a watch's socket. Calls without
such a hook are bounded by the request timeouts they pass to the client, so an abandoned thread
always ends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

logger = structlog.get_logger(__name__)

T = TypeVar("T")

# Enough pooled connections for one long-lived watch per kind plus the lists and writes beside
# them; the client's default (5 per CPU) would discard connections and warn on small machines.
DEFAULT_POOL_SIZE = 32


class KubeConfigError(Exception):
    """No usable cluster configuration; the message says which input was wrong."""


def build_api_client(
    *,
    kubeconfig: Path | None = None,
    context: str | None = None,
    in_cluster: bool = False,
    pool_size: int = DEFAULT_POOL_SIZE,
) -> kube_client.ApiClient:
    """An ``ApiClient`` for a kubeconfig file (``context`` or its current one) or, with
    ``in_cluster``, for the pod's service account (token, CA and API address Kubernetes mounts
    into every pod; the token is re-read as the kubelet rotates it). The kubeconfig is never
    written back (refreshed credentials stay in memory)."""
    if in_cluster and (kubeconfig is not None or context is not None):
        raise KubeConfigError("in-cluster configuration takes no kubeconfig or context")
    configuration = kube_client.Configuration()
    try:
        if in_cluster:
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            if kubeconfig is not None and not Path(kubeconfig).is_file():
                raise KubeConfigError(f"kubeconfig {kubeconfig} does not exist")
            kube_config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig is not None else None,
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
    except ConfigException as error:
        where = (
            "in-cluster configuration"
            if in_cluster
            else f"kubeconfig {kubeconfig or '(default location)'}"
        )
        raise KubeConfigError(f"{where}: {error}") from None
    configuration.connection_pool_maxsize = pool_size
    return kube_client.ApiClient(configuration=configuration)


async def run_blocking(
    fn: Callable[[], T],
    *,
    name: str,
    limiter: trio.CapacityLimiter | None = None,
    on_abandon: Callable[[], None] | None = None,
) -> T:
    """Run a blocking client call in a worker thread named ``name`` (so a stuck call is easy
    to spot in a thread dump). If the caller is cancelled the thread is abandoned at once and
    ``on_abandon`` (which must not block) is called to make it finish."""
    try:
        return await trio.to_thread.run_sync(
            fn, abandon_on_cancel=True, limiter=limiter, thread_name=name
        )
    except trio.Cancelled:
        if on_abandon is not None:
            on_abandon()
        raise


class StreamAborted(Exception):
    """``ResponseLines.next_line`` after ``abort()``."""


class ResponseLines:
    """The lines of a streaming (``_preload_content=False``) response, e.g. a watch, read one
    at a time in worker threads, and abortable from any thread without blocking.

    ``abort()`` while a thread is blocked reading shuts the socket down, which wakes that read
    (closing the response from another thread could deadlock on the TLS lock the reader holds);
    the reader then closes the response itself. ``abort()`` with no read in progress closes the
    response directly."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self._lines: Iterator[str] = iter_resp_lines(response)
        self._lock = threading.Lock()
        self._reading = False
        self._aborted = False
        self._closed = False

    def next_line(self) -> str | None:
        """The next line (``""`` for a blank one), or None at the end of the stream. Blocks."""
        with self._lock:
            if self._aborted:
                raise StreamAborted("the stream was aborted")
            self._reading = True
        try:
            return next(self._lines, None)
        finally:
            with self._lock:
                self._reading = False
                aborted = self._aborted
            if aborted:
                self._close()

    def abort(self) -> None:
        """Stop the stream from any thread; never blocks. Idempotent."""
        with self._lock:
            self._aborted = True
            reading = self._reading
        if reading:
            connection = getattr(self._response, "connection", None)
            sock = getattr(connection, "sock", None)
            if sock is not None:
                # OSError: already closed by the peer or by the reader.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        else:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._response.close()
            self._response.release_conn()
        except Exception as error:  # a broken connection may fail to close; nothing to do
            logger.debug("closing a stream failed", error=repr(error))


async def open_response_lines(
    open_fn: Callable[[], Any], *, name: str, limiter: trio.CapacityLimiter | None = None
) -> ResponseLines:
    """Open a streaming response (``open_fn`` calls the client with
    ``_preload_content=False``) in a worker thread. If the caller is cancelled before the
    response arrives, the response the abandoned thread opens later is aborted, not leaked."""
    guard = threading.Lock()
    abandoned = False
    opened: ResponseLines | None = None

    def open_in_thread() -> ResponseLines:
        nonlocal opened
        lines = ResponseLines(open_fn())
        with guard:
            if abandoned:
                lines.abort()
                raise StreamAborted("abandoned while opening")
            opened = lines
        return lines

    def abandon() -> None:
        nonlocal abandoned
        with guard:
            abandoned = True
            pending = opened
        if pending is not None:
            pending.abort()

    return await run_blocking(open_in_thread, name=name, limiter=limiter, on_abandon=abandon)
