"""pubsub.core.glob against Redis 7's stringmatchlen, case by case.

Every expected value in CASES is what redis-server 7.0.15 answers; the live tests
at the bottom check the table (and pubsub.core.glob on every pattern x channel pair of
it) against a private redis-server through PUBSUB CHANNELS.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pubsub.core.glob import compile_pattern, literal_prefix, match
from tests.support.redis_server import redis_server
from tests.support.resp3 import Push, Resp3Client

# Patterns near Redis's limit of 1,000 nested '*' expansions.
STARS_1000 = b"*a" * 1000  # 1,000 recursing stars: still matches
STARS_1001 = b"*a" * 1001  # 1,001 recursing stars: never matches
A_1000 = b"a" * 1000
A_5000 = b"a" * 5000

# (pattern, channel, expected), each verified against redis-server 7.0.15.
CASES: list[tuple[bytes, bytes, bool]] = [
    # literals, case-sensitively
    (b"news", b"news", True),
    (b"news", b"News", False),
    (b"news", b"new", False),
    (b"news", b"newsx", False),
    (b"a", b"A", False),
    # '*'
    (b"*", b"a", True),
    (b"*", b"anything.at:all", True),
    (b"*", b"\xff\x00\x80", True),
    (b"a*", b"a", True),
    (b"a*", b"abc", True),
    (b"a*", b"ba", False),
    (b"*a", b"a", True),
    (b"*a", b"bba", True),
    (b"*a", b"ab", False),
    (b"a*b", b"ab", True),
    (b"a*b", b"axxb", True),
    (b"a*b", b"axxbx", False),
    (b"a*b*c", b"abc", True),
    (b"a*b*c", b"aXbYc", True),
    (b"a*b*c", b"acb", False),
    (b"news.*", b"news.sport.football", True),
    (b"news.*", b"news.", True),
    (b"news.*", b"news", False),
    (b"A*", b"abc", False),
    # consecutive stars
    (b"**", b"x", True),
    (b"***", b"xyz", True),
    (b"a**b", b"ab", True),
    (b"a***b", b"axyb", True),
    (b"a**", b"a", True),
    (b"**a**", b"bab", True),
    (b"**a**", b"bbb", False),
    # '?'
    (b"?", b"a", True),
    (b"?", b"\xff", True),
    (b"?", b"ab", False),
    (b"a?c", b"abc", True),
    (b"a?c", b"ac", False),
    (b"a?c", b"a\x00c", True),
    (b"h?llo", b"hello", True),
    (b"??", b"\xff\x00", True),
    (b"?", "é".encode(), False),  # '?' is one byte, not one character
    (b"??", "é".encode(), True),
    (b"?*", b"a", True),
    (b"*?", b"ab", True),
    # the empty channel: only the empty pattern matches it, not even '*'
    (b"", b"", True),
    (b"", b"a", False),
    (b"*", b"", False),
    (b"**", b"", False),
    (b"?", b"", False),
    (b"*?", b"", False),
    (b"a", b"", False),
    (b"[^]", b"", False),
    (b"[^", b"", False),
    (b"\\", b"", False),
    # sets
    (b"[abc]", b"a", True),
    (b"[abc]", b"c", True),
    (b"[abc]", b"d", False),
    (b"[abc]", b"ab", False),
    (b"[abc]", b"", False),
    (b"h[ae]llo", b"hallo", True),
    (b"h[ae]llo", b"hillo", False),
    (b"[*]", b"*", True),
    (b"[*]", b"a", False),
    (b"[?]", b"?", True),
    (b"[?]", b"a", False),
    (b"[[]", b"[", True),
    (b"[[]", b"]", False),
    (b"[!a]", b"!", True),  # '!' is a member, not a negation
    (b"[!a]", b"b", False),
    (b"[a^]", b"^", True),  # '^' negates only in first place
    (b"[a^]", b"b", False),
    (b"[\xe9]", b"\xe9", True),
    (b"[\xc3\xa9]", "é".encode(), False),  # a set matches one byte
    # negated sets
    (b"[^a]", b"b", True),
    (b"[^a]", b"a", False),
    (b"[^a]", b"ab", False),
    (b"[^abc]", b"d", True),
    (b"[^abc]", b"b", False),
    (b"h[^e]llo", b"hallo", True),
    (b"h[^e]llo", b"hello", False),
    (b"[^^]", b"^", False),
    (b"[^^]", b"a", True),
    # ranges
    (b"[a-z]", b"m", True),
    (b"[a-z]", b"a", True),
    (b"[a-z]", b"z", True),
    (b"[a-z]", b"A", False),
    (b"[a-z]", b"{", False),
    (b"[a-c0-2]", b"1", True),
    (b"[a-c0-2]", b"d", False),
    (b"[^a-z]", b"m", False),
    (b"[^a-z]", b"M", True),
    (b"[a-a]", b"a", True),
    (b"[a-a]", b"b", False),
    (b"[--0]", b".", True),
    (b"[-a]", b"-", True),  # a leading '-' is a member
    (b"[-a]", b"b", False),
    # reversed ranges are swapped
    (b"[z-a]", b"m", True),
    (b"[z-a]", b"a", True),
    (b"[z-a]", b"z", True),
    (b"[z-a]", b"A", False),
    (b"[^z-a]", b"m", False),
    (b"[^z-a]", b"M", True),
    # ranges reaching bytes > 0x7f compare as C's signed char
    (b"[a-\xff]", b"\xff", True),  # -1..97
    (b"[a-\xff]", b"a", True),
    (b"[a-\xff]", b"0", True),
    (b"[a-\xff]", b"\x00", True),
    (b"[a-\xff]", b"b", False),
    (b"[a-\xff]", b"\x80", False),
    (b"[a-\xff]", b"\x7f", False),
    (b"[a-\xff]", b"\xc3", False),
    (b"[^a-\xff]", b"\x80", True),
    (b"[^a-\xff]", b"a", False),
    (b"[\x80-a]", b"\xff", True),  # -128..97
    (b"[\x80-a]", b"\x80", True),
    (b"[\x80-a]", b"b", False),
    (b"[\x80-\xff]", b"\x90", True),
    (b"[\x80-\xff]", b"a", False),
    (b"[\xff-\x80]", b"\x90", True),
    (b"[\xff-\x80]", b"\x7f", False),
    (b"[\x00-\x7f]", b"\x80", False),
    (b"[\x00-\x7f]", b"\x7f", True),
    (b"[\x7f-\x80]", b"a", True),  # 127 and -128 swap to every byte
    (b"[\x7f-\x80]", b"\xc3", True),
    # a '-' with no end is a member; a ']' right after '-' ends a range, not the set
    (b"[a-", b"-", True),
    (b"[a-", b"a", True),
    (b"[a-", b"b", False),
    (b"[a-]", b"a", True),  # the range a..']', that is ']' '^' '_' '`' 'a'
    (b"[a-]", b"]", True),
    (b"[a-]", b"_", True),
    (b"[a-]", b"-", False),
    (b"[a-]", b"b", False),
    (b"[a-]x", b"x", True),  # the set goes on after the range
    (b"[a-]x", b"ax", False),
    # escapes inside sets
    (b"[\\]]", b"]", True),
    (b"[\\]]", b"\\", False),
    (b"[\\^a]", b"^", True),  # an escaped '^' does not negate
    (b"[\\^a]", b"b", False),
    (b"[a\\-z]", b"-", True),  # an escaped '-' makes no range
    (b"[a\\-z]", b"z", True),
    (b"[a\\-z]", b"m", False),
    (b"[\\a-z]", b"-", True),  # nor does a '-' after an escaped start
    (b"[\\a-z]", b"m", False),
    (b"[\\\\]", b"\\", True),
    (b"[\\\\]", b"]", False),
    (b"[\\*]", b"*", True),
    (b"[\\*]", b"\\", False),
    (b"[\\]", b"]", True),  # escaped ']' and no end: the set is {']'}
    (b"[\\]", b"\\", False),
    (b"[\\", b"\\", True),  # a lone trailing '\' in a set is a member
    (b"[a\\", b"\\", True),
    (b"[a\\", b"a", True),
    (b"[a\\", b"b", False),
    (b"[a-\\]", b"\\", True),  # a range may end at '\': a..'\' swaps to '\'..'a'
    (b"[a-\\]", b"]", True),
    (b"[a-\\]", b"_", True),
    (b"[a-\\]", b"b", False),
    # escapes outside sets
    (b"\\*", b"*", True),
    (b"\\*", b"a", False),
    (b"\\?", b"?", True),
    (b"\\?", b"a", False),
    (b"\\[a]", b"[a]", True),
    (b"\\[a]", b"a", False),
    (b"\\\\", b"\\", True),
    (b"\\a", b"a", True),
    (b"\\a", b"\\a", False),
    (b"a\\*b", b"a*b", True),
    (b"a\\*b", b"axb", False),
    (b"*\\*", b"abc*", True),
    (b"*\\*", b"abc", False),
    # a trailing lone '\' is a literal
    (b"\\", b"\\", True),
    (b"\\", b"a", False),
    (b"a\\", b"a\\", True),
    (b"a\\", b"a", False),
    (b"*\\", b"abc\\", True),
    (b"\\\\\\", b"\\\\", True),
    # unterminated sets take the rest of the pattern
    (b"[abc", b"a", True),
    (b"[abc", b"c", True),
    (b"[abc", b"d", False),
    (b"[abc", b"[abc", False),
    (b"x[abc", b"xb", True),
    (b"[^abc", b"d", True),
    (b"[^abc", b"a", False),
    (b"[a-z", b"q", True),
    (b"[a-z", b"-", False),
    # '[' alone is an empty set: matches nothing
    (b"[", b"[", False),
    (b"[", b"a", False),
    (b"a[", b"a", False),
    (b"a[", b"a[", False),
    (b"*[", b"x", False),
    # '[^' alone is a negated empty set: any one byte
    (b"[^", b"a", True),
    (b"[^", b"^", True),
    (b"[^", b"\xff", True),
    (b"[^", b"ab", False),
    # '[]' is an empty set: matches nothing
    (b"[]", b"]", False),
    (b"[]", b"a", False),
    (b"[]", b"[]", False),
    (b"a[]", b"a", False),
    (b"[]]", b"]", False),
    (b"[]a]", b"a", False),
    (b"*[]*", b"abc", False),
    # '[^]' is any one byte
    (b"[^]", b"a", True),
    (b"[^]", b"]", True),
    (b"[^]", b"\xff", True),
    (b"[^]", b"ab", False),
    (b"[^]]", b"a]", True),
    (b"[^]]", b"a", False),
    # bytes Redis treats like any other
    (b"a\x00*", b"a\x00b", True),
    (b"a\x00*", b"a", False),
    # more than 1,000 recursing stars never match; a trailing star does not recurse
    (STARS_1000, A_1000, True),
    (STARS_1000, A_1000[:-1], False),
    (STARS_1000 + b"*", A_1000 + b"b", True),
    (STARS_1001, A_1000 + b"a", False),
    (STARS_1001, A_5000, False),
    (STARS_1001 + b"*", A_1000 + b"aa", False),
    (b"?*" * 1001, A_1000 + b"a", True),  # the last of 1,001 stars trails
    (b"?*" * 1002, A_1000 + b"aa", False),
    (b"**a" * 1000, A_1000, True),  # runs of stars count once
    (b"**a" * 1001, A_1000 + b"a", False),
    # long pathological patterns
    (b"*a" * 40 + b"*b", A_5000, False),
    (b"*a" * 40 + b"*b", A_5000 + b"b", True),
    (b"a*" * 30 + b"b", A_5000, False),
    (b"a*" * 30 + b"b", A_5000 + b"b", True),
    (b"*" + b"[ab]*" * 30 + b"c", b"ab" * 3000, False),
    (b"*" + b"[ab]*" * 30 + b"c", b"ab" * 3000 + b"c", True),
    (b"*?" * 50 + b"x", b"y" * 5000, False),
    (b"*a*a*a*a*a*a*a*a*a*b", b"a" * 100_000, False),
]


def _case_id(case: tuple[bytes, bytes, bool]) -> str:
    pattern, channel, expected = case
    shown = [x if len(x) <= 24 else x[:12] + b"...%d" % len(x) for x in (pattern, channel)]
    return f"{shown[0]!r}~{shown[1]!r}={expected}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_match(case: tuple[bytes, bytes, bool]) -> None:
    pattern, channel, expected = case
    assert match(pattern, channel) is expected


def test_compiled_pattern_is_cached_and_agrees_with_match() -> None:
    assert compile_pattern(b"news.*") is compile_pattern(b"news.*")
    assert compile_pattern(b"news.*")(b"news.sport") is not None
    assert compile_pattern(b"news.*")(b"sport") is None


def test_cases_are_distinct() -> None:
    pairs = [(pattern, channel) for pattern, channel, _ in CASES]
    assert len(pairs) == len(set(pairs))


# -- literal_prefix ------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        (b"", b""),
        (b"news", b"news"),
        (b"news.*", b"news."),
        (b"a?b", b"a"),
        (b"[ab]c", b""),
        (b"ab[c]", b"ab"),
        (b"a\\*b*", b"a*b"),
        (b"a\\?", b"a?"),
        (b"a\\[b]", b"a[b]"),
        (b"a\\", b"a\\"),
        (b"\\\\x*", b"\\x"),
        (b"*abc", b""),
        (b"ab**", b"ab"),
        (b"a]^-", b"a]^-"),
    ],
)
def test_literal_prefix(pattern: bytes, prefix: bytes) -> None:
    assert literal_prefix(pattern) == prefix


GLOB_BYTES = st.sampled_from(list(b"ab*?[]^-\\\xff"))
PATTERNS = st.lists(GLOB_BYTES, max_size=10).map(bytes)
SUFFIXES = st.lists(st.sampled_from(list(b"ab*?[]^-\\\xff\x00")), max_size=6).map(bytes)


@settings(max_examples=300, deadline=None)
@given(pattern=PATTERNS, suffix=SUFFIXES, from_prefix=st.booleans())
def test_every_matching_channel_starts_with_the_literal_prefix(
    pattern: bytes, suffix: bytes, from_prefix: bool
) -> None:
    prefix = literal_prefix(pattern)
    channel = prefix + suffix if from_prefix else suffix
    if match(pattern, channel):
        assert channel.startswith(prefix)


# A pattern built from pieces, each with a byte string that piece matches, so the
# concatenated channel matches the concatenated pattern by construction.
_LITERAL = st.sampled_from(list(b"ab.:-]^\xff")).map(lambda b: (bytes([b]), bytes([b])))
_ESCAPED = st.sampled_from(list(b"*?[]\\a")).map(lambda b: (b"\\" + bytes([b]), bytes([b])))
_ANY = st.sampled_from(list(b"ab*\xff\x00")).map(lambda b: (b"?", bytes([b])))
_SET = st.sampled_from([(b"[ab]", b"a"), (b"[^ab]", b"c"), (b"[a-c]", b"b"), (b"[c-a]", b"c")])
_STAR = st.lists(st.sampled_from(list(b"ab*")), max_size=4).map(lambda s: (b"*", bytes(s)))
PIECES = st.lists(st.one_of(_LITERAL, _ESCAPED, _ANY, _SET, _STAR), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(pieces=PIECES)
def test_channels_built_to_match_start_with_the_literal_prefix(
    pieces: list[tuple[bytes, bytes]],
) -> None:
    pattern = b"".join(piece for piece, _ in pieces)
    channel = b"".join(text for _, text in pieces)
    if not channel:
        return  # only stars, all empty: Redis never matches the empty channel
    assert match(pattern, channel)
    assert channel.startswith(literal_prefix(pattern))


# -- against a live redis-server -------------------------------------------------


@pytest.fixture(scope="module")
def redis_matches() -> dict[bytes, set[bytes]]:
    """For every pattern of CASES, the table's channels real Redis matches with it.

    One client subscribes to every channel of the table; another asks PUBSUB
    CHANNELS <pattern> for each pattern.
    """
    channels = sorted({channel for _, channel, _ in CASES})
    patterns = sorted({pattern for pattern, _, _ in CASES})
    with redis_server() as port:
        subscriber = Resp3Client("127.0.0.1", port)
        query = Resp3Client("127.0.0.1", port)
        try:
            subscriber.send(b"SUBSCRIBE", *channels)
            confirmations = [subscriber.read() for _ in channels]
            assert all(isinstance(frame, Push) for frame in confirmations)
            assert confirmations[-1][2] == len(channels)
            matches = {}
            for pattern in patterns:
                query.send(b"PUBSUB", b"CHANNELS", pattern)
                matches[pattern] = set(query.read())
        finally:
            subscriber.close()
            query.close()
    return matches


def test_table_agrees_with_live_redis(redis_matches: dict[bytes, set[bytes]]) -> None:
    disagreements = [
        _case_id(case) for case in CASES if (case[1] in redis_matches[case[0]]) is not case[2]
    ]
    assert disagreements == []


def test_glob_agrees_with_live_redis_on_every_pair_of_the_table(
    redis_matches: dict[bytes, set[bytes]],
) -> None:
    channels = {channel for _, channel, _ in CASES}
    disagreements = [
        (pattern[:40], channel[:40])
        for pattern, matched in redis_matches.items()
        for channel in channels
        if match(pattern, channel) is not (channel in matched)
    ]
    assert disagreements == []
