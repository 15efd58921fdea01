"""The waypoint's HTTP/1.1 client codec (sans-IO): a request written out, a response read back.

The upstream side of every request goes through here, so it is a few string operations and
one regular expression per header rather than a general state machine (h11 was a fifth of
the waypoint's CPU per request). It is strict where it matters for a proxy: framing follows
RFC 9112 section 6.3 (Transfer-Encoding chunked beats Content-Length; conflicting lengths,
unknown codings, malformed chunks and oversized heads or bodies are errors), and a
connection is offered for reuse only when the response was framed, kept alive and nothing
followed it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[\x21-\x7e]+")
_STATUS_LINE = re.compile(rb"HTTP/(\d\.\d) (\d{3})(?: [\t \x21-\x7e\x80-\xff]*)?")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\x00-\x08\x0a-\x1f\x7f]*"
                    rb"[^\x00-\x08\x0a-\x1f\x7f \t])?)[ \t]*")
_FOLD = re.compile(rb"[ \t]+((?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x08\x0a-\x1f\x7f \t])?)"
                   rb"[ \t]*")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_MAX_CHUNK_LINE = 4096
_NO_BODY_STATUS = (204, 304)


class ResponseError(Exception):
    """The response cannot be read: malformed, over a limit, or cut short (``incomplete``:
    the stream ended before the response did)."""

    def __init__(self, reason: str, *, incomplete: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.incomplete = incomplete


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[str, str]]  # as received (names lower-cased), hop-by-hop included
    body: bytes
    reusable: bool  # kept alive, framed, and nothing received after it


def render_request(
    method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes
) -> bytes:
    """The request's bytes. ``headers`` must already be sendable (``headers.sendable_headers``)
    and carry the framing (a Content-Length when there is a body); the method and target are
    checked here, as a rewrite can produce a bad one. Raises ValueError."""
    if not _METHOD.fullmatch(method):
        raise ValueError(f"illegal method {method!r}")
    if not _TARGET.fullmatch(target):
        raise ValueError(f"illegal request target {target!r}")
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1") + body


class ResponseParser:
    """One response to one request, fed the bytes as they arrive (``feed(b"")`` at the end
    of the stream); ``response()`` is None until it is complete. 1xx answers are skipped."""

    def __init__(self, request_method: str, *, max_head_bytes: int, max_body_bytes: int) -> None:
        self._head_request = request_method == "HEAD"
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        self._buffer = bytearray()
        self._eof = False
        self._head: tuple[int, list[tuple[str, str]], bool] | None = None
        self._length: int | None = None  # bytes of body still expected (Content-Length)
        self._chunked = False
        self._until_eof = False
        self._body: list[bytes] = []
        self._size = 0
        self._chunk_left = 0  # data of the current chunk still due
        self._chunk_crlf = False  # the current chunk's data is in, its CRLF is due
        self._in_trailers = False
        self._done: Response | None = None
        self.received = False  # any byte at all (a response was started)

    def feed(self, data: bytes) -> None:
        if data:
            self.received = True
            self._buffer += data
        else:
            self._eof = True

    def response(self) -> Response | None:
        """The complete response, or None for more data. Raises ResponseError."""
        if self._done is None:
            while self._head is None and self._parse_head():
                pass
            if self._head is None or not self._parse_body():
                if self._eof:
                    raise ResponseError("the stream ended mid-response", incomplete=True)
                return None
        return self._done

    # -- head ----------------------------------------------------------------------------

    def _parse_head(self) -> bool:
        """One head (1xx ones are dropped); False when it has not all arrived."""
        end = _HEAD_END.search(self._buffer, 0, self._max_head + 4)
        if end is None:
            if len(self._buffer) > self._max_head:
                raise ResponseError(f"response head exceeds {self._max_head} bytes")
            return False
        raw = bytes(self._buffer[:end.start()])
        del self._buffer[:end.end()]
        status_line, *field_lines = _LINE_END.split(raw)
        match = _STATUS_LINE.fullmatch(status_line)
        if match is None:
            raise ResponseError(f"malformed status line {status_line[:100]!r}")
        version, status = match.group(1), int(match.group(2))
        headers = _fields(field_lines)
        if status < 200:
            if status == 101:
                raise ResponseError("101 Switching Protocols to a request that asked for none")
            return True  # 100 Continue, 103 Early Hints: not forwarded; the next head follows
        self._frame(status, headers, keep_alive=version >= b"1.1")
        return True

    def _frame(self, status: int, headers: list[tuple[str, str]], *, keep_alive: bool) -> None:
        """The body's framing (RFC 9112 6.3) and whether the connection can be reused."""
        lengths: set[str] = set()
        codings: list[str] = []
        for name, value in headers:
            if name == "content-length":
                lengths.update(part.strip() for part in value.split(","))
            elif name == "transfer-encoding":
                codings += [part.strip().lower() for part in value.split(",") if part.strip()]
            elif name == "connection" and "close" in (
                part.strip().lower() for part in value.split(",")
            ):
                keep_alive = False
        if self._head_request or status in _NO_BODY_STATUS:
            self._length = 0
        elif codings:
            if codings != ["chunked"]:
                raise ResponseError(f"unsupported transfer coding {', '.join(codings)!r}")
            self._chunked = True
            keep_alive = keep_alive and not lengths  # both framings: do not trust the rest
        elif lengths:
            length = lengths.pop()
            if lengths or not length.isdigit() or not length.isascii():
                raise ResponseError("invalid or conflicting Content-Length")
            self._length = int(length)
            if self._length > self._max_body:
                raise ResponseError(f"response body of {self._length} bytes exceeds "
                                    f"{self._max_body}")
        else:
            self._until_eof = True
            keep_alive = False
        self._head = (status, headers, keep_alive)

    # -- body ----------------------------------------------------------------------------

    def _parse_body(self) -> bool:
        if self._chunked:
            complete = self._parse_chunks()
        elif self._length is not None:
            take = min(self._length, len(self._buffer))
            self._append(bytes(self._buffer[:take]))
            del self._buffer[:take]
            self._length -= take
            complete = self._length == 0
        else:  # until the end of the stream
            self._append(bytes(self._buffer))
            self._buffer.clear()
            complete = self._eof
        if not complete:
            return False
        assert self._head is not None
        status, headers, keep_alive = self._head
        self._done = Response(status, headers, b"".join(self._body),
                              keep_alive and not self._buffer)
        return True

    def _parse_chunks(self) -> bool:
        buffer = self._buffer
        while True:
            if self._chunk_left:  # the rest of a chunk's data
                take = min(self._chunk_left, len(buffer))
                self._append(bytes(buffer[:take]))
                del buffer[:take]
                self._chunk_left -= take
                if self._chunk_left:
                    return False
                self._chunk_crlf = True
            elif self._chunk_crlf:  # the CRLF that ends a chunk's data
                if len(buffer) < 2:
                    return False
                if buffer[:2] != b"\r\n":
                    raise ResponseError("malformed chunked body: no CRLF after a chunk")
                del buffer[:2]
                self._chunk_crlf = False
            else:  # a chunk-size line, or after the last chunk a trailer line
                line = self._line()
                if line is None:
                    return False
                if self._in_trailers:
                    if not line:
                        return True
                    _fields([line])  # validated, then dropped (trailers are not forwarded)
                    continue
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise ResponseError("malformed chunked body: bad chunk size line")
                self._chunk_left = int(match.group(1), 16)
                self._in_trailers = self._chunk_left == 0

    def _line(self) -> bytes | None:
        """The next line of the buffer without its end, or None until it has arrived."""
        end = _LINE_END.search(self._buffer, 0, _MAX_CHUNK_LINE + 2)
        if end is None:
            if len(self._buffer) > _MAX_CHUNK_LINE:
                raise ResponseError("malformed chunked body: line too long")
            return None
        line = bytes(self._buffer[:end.start()])
        del self._buffer[:end.end()]
        return line

    def _append(self, data: bytes) -> None:
        if not data:
            return
        self._size += len(data)
        if self._size > self._max_body:
            raise ResponseError(f"response body exceeds {self._max_body} bytes")
        self._body.append(data)


def _fields(lines: list[bytes]) -> list[tuple[str, str]]:
    """Header (or trailer) lines as (lower-cased name, value); a line folded onto the
    previous one (obs-fold) is joined to it with a space, as RFC 9112 5.2 lets a client do."""
    fields: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise ResponseError("malformed header: continuation line first")
            fold = _FOLD.fullmatch(line)
            if fold is None:
                raise ResponseError(f"malformed header line {line[:100]!r}")
            name, value = fields[-1]
            folded = fold.group(1).decode("latin-1")
            fields[-1] = (name, f"{value} {folded}" if value and folded else value or folded)
            continue
        match = _FIELD.fullmatch(line)
        if match is None:
            raise ResponseError(f"malformed header line {line[:100]!r}")
        fields.append((match.group(1).decode("ascii").lower(), match.group(2).decode("latin-1")))
    return fields


__all__ = ["Response", "ResponseError", "ResponseParser", "render_request"]
