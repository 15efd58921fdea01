"""The discovery stream's HTTP content-coding ``deflate``: one zlib stream (RFC 1950) per
response, written one message at a time.

A full set of 10,000 workloads is ~7.5 MB of JSON and compresses ~19x; sending it to 100
proxies uncompressed was most of istiod's CPU (and the proxies'). Two properties make the
compression almost free per proxy:

* every message ends on a sync flush, so a client decodes it as soon as it arrives;
* every segment is compressed by a fresh compressor (no history across segments), so
  segments concatenate into one valid stream and a part shared by many streams (the full
  set, the delta every in-sync proxy gets) is compressed once.

A discovery stream never ends normally: the client disconnects, or istiod shuts down and
ends it at a message boundary. It therefore never carries the zlib trailer (the final block
and Adler-32); clients decode incrementally and lose nothing (httpx's decoder, used by the
proxies, reads it as is). Any HTTP client that streams ``Content-Encoding: deflate`` can read
it; a client that does not ask for deflate gets plain NDJSON.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

# zlib header: deflate with a 32 KiB window, default compression (RFC 1950 2.2).
ZLIB_HEADER = b"\x78\x9c"
COMPRESSION_LEVEL = 6
# Parts up to this size go out as stored (uncompressed) blocks.
_STORED_LIMIT = 256


def accepts_deflate(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows ``deflate`` (not with ``q=0``)."""
    for item in accept_encoding.split(","):
        coding, _, parameters = item.partition(";")
        if coding.strip().lower() not in ("deflate", "*"):
            continue
        name, _, value = parameters.strip().partition("=")
        if name.strip().lower() != "q":
            return True
        try:
            return float(value) > 0
        except ValueError:
            return False
    return False


def compress_segment(data: bytes) -> bytes:
    """``data`` compressed on its own (no history), ending on a sync flush: a piece that can
    follow any other in a deflate stream and is decodable as soon as it arrives."""
    if len(data) <= _STORED_LIMIT:
        # A stored block (RFC 1951 3.2.4): a message's few framing bytes are not worth a
        # compressor (~60 us to set up, per message per stream).
        size = len(data)
        return b"\x00" + size.to_bytes(2, "little") + (size ^ 0xFFFF).to_bytes(2, "little") + data
    compressor = zlib.compressobj(COMPRESSION_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


class SegmentCache:
    """Compressed segments of the few large parts many streams send (the same bytes object
    to each: a shared delta's JSON), by identity; a part seen once is simply compressed."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._entries: OrderedDict[int, tuple[bytes, bytes]] = OrderedDict()

    def segment(self, data: bytes) -> bytes:
        entry = self._entries.get(id(data))
        if entry is not None and entry[0] is data:
            self._entries.move_to_end(id(data))
            return entry[1]
        segment = compress_segment(data)
        self._entries[id(data)] = (data, segment)  # holding data keeps its id unique
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return segment
