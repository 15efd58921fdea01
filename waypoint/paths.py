"""Request path normalization: Istio's ``meshConfig.pathNormalization``, as Envoy applies it.

Sans-IO. The waypoint normalizes a request's path **once**, before anything looks at it, and
that one path is what authorization compares, routing matches and the upstream receives:
checking a normalized path but forwarding the raw one lets ``/public/../admin`` past a DENY
on ``/admin*`` (CVE-2021-31920). The query string is forwarded byte for byte; a fragment
(which a client should never send) is dropped, as Envoy drops it.

The modes, each including the ones above it (Istio maps them onto Envoy's ``normalize_path``,
``merge_slashes`` and ``path_with_escaped_slashes_action``):

- ``NONE``: the path is forwarded as received.
- ``BASE`` (Istio's default): RFC 3986 normalization plus backslashes, as Envoy's
  ``normalize_path``: percent-encoded unreserved characters (``A-Z a-z 0-9 - . _ ~``) are
  decoded, every other escape is kept with upper-case hex digits (``%2f`` becomes ``%2F``),
  ``\\`` becomes ``/``, and ``.``/``..`` segments are removed (a ``..`` at the root stays at
  the root, RFC 3986 5.2.4). Escaped slashes (``%2F``, ``%5C``) stay escaped.
- ``MERGE_SLASHES``: then runs of ``/`` are merged into one.
- ``DECODE_AND_MERGE_SLASHES``: ``%2F`` and ``%5C`` are decoded first (Envoy's
  ``UNESCAPE_AND_FORWARD``), so ``/a%2Fb`` and ``/a%5Cb`` both become ``/a/b``.

Decoding happens once (``%252e`` stays ``%252e``). A path that cannot be normalized is refused
(``PathRejected``, a 400 for the client) rather than guessed at: a malformed escape (``%zz``,
a lone ``%``), ``%00`` (refused in every mode, as Istio does), or a character no path may
carry raw (controls, space, non-ASCII).
"""

from __future__ import annotations

import enum
import re


class PathNormalization(enum.Enum):
    """Istio's ``MeshConfig.ProxyPathNormalization.NormalizationType`` (names as in Istio)."""

    NONE = "NONE"
    BASE = "BASE"
    MERGE_SLASHES = "MERGE_SLASHES"
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"


class PathRejected(Exception):
    """The request's path cannot be normalized; ``reason`` says why (the 400's body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SLASHES = frozenset("/\\")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_RAW_PATH_CHARACTER = re.compile(r"[\x21-\x7e]*")  # visible ASCII: what a path may carry raw
_SLASH_RUN = re.compile(r"/{2,}")


def normalize_target(target: str, mode: PathNormalization = PathNormalization.BASE) -> str:
    """The request target (path and ``?query``) as the waypoint uses and forwards it.

    Raises PathRejected when the path cannot be normalized. The asterisk-form ``*`` (OPTIONS)
    is returned as it is."""
    target = target.partition("#")[0]
    if target == "*":
        return target
    path, question_mark, query = target.partition("?")
    if "%00" in path:
        raise PathRejected("the path contains %00, an encoded NUL")
    if mode is not PathNormalization.NONE:
        path = _normalized_path(path, mode)
    return path + question_mark + query


def policy_path(target: str) -> str:
    """The path authorization compares: the target without query and fragment, starting
    with ``/`` (``*`` compares as ``/*``). No normalization here: ``normalize_target`` has
    already produced the path that is forwarded, and policy must judge exactly that one."""
    path = target.partition("?")[0].partition("#")[0]
    return path if path.startswith("/") else "/" + path


def _normalized_path(path: str, mode: PathNormalization) -> str:
    if not _RAW_PATH_CHARACTER.fullmatch(path):
        raise PathRejected("the path contains a character that must be percent-encoded")
    if (path.startswith("/") and "%" not in path and "\\" not in path and "/." not in path
            and (mode is PathNormalization.BASE or "//" not in path)):
        return path  # nothing to decode, no dot segment, no slash to merge: already normal
    path = _decode_escapes(path, decode_slashes=mode is PathNormalization.DECODE_AND_MERGE_SLASHES)
    path = _remove_dot_segments("/" + path.replace("\\", "/").removeprefix("/"))
    if mode is not PathNormalization.BASE:
        path = _SLASH_RUN.sub("/", path)
    return path


def _decode_escapes(path: str, *, decode_slashes: bool) -> str:
    """One pass over the escapes: unreserved characters (and, if asked, ``/`` and ``\\``)
    decoded, the others kept with upper-case hex digits; a malformed escape is refused."""
    if "%" not in path:
        return path
    out: list[str] = []
    index = 0
    while (escape := path.find("%", index)) != -1:
        digits = path[escape + 1:escape + 3]
        if len(digits) != 2 or not _HEX_DIGITS.issuperset(digits):
            raise PathRejected(f"the path has a malformed percent-encoding at {path[escape:]!r}")
        char = chr(int(digits, 16))
        out.append(path[index:escape])
        if char in _UNRESERVED or (decode_slashes and char in _SLASHES):
            out.append(char)
        else:
            out.append("%" + digits.upper())
        index = escape + 3
    out.append(path[index:])
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: ``.`` dropped, ``..`` drops the segment before it
    (none at the root); a path ending in a dot segment keeps its trailing ``/``."""
    output: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)
