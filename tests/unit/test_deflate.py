"""The discovery stream's deflate coding: segments compressed on their own concatenate into
one zlib stream that decodes message by message."""

from __future__ import annotations

import zlib

import pytest

from istiod_lite.deflate import ZLIB_HEADER, SegmentCache, accepts_deflate, compress_segment


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("gzip, deflate", True),
        ("deflate;q=0.5", True),
        ("DEFLATE", True),
        ("*", True),
        ("gzip, deflate;q=0", False),
        ("deflate;q=nonsense", False),
        ("gzip, br", False),
        ("identity", False),
        ("", False),
    ],
)
def test_accepts_deflate(header: str, expected: bool) -> None:
    assert accepts_deflate(header) is expected


def test_independent_segments_decode_as_one_stream_message_by_message() -> None:
    shared = b'{"kind":"workload","name":"x"}' * 1000
    messages = [(b'{"nonce":"1",', shared, b'}\n'), (b'{"nonce":"2",', b"", b'}\n')]
    decoder = zlib.decompressobj()  # zlib format, as an HTTP client decodes "deflate"
    first = True
    for parts in messages:
        wire = (ZLIB_HEADER if first else b"") + b"".join(compress_segment(p) for p in parts)
        first = False
        # Everything of a message comes out as soon as its bytes arrive (sync flush).
        assert decoder.decompress(wire) == b"".join(parts)
    assert len(compress_segment(shared)) < len(shared) // 20


def test_segment_cache_compresses_a_shared_part_once() -> None:
    cache = SegmentCache(size=2)
    shared = b"x" * 10_000
    first = cache.segment(shared)
    assert cache.segment(shared) is first
    equal_but_other = bytes(bytearray(shared))
    assert cache.segment(equal_but_other) is not first  # identity, not equality
    cache.segment(b"y" * 100)
    assert cache.segment(shared) is not first  # evicted: size 2
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(first) == shared


def test_a_few_bytes_go_out_as_a_stored_block() -> None:
    segment = compress_segment(b'{"nonce":"1",')
    assert segment == b"\x00\x0d\x00\xf2\xff" + b'{"nonce":"1",'
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(segment) == b'{"nonce":"1",'
