"""The HBONE layer's errors: one base, each with the HTTP status that best answers it.

Like h11's ``error_status_hint``, ``status_hint`` tells whoever catches an error which status
to answer its own peer with, so callers need not map error types to statuses themselves:

- ``HboneRejection``: a request the server answers itself (its ``status``), without the
  handler; ``MalformedHeaders`` is the 400 for a header block that breaks RFC 9113.
- ``HboneConnectError``: our CONNECT did not get a 200 (503: the destination is unavailable
  to whoever asked us).
- ``HboneProtocolError``: the peer broke the HTTP/2 framing HBONE relies on (400).

A connection that ends (peer gone, transport broken, protocol error) is not an error raised
here: its streams raise trio's BrokenResourceError with the reason, as trio streams do.
"""

from __future__ import annotations


class HboneError(Exception):
    """Base of the HBONE layer's errors; ``reason`` is for humans (logs, reason headers)."""

    status_hint: int = 400
    reason: str


class HboneProtocolError(HboneError):
    """The peer sent HTTP/2 that HBONE cannot act on (e.g. a GOAWAY frame too short)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HboneRejection(HboneError):
    """A request the server answers with ``status`` without involving the handler."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.status_hint = status


class MalformedHeaders(HboneRejection):
    """A request header block that RFC 9113 calls malformed; ``header`` is the name of the
    offending header (as received, decoded latin-1). Answered 400 on its own stream."""

    def __init__(self, header: str, reason: str) -> None:
        super().__init__(400, reason)
        self.header = header


class HboneConnectError(HboneError):
    """A CONNECT that did not get a 200; ``status`` is None when no HTTP answer came back.

    ``retryable``: the server certainly did not act on it (the connection drains, or the stream
    was refused), so it may be sent again on another connection.
    """

    status_hint = 503

    def __init__(self, status: int | None, reason: str, *, retryable: bool = False) -> None:
        super().__init__(f"{status}: {reason}" if status is not None else reason)
        self.status = status
        self.reason = reason
        self.retryable = retryable
