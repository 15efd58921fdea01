"""The ``kubernetes`` client under Trio, and plain-JSON API calls through it.

The official client is synchronous (urllib3 underneath), so every call runs in a worker thread.
A cancelled Trio task must not wait for a thread blocked on the network: ``run_blocking``
abandons the thread (``abandon_on_cancel=True``) and calls an ``on_abandon`` hook that makes the
thread finish promptly, e.g. ``ResponseLines.abort`` shuts down a watch's socket. Calls without
such a hook are bounded by the request timeouts they pass to the client, so an abandoned thread
always ends.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio
import urllib3
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
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


# -- plain-JSON API calls ------------------------------------------------------------------
# Both answer plain dicts: ``JsonApi`` calls by path (leader election, the waypoint
# controller), ``call_json`` runs a generated client method (TokenReview, the CA Secret, the
# root ConfigMaps).

# (connect, read) seconds for each ``call_json``: a stuck API server must not hang a request.
REQUEST_TIMEOUT = (5.0, 10.0)


class KubeApiError(Exception):
    """A Kubernetes API call failed, whichever way it was made (``JsonApi``, ``call_json``, a
    watch's ERROR event). ``status`` is the HTTP status, None when no answer came at all;
    ``reason`` the Status reason (``NotFound``, ``Conflict``...), or what went wrong without an
    answer; ``message`` the server's explanation; ``call`` which call it was, for logs."""

    def __init__(self, call: str, status: int | None, reason: str, message: str = "") -> None:
        self.call = call
        self.status = status
        self.reason = reason
        self.message = message
        if status is None:
            summary = f"cannot reach the API server: {reason}"
        else:
            summary = f"{status} {reason}".rstrip()
        super().__init__(f"{summary}: {message} ({call})" if message else f"{summary} ({call})")


def _status_error(call: str, status: int, http_reason: str, body: Any) -> KubeApiError:
    """The error of an HTTP error answer: the reason and message of its Status body, if it is
    one, else the HTTP reason phrase."""
    try:
        decoded = json.loads(body) if body else {}
    except (TypeError, ValueError):
        decoded = {}
    if not isinstance(decoded, dict):
        decoded = {}
    return KubeApiError(
        call,
        status,
        str(decoded.get("reason") or http_reason or ""),
        str(decoded.get("message") or ""),
    )


class JsonApi:
    """Plain-JSON Kubernetes API calls through a ``kubernetes.client.ApiClient`` (its
    configuration, TLS and bearer token), each in a worker thread so Trio never blocks.

    Objects stay plain dicts, as the rest of istiod_lite reads them; the generated typed
    models would only be converted back."""

    def __init__(self, api_client: Any, *, request_timeout: float = 10.0) -> None:
        self.api_client = api_client
        self.request_timeout = request_timeout

    def _open(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Any,
        content_type: str,
        timeout: float | None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.api_client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            return self.api_client.call_api(
                method, url, header_params=headers, body=body, _request_timeout=timeout
            )
        except Exception as exc:  # urllib3/ApiException: no HTTP answer at all
            raise KubeApiError(f"{method} {path}", None, type(exc).__name__, str(exc)) from exc

    def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Any,
        content_type: str,
        timeout: float | None,
    ) -> dict[str, Any]:
        call = f"{method} {path}"
        response = self._open(method, path, query, body, content_type, timeout)
        try:
            data = response.read()
        except Exception as exc:
            raise KubeApiError(call, None, type(exc).__name__, str(exc)) from exc
        finally:
            response.response.release_conn()
        if response.status >= 400:
            raise _status_error(call, response.status, response.reason, data)
        try:
            decoded = json.loads(data) if data else {}
        except ValueError:
            decoded = {}
        if not isinstance(decoded, dict):
            raise KubeApiError(call, response.status, "BadResponse", "answer is not a JSON object")
        return decoded

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One call; raises ``KubeApiError`` for an error answer or none."""
        return await run_blocking(
            lambda: self._call(method, path, query, body, content_type, self.request_timeout),
            name=f"kube {method} {path}",
        )

    def open_watch(self, path: str, query: Mapping[str, str], timeout: float) -> Any:
        """Blocking: start a watch and return its raw streaming response (for
        ``client.open_response_lines``, which keeps a cancelled open from leaking it)."""
        response = self._open("GET", path, query, None, "application/json", timeout)
        if response.status >= 400:
            data = response.read()
            response.response.release_conn()
            raise _status_error(f"watch {path}", response.status, response.reason, data)
        return response.response


async def call_json(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a generated ``kubernetes`` client method in a worker thread (``run_blocking``; the
    request timeout bounds an abandoned thread) and return the JSON answer as a dict, without
    the client's model classes in between. Raises KubeApiError with the status and the
    server's reason."""
    call = getattr(function, "__name__", "call")

    def blocking() -> dict[str, Any]:
        try:
            response = function(
                *args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs
            )
        except ApiException as error:
            raise _status_error(call, error.status, error.reason, error.body) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeApiError(call, None, type(error).__name__, str(error)) from None
        try:
            data = json.loads(response.data)
        except ValueError as error:
            raise KubeApiError(call, response.status, "BadResponse",
                               f"answer is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise KubeApiError(call, response.status, "BadResponse", "answer is not a JSON object")
        return data

    return await run_blocking(blocking, name=f"kube {call}")
