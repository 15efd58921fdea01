"""Telling HTTP from other bytes in a tunnel, sans-IO: an HTTP/1.x request line or the HTTP/2
prior-knowledge preface (the waypoint serves HTTP on a port whose protocol it was not told).
"""

from __future__ import annotations

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
_MAX_METHOD = 20
_MAX_SNIFFED_TARGET = 64 * 1024


def looks_like_http(prefix: bytes) -> bool | None:
    """True: an HTTP/1.x request line or the HTTP/2 preface; False: certainly not;
    None: a prefix of either, more bytes needed."""
    if prefix.startswith(H2_PREFACE):
        return True
    if not prefix or H2_PREFACE.startswith(prefix):
        return None
    method_end = 0
    while method_end < len(prefix) and prefix[method_end] in _METHOD_CHARS:
        method_end += 1
    if method_end == 0 or method_end > _MAX_METHOD:
        return False
    if method_end == len(prefix):
        return None
    if prefix[method_end] != 0x20:
        return False
    target_start = method_end + 1
    target_end = target_start
    while target_end < len(prefix) and 0x21 <= prefix[target_end] <= 0x7E:
        target_end += 1
    if target_end - target_start > _MAX_SNIFFED_TARGET:
        return False
    if target_end == len(prefix):
        return None
    if target_end == target_start or prefix[target_end] != 0x20:
        return False
    rest = prefix[target_end + 1:]
    for ending in (b"HTTP/1.0\r\n", b"HTTP/1.1\r\n", b"HTTP/1.0\n", b"HTTP/1.1\n"):
        if rest.startswith(ending):
            return True
        if ending.startswith(rest):
            return None
    return False
