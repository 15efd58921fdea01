"""RFC 9113 request header block rules, sans-IO: the one validation of every HTTP/2 server in
the mesh (the HBONE server's CONNECTs, the waypoint's HTTP/2 requests).

Both servers turn h2's own header validation off, so that a malformed request costs one stream
(answered 400) instead of h2 ending every stream on the connection; this is therefore the whole
syntax check of a request's header block. What the request means (CONNECT or not, which
:path forms) is each server's own business.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import NamedTuple

from ambient_dataplane.hbone.errors import MalformedHeaders

# RFC 9113 section 8.3.1.
REQUEST_PSEUDO_HEADERS = frozenset({":method", ":scheme", ":authority", ":path"})
# RFC 9113 section 8.2.2; TE is allowed with the value "trailers" only.
CONNECTION_SPECIFIC_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
# What HTTP/2 allows as a field name (use fullmatch), and the characters no field value may
# hold (RFC 9110 5.5: HTAB is the only control character allowed); also what a proxy may send.
LOWER_CASE_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class RequestHeaderBlock(NamedTuple):
    """A valid request header block: pseudo-headers by name, regular headers in order (names
    lower-case tokens, values as received); both decoded latin-1, losslessly."""

    pseudo: dict[str, str]
    regular: list[tuple[str, str]]


def validate_request_headers(
    raw: Sequence[tuple[bytes, bytes]],
    *,
    pseudo_headers: Collection[str] = REQUEST_PSEUDO_HEADERS,
) -> RequestHeaderBlock:
    """Check a received request header block against RFC 9113 sections 8.2 and 8.3.

    ``pseudo_headers``: the ones the server knows (a server that recognises RFC 8441's
    :protocol, to refuse it by name, adds it). Raises MalformedHeaders naming the header: a
    pseudo-header unknown, repeated or after a regular header; a name empty or not a
    lower-case token; a value with a control character; a connection-specific header.
    """
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if not value.isprintable() and CONTROL_CHARACTER.search(value):  # (a fast path first)
            raise MalformedHeaders(name, f"header {name!r} has a control character")
        if name.startswith(":"):
            if regular:
                raise MalformedHeaders(name, f"pseudo-header {name} after regular headers")
            if name not in pseudo_headers:
                raise MalformedHeaders(name, f"unknown request pseudo-header {name}")
            if name in pseudo:
                raise MalformedHeaders(name, f"duplicate pseudo-header {name}")
            pseudo[name] = value
            continue
        if not name:
            raise MalformedHeaders(name, "empty header name")
        if not LOWER_CASE_TOKEN.fullmatch(name):
            raise MalformedHeaders(name, f"header name {name!r} is not a lower-case token")
        if name in CONNECTION_SPECIFIC_HEADERS or (
            name == "te" and value.strip(" \t") != "trailers"
        ):
            raise MalformedHeaders(
                name, f"connection-specific header {name!r} is not allowed in HTTP/2"
            )
        regular.append((name, value))
    return RequestHeaderBlock(pseudo, regular)
