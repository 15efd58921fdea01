"""Sockets made inside another network namespace (Istio's in-pod mode), Linux only.

ztunnel stays in the node's network namespace, but the sockets that serve a pod (its 15001,
15006 and 15008 listeners, and the connections it opens on the pod's behalf) are created
inside the pod's namespace. A socket belongs to the namespace it was created in for its whole
life, so only the ``socket()`` call has to happen "inside": the thread that makes it enters
the namespace with ``setns(2)`` and comes back at once. Everything after that (bind, listen,
accept, connect, I/O) is ordinary Trio.

``setns`` changes the namespace of the calling thread only, so it is done in a Trio worker
thread (never on the Trio thread, which would move the whole event loop), and the thread is
always put back where it was before it returns to Trio's thread cache.

Entering a namespace and setting ``SO_MARK`` need ``CAP_SYS_ADMIN`` / ``CAP_NET_ADMIN``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import trio

__all__ = [
    "NETNS_RUN_DIR",
    "NetnsError",
    "OriginalDestinationError",
    "connect_in",
    "entered",
    "netns_path",
    "open_tcp_listeners_in",
    "original_destination",
    "run_in",
]

NETNS_RUN_DIR = Path("/var/run/netns")
"""Where ``ip netns add NAME`` bind-mounts named namespaces."""

_CLONE_NEWNET = 0x40000000
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOCKADDR_IN_SIZE = 16
_SOCKADDR_IN6_SIZE = 28
_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
_IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

NetnsPath = str | os.PathLike[str]
_T = TypeVar("_T")


class NetnsError(Exception):
    """A network namespace could not be named, entered or left, or a socket could not be made
    in it; the message says which namespace and why."""


class OriginalDestinationError(NetnsError):
    """An accepted socket has no original destination (it was not redirected by the kernel's
    NAT, or conntrack does not know it)."""


def netns_path(name: str | os.PathLike[str]) -> Path:
    """The file that names a network namespace: ``/var/run/netns/<name>`` for a name given to
    ``ip netns add``, or an absolute path as is (e.g. ``/proc/<pid>/ns/net``)."""
    text = os.fspath(name)
    if not text:
        raise NetnsError("network namespace name is empty")
    if text.startswith("/"):
        return Path(text)
    if "/" in text or text in (".", ".."):
        raise NetnsError(
            f"network namespace name {text!r} is neither a plain name nor an absolute path"
        )
    return NETNS_RUN_DIR / text


def _setns(fd: int, what: str) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        try:
            setns(fd, _CLONE_NEWNET)
        except OSError as exc:
            raise NetnsError(f"setns into {what} failed: {exc.strerror}") from exc
        return
    libc = _libc()
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        hint = " (not a network namespace?)" if err == errno.EINVAL else ""
        raise NetnsError(f"setns into {what} failed: {os.strerror(err)}{hint}")


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.setns.restype = ctypes.c_int
        _LIBC = libc
    return _LIBC


def _on_trio_thread() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _current_thread_netns() -> str:
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


@contextlib.contextmanager
def entered(path: NetnsPath) -> Iterator[None]:
    """Run the body with the calling WORKER THREAD inside the network namespace at ``path``;
    the thread's own namespace is restored on exit, also when the body raises."""
    if _on_trio_thread():
        raise NetnsError(
            "entered() moves the calling thread; use it in a worker thread "
            "(trio.to_thread.run_sync or run_in()), never on the Trio thread"
        )
    target = os.fspath(path)
    try:
        original_fd = os.open(_current_thread_netns(), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"cannot open this thread's network namespace: {exc}") from exc
    try:
        try:
            target_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetnsError(f"cannot open network namespace {target}: {exc.strerror}") from exc
        try:
            _setns(target_fd, target)
        finally:
            os.close(target_fd)
        try:
            yield
        finally:
            # If this fails the thread is stranded in the pod's namespace: that must be loud.
            _setns(original_fd, "this thread's original network namespace")
    finally:
        os.close(original_fd)


def _call_in(path: NetnsPath, fn: Callable[[], _T]) -> _T:
    with entered(path):
        return fn()


async def run_in(path: NetnsPath, fn: Callable[[], _T]) -> _T:
    """Call the blocking ``fn()`` in a worker thread that is inside ``path``'s namespace.

    Not cancellable while it runs (the thread must come back before Trio reuses it), so
    ``fn`` must be quick: create sockets, not wait on them."""
    return await trio.to_thread.run_sync(_call_in, path, fn)


def _family_of(host: str, what: str) -> socket.AddressFamily:
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"{what} must be an IP address, got {host!r}") from exc
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _check_port(port: int, what: str, *, allow_zero: bool) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not (
        (0 if allow_zero else 1) <= port <= 65535
    ):
        raise ValueError(f"{what} must be a TCP port number, got {port!r}")


def _make_listener_socket(
    host: str, port: int, backlog: int, transparent: bool
) -> socket.socket:
    family = _family_of(host, "listener host")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


