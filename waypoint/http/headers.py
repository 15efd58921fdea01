"""Header lists as the waypoint keeps them, sans-IO: reading, editing, and what may be sent.

Headers travel as ``(name, value)`` tuples with lower-case names, in order, repeats kept; the
HTTP/1.1 and HTTP/2 sides share them. A proxy re-frames each hop itself, so hop-by-hop headers
never cross it (``strip_hop_by_hop``), and whatever goes out must be valid on either protocol
(``sendable_headers``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ambient_dataplane.hbone.request_headers import CONTROL_CHARACTER, LOWER_CASE_TOKEN

Headers = tuple[tuple[str, str], ...]
HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]]
HeaderSource = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]
"""Headers to read: a mapping (one value per name) or (name, value) pairs as h11/h2 give them
(``str`` or latin-1 ``bytes``); names compare case-insensitively."""

# RFC 9110 7.6.1: meaningful for one hop only; a proxy re-frames each side itself.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade"}
)


def joined_header(headers: HeaderSource, name: str) -> str | None:
    values = header_values(headers, name)
    return ", ".join(values) if values else None


def header_values(headers: HeaderSource, name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive), in order."""
    wanted = name.lower()
    pairs: Iterable[tuple[str | bytes, str | bytes]] = (
        headers.items() if isinstance(headers, Mapping) else headers
    )
    values: list[str] = []
    for raw_name, raw_value in pairs:
        header_name = raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name
        if header_name.lower() == wanted:
            values.append(
                raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
            )
    return values


def _pairs(headers: HeaderInput) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(name.lower(), value) for name, value in items]


def modify_headers(
    headers: Iterable[tuple[str, str]],
    *,
    set: HeaderInput = (),
    add: HeaderInput = (),
    remove: Iterable[str] = (),
) -> Headers:
    """set (replace every occurrence, at the first one's place), add (append), remove."""
    result = list(headers)
    for name, value in _pairs(set):
        index = next((i for i, (key, _) in enumerate(result) if key == name), None)
        result = [(key, val) for key, val in result if key != name]
        result.insert(len(result) if index is None else index, (name, value))
    result.extend(_pairs(add))
    dropped = frozenset(name.lower() for name in remove)
    return tuple((key, value) for key, value in result if key not in dropped)


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> Headers:
    """Drop hop-by-hop headers, including any the Connection header names."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for key, value in pairs if key.lower() == "connection"
        for token in value.split(",") if token.strip()
    }
    dropped = HOP_BY_HOP | named
    return tuple((key, value) for key, value in pairs if key.lower() not in dropped)


def sendable_headers(headers: Iterable[tuple[str, str]]) -> tuple[Headers, list[str]]:
    """(headers that can go on the wire, names of those dropped): names are lower-cased and
    must be tokens, values latin-1 without control characters, trimmed (the h2 rule)."""
    kept: list[tuple[str, str]] = []
    dropped: list[str] = []
    for raw_name, value in headers:
        name = raw_name.lower()
        value = value.strip(" \t")
        if (not LOWER_CASE_TOKEN.fullmatch(name) or CONTROL_CHARACTER.search(value)
                or not _latin1(value)):
            dropped.append(name)
        else:
            kept.append((name, value))
    return tuple(kept), dropped


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True
