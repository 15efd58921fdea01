"""How ztunnel dials out: plain TCP (to the local app inbound, to a destination outside the
mesh outbound) and the HBONE connections of its pool; and how it ends a TCP connection
abortively (``reset_on_close``), so that its peer sees an error rather than a clean end.

Without capture (the embedded mode) connections leave from the node's namespace. Under in-pod
capture they leave from inside the pod's own network namespace, marked with ``BYPASS_MARK``
so the pod's rules let ztunnel's own connection pass instead of capturing it again.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from functools import partial
from pathlib import Path

import trio

from ambient_dataplane.hbone import HboneClient, connect
from ambient_dataplane.hbone.pool import PoolKey
from ambient_dataplane.identity import TlsContexts
from ztunnel import socks5
from ztunnel.capture import netns
from ztunnel.capture.rules import BYPASS_MARK
from ztunnel.errors import UpstreamConnectError


def reset_on_close(stream: trio.SocketStream) -> None:
    """Make closing ``stream`` send a RST (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):  # already gone: nothing to reset
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def connect_tcp(ip: str, port: int) -> trio.SocketStream:
    """A TCP connection to an IP address literal.

    ``trio.open_tcp_stream`` runs its happy-eyeballs machinery (a nursery, a task and a
    cancel scope per attempt) even for a single literal address; on a connection that
    carries a few bytes that is a measurable share of the proxy's CPU (bench ``churn``).
    ``ip`` comes from the proxy's state, always an address. Raises OSError."""
    family = trio.socket.AF_INET6 if ":" in ip else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def connect_upstream(
    ip: str, port: int, *, timeout: float, pod_netns: Path | None = None
) -> trio.SocketStream:
    """TCP to ``ip:port`` within ``timeout``: from the node, or from inside ``pod_netns``
    with the bypass mark (a captured pod). UpstreamConnectError says why not, with the SOCKS5
    reply that fits the cause."""
    try:
        with trio.fail_after(timeout):
            if pod_netns is None:
                return await connect_tcp(ip, port)
            return await netns.connect_in(pod_netns, ip, port, mark=BYPASS_MARK,
                                          timeout=timeout)
    except trio.TooSlowError:
        raise UpstreamConnectError(f"connect to {ip}:{port} timed out after {timeout}s",
                                   reply_code=socks5.TTL_EXPIRED) from None
    except netns.NetnsError as exc:
        raise UpstreamConnectError(f"connect to {ip}:{port} failed: {exc}",
                                   reply_code=socks5.GENERAL_FAILURE) from None
    except OSError as exc:
        code = (socks5.CONNECTION_REFUSED if exc.errno == errno.ECONNREFUSED
                else socks5.HOST_UNREACHABLE)
        raise UpstreamConnectError(f"connect to {ip}:{port} failed: {exc.strerror or exc}",
                                   reply_code=code) from None


async def connect_hbone(
    key: PoolKey,
    nursery: trio.Nursery,
    *,
    tls_contexts: TlsContexts,
    connect_timeout: float,
    max_streams: int,
) -> HboneClient:
    """One HBONE connection for the pool (its ``connect_fn``, with the keywords bound):
    mTLS as ``key.source_identity`` to the peer that must be ``key.destination_identity``,
    from the source pod's namespace when it is captured. Raises OSError without a
    certificate."""
    context = tls_contexts.client(key.source_identity)
    if context is None:
        raise OSError(f"no certificate for {key.source_identity}")
    ip, port = key.destination_address
    open_socket = None
    if key.source_netns is not None:
        open_socket = partial(
            netns.connect_in, Path(key.source_netns), local_address=key.source_ip,
            mark=BYPASS_MARK, timeout=connect_timeout,
        )
    return await connect(
        ip, port, context, key.destination_identity, nursery=nursery,
        max_streams=max_streams, local_address=key.source_ip,
        connect_timeout=connect_timeout, open_socket=open_socket,
    )