async def open_tcp_listeners_in(
    path: NetnsPath | None,
    port: int,
    host: str | None = None,
    *,
    backlog: int = 1024,
    transparent: bool = False,
) -> list[trio.SocketListener]:
    """TCP listeners whose sockets live in ``path``'s namespace (``None``: this one), bound
    to ``host:port`` with SO_REUSEADDR (``host`` None: every IPv4 address, ``0.0.0.0``).

    ``transparent`` sets IP_TRANSPARENT, needed to accept connections that TPROXY steers to
    addresses the socket is not bound to. Connections redirected by the REDIRECT rules of
    ``ztunnel.capture.rules`` arrive on the namespace's own addresses (127.0.0.1 for the
    pod's outbound traffic), so the 15001 listener must be bound to ``0.0.0.0`` or 127.0.0.1,
    not to the pod IP. A bind failure (port in use, address not in that namespace) raises
    ``OSError`` naming the namespace."""
    bind_host = "0.0.0.0" if host is None else host
    _family_of(bind_host, "listener host")
    _check_port(port, "listener port", allow_zero=True)

    def make() -> socket.socket:
        return _make_listener_socket(bind_host, port, backlog, transparent)

    try:
        sock = make() if path is None else await run_in(path, make)
    except OSError as exc:
        where = "this namespace" if path is None else os.fspath(path)
        raise OSError(
            exc.errno, f"cannot listen on {bind_host}:{port} in {where}: {exc.strerror}"
        ) from exc
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]


def _make_client_socket(
    family: socket.AddressFamily,
    local_address: str | None,
    mark: int | None,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            except PermissionError as exc:
                raise NetnsError(f"setting SO_MARK {mark:#x} needs CAP_NET_ADMIN") from exc
        if local_address is not None:
            if family == socket.AF_INET:
                # Pick the port at connect() time, so binding only the address does not use
                # up the ephemeral port range.
                sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((local_address, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_in(
    path: NetnsPath | None,
    host: str,
    port: int,
    *,
    local_address: str | None = None,
    mark: int | None = None,
    timeout: float = 10.0,
) -> trio.SocketStream:
    """A TCP connection to ``host:port`` (an IP address) made from inside ``path``'s
    namespace (``None``: this one), optionally from ``local_address`` and with
    ``SO_MARK = mark`` (``rules.BYPASS_MARK`` lets the pod's capture rules pass it).

    Raises ``OSError`` when the connection fails, ``trio.TooSlowError`` after ``timeout``
    seconds, ``NetnsError`` when the namespace cannot be used, ``ValueError`` for bad
    arguments."""
    family = _family_of(host, "destination host")
    _check_port(port, "destination port", allow_zero=False)
    if local_address is not None and _family_of(local_address, "local address") != family:
        raise ValueError(f"local address {local_address} and destination {host} differ in family")
    if mark is not None and (isinstance(mark, bool) or not 0 <= mark <= 0xFFFFFFFF):
        raise ValueError(f"mark must be a 32-bit unsigned integer, got {mark!r}")

    def make() -> socket.socket:
        return _make_client_socket(family, local_address, mark)

    raw = make() if path is None else await run_in(path, make)
    sock = trio.socket.from_stdlib_socket(raw)
    try:
        with trio.fail_after(timeout):
            await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


_SocketLike = socket.socket | trio.socket.SocketType | trio.SocketStream


def original_destination(sock: _SocketLike) -> tuple[str, int]:
    """The address an accepted, NAT-redirected connection was really sent to
    (``SO_ORIGINAL_DST``; ``IP6T_SO_ORIGINAL_DST`` for IPv6). Works on a stdlib socket, a Trio
    socket or a ``trio.SocketStream``; raises ``OriginalDestinationError`` when the kernel has
    none (no conntrack entry: the connection was not redirected)."""
    raw: socket.socket | trio.socket.SocketType = (
        sock.socket if isinstance(sock, trio.SocketStream) else sock
    )
    family = raw.family
    ipv4 = family == socket.AF_INET
    if family == socket.AF_INET6:
        local_host = raw.getsockname()[0]
        # An IPv4 connection accepted on a dual-stack IPv6 socket is tracked as IPv4.
        ipv4 = ipaddress.IPv6Address(local_host.split("%")[0]).ipv4_mapped is not None
    try:
        if ipv4:
            data = raw.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, _SOCKADDR_IN_SIZE)
        else:
            data = raw.getsockopt(socket.IPPROTO_IPV6, _IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_SIZE)
    except OSError as exc:
        raise OriginalDestinationError(
            f"no original destination for this connection ({exc.strerror}): "
            "it was not redirected by the capture rules"
        ) from exc
    if ipv4:
        if len(data) < 8:
            raise OriginalDestinationError(f"short SO_ORIGINAL_DST answer ({len(data)} bytes)")
        port = struct.unpack_from("!H", data, 2)[0]
        return str(ipaddress.IPv4Address(data[4:8])), port
    if len(data) < 24:
        raise OriginalDestinationError(f"short IP6T_SO_ORIGINAL_DST answer ({len(data)} bytes)")
    port = struct.unpack_from("!H", data, 2)[0]
    return str(ipaddress.IPv6Address(data[8:24])), port
