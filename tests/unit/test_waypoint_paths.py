"""Path normalization (waypoint.paths): every mode, as Istio documents and Envoy applies it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint import paths
from waypoint.paths import PathNormalization, PathRejected, normalize_target, policy_path

NONE = PathNormalization.NONE
BASE = PathNormalization.BASE
MERGE = PathNormalization.MERGE_SLASHES
DECODE = PathNormalization.DECODE_AND_MERGE_SLASHES

# target, then what NONE, BASE, MERGE_SLASHES and DECODE_AND_MERGE_SLASHES make of it.
TABLE = [
    ("/a/b", "/a/b", "/a/b", "/a/b", "/a/b"),
    # dot segments, literal and percent-encoded in either case
    ("/admin/..", "/admin/..", "/", "/", "/"),
    ("/public/../admin", "/public/../admin", "/admin", "/admin", "/admin"),
    ("/a/./b", "/a/./b", "/a/b", "/a/b", "/a/b"),
    ("/a/./b/../c", "/a/./b/../c", "/a/c", "/a/c", "/a/c"),
    ("/a/b/..", "/a/b/..", "/a/", "/a/", "/a/"),
    ("/a/b/.", "/a/b/.", "/a/b/", "/a/b/", "/a/b/"),
    ("/../../etc", "/../../etc", "/etc", "/etc", "/etc"),  # never above the root
    ("/public/%2e%2e/admin", "/public/%2e%2e/admin", "/admin", "/admin", "/admin"),
    ("/%2E%2e/x", "/%2E%2e/x", "/x", "/x", "/x"),
    ("/a/.%2E/b", "/a/.%2E/b", "/b", "/b", "/b"),
    ("/a..b/..c", "/a..b/..c", "/a..b/..c", "/a..b/..c", "/a..b/..c"),  # not dot segments
    # backslashes: a separator from BASE on
    ("/admin\\users", "/admin\\users", "/admin/users", "/admin/users", "/admin/users"),
    ("/public\\..\\admin", "/public\\..\\admin", "/admin", "/admin", "/admin"),
    ("\\admin", "\\admin", "/admin", "/admin", "/admin"),
    # double slashes: merged from MERGE_SLASHES on, leading and trailing ones too
    ("/a//b", "/a//b", "/a//b", "/a/b", "/a/b"),
    ("//a///b//", "//a///b//", "//a///b//", "/a/b/", "/a/b/"),
    ("/a//..", "/a//..", "/a/", "/a/", "/a/"),  # RFC normalization first, then merging
    # escaped slash and backslash: kept (hex upper-cased) until DECODE_AND_MERGE_SLASHES
    ("/a%2Fb", "/a%2Fb", "/a%2Fb", "/a%2Fb", "/a/b"),
    ("/a%2fb", "/a%2fb", "/a%2Fb", "/a%2Fb", "/a/b"),
    ("/a%5Cb", "/a%5Cb", "/a%5Cb", "/a%5Cb", "/a/b"),
    ("/a%5cb", "/a%5cb", "/a%5Cb", "/a%5Cb", "/a/b"),
    ("/admin%2F..%2Fx", "/admin%2F..%2Fx", "/admin%2F..%2Fx", "/admin%2F..%2Fx", "/x"),
    ("/a%2F%2Fb", "/a%2F%2Fb", "/a%2F%2Fb", "/a%2F%2Fb", "/a/b"),
    # unreserved characters decoded in either case; the rest kept, upper-cased
    ("/%7Euser/%61", "/%7Euser/%61", "/~user/a", "/~user/a", "/~user/a"),
    ("/%41%5a%30%2d%5F", "/%41%5a%30%2d%5F", "/AZ0-_", "/AZ0-_", "/AZ0-_"),
    ("/a%20b%3f", "/a%20b%3f", "/a%20b%3F", "/a%20b%3F", "/a%20b%3F"),
    ("/%252e%252e/x", "/%252e%252e/x", "/%252e%252e/x", "/%252e%252e/x", "/%252e%252e/x"),
    # queries are forwarded untouched, fragments dropped
    ("/a/../b?x=/../c//d%2f", "/a/../b?x=/../c//d%2f", "/b?x=/../c//d%2f", "/b?x=/../c//d%2f",
     "/b?x=/../c//d%2f"),
    ("/a//b?q=%zz", "/a//b?q=%zz", "/a//b?q=%zz", "/a/b?q=%zz", "/a/b?q=%zz"),
    ("/a?", "/a?", "/a?", "/a?", "/a?"),
    ("/a/./b#frag", "/a/./b", "/a/b", "/a/b", "/a/b"),
    ("/a#f?q", "/a", "/a", "/a", "/a"),
    # the root, the empty path and OPTIONS *
    ("/", "/", "/", "/", "/"),
    ("", "", "/", "/", "/"),
    ("*", "*", "*", "*", "*"),
]


@pytest.mark.parametrize(("target", "none", "base", "merge", "decode"), TABLE)
def test_every_mode(target: str, none: str, base: str, merge: str, decode: str) -> None:
    assert normalize_target(target, NONE) == none
    assert normalize_target(target, BASE) == base
    assert normalize_target(target, MERGE) == merge
    assert normalize_target(target, DECODE) == decode


def test_base_is_the_default() -> None:
    assert normalize_target("/a//./b\\c") == normalize_target("/a//./b\\c", BASE) == "/a//b/c"


@pytest.mark.parametrize("mode", [BASE, MERGE, DECODE])
@pytest.mark.parametrize("target", [row[0] for row in TABLE])
def test_normalizing_twice_changes_nothing(target: str, mode: PathNormalization) -> None:
    once = normalize_target(target, mode)
    assert normalize_target(once, mode) == once


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("/a%zzb", "malformed percent-encoding at '%zzb'"),
        ("/a%2", "malformed percent-encoding at '%2'"),
        ("/a%", "malformed percent-encoding at '%'"),
        ("/a%%41", "malformed percent-encoding at '%%41'"),
        ("/a%0g", "malformed percent-encoding at '%0g'"),
        ("/a%00b", "%00, an encoded NUL"),
        ("/a b", "character that must be percent-encoded"),
        ("/a\tb", "character that must be percent-encoded"),
        ("/caf\u00e9", "character that must be percent-encoded"),
        ("/a\x7fb", "character that must be percent-encoded"),
    ],
)
@pytest.mark.parametrize("mode", [BASE, MERGE, DECODE])
def test_a_path_that_cannot_be_normalized_is_refused(
    target: str, reason: str, mode: PathNormalization
) -> None:
    with pytest.raises(PathRejected) as refused:
        normalize_target(target, mode)
    assert reason in refused.value.reason
    assert "the path" in str(refused.value)


def test_none_forwards_anything_but_an_encoded_nul() -> None:
    assert normalize_target("/a%zz/../b", NONE) == "/a%zz/../b"
    with pytest.raises(PathRejected, match="%00"):
        normalize_target("/a%00", NONE)
    assert normalize_target("/a?x=%00", BASE) == "/a?x=%00"  # the query is not the path


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a/b", "/a/b"),
        ("/a/b?x=/../c", "/a/b"),
        ("/a/b#x", "/a/b"),
        ("/a/../b", "/a/../b"),  # policy judges the path as normalized, not a second time
        ("", "/"),
        ("*", "/*"),
    ],
)
def test_policy_path(target: str, expected: str) -> None:
    assert policy_path(target) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a/b", "/a/b"),
        ("/a/b?x=/../c", "/a/b"),
        ("/a/./b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/../../etc", "/etc"),
        ("/%7Euser/%61", "/~user/a"),
        ("/a%2fb", "/a%2Fb"),  # an escaped slash stays escaped (Istio's default)
        ("/%2E%2e/x", "/x"),
        ("", "/"),
        ("*", "/*"),
    ],
)
def test_the_path_policy_sees_by_default(target: str, expected: str) -> None:
    assert policy_path(normalize_target(target)) == expected


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.text(alphabet="/.\\%2fFeE5cCa-_~", max_size=24),
       st.sampled_from([m for m in PathNormalization if m is not PathNormalization.NONE]))
def test_the_already_normal_shortcut_agrees_with_the_full_normalization(
    path: str, mode: PathNormalization
) -> None:
    """The fast path taken for ordinary paths returns what the full steps would."""
    try:
        full = paths._remove_dot_segments("/" + paths._decode_escapes(
            path, decode_slashes=mode is PathNormalization.DECODE_AND_MERGE_SLASHES,
        ).replace("\\", "/").removeprefix("/"))
    except PathRejected:
        with pytest.raises(PathRejected):
            normalize_target(path, mode)
        return
    if mode is not PathNormalization.BASE:
        full = paths._SLASH_RUN.sub("/", full)
    assert normalize_target(path, mode) == full
