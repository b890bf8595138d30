"""The RESP request reader on its own: requests, Redis's limits, and what input costs.

The byte-for-byte comparison of its errors with a live redis-server is in
tests/integration/test_resp_reader_redis.py; the protocol around it in
test_resp.py.
"""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pubsub.resp import reader as resp_reader
from pubsub.resp.reader import (
    INLINE_MAX,
    PROTO_MAX_BULK_LEN,
    ProtocolError,
    RequestReader,
    size_error,
)
from tests.support.searches import counting_bytearray


def multibulk(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def read_all(
    data: bytes, pieces: list[int] | None = None, guarded: bool = False, **options
) -> tuple[list, str | None]:
    """Every request in ``data`` fed whole, or cut at ``pieces``, and the error if any."""
    reader = RequestReader(**options)
    reader.guarded = guarded
    cuts = sorted({0, len(data), *(p for p in (pieces or []) if 0 < p < len(data))})
    requests: list = []
    for start, end in itertools.pairwise(cuts):
        reader.feed(data[start:end])
        try:
            while (request := reader.gets()) is not None:
                requests.append(request)
        except ProtocolError as error:
            return requests, str(error)
    return requests, None


# -- requests ------------------------------------------------------------------------------


def test_multibulk_and_inline_requests_in_one_read():
    data = multibulk(b"PUBLISH", b"c", b"a\r\nb") + b"PING\r\n" + b'ECHO "x y"\n'
    assert read_all(data) == ([[b"PUBLISH", b"c", b"a\r\nb"], [b"PING"], [b"ECHO", b"x y"]], None)


def test_nothing_until_a_request_is_whole():
    reader = RequestReader()
    data = multibulk(b"ECHO", b"hello")
    for byte in data[:-1]:
        reader.feed(bytes((byte,)))
        assert reader.gets() is None
    reader.feed(data[-1:])
    assert reader.gets() == [b"ECHO", b"hello"]
    assert reader.gets() is None


def test_counts_of_zero_or_less_and_blank_lines_are_no_request():
    assert read_all(b"*0\r\n*-1\r\n*-5\r\n\r\n  \r\n\n" + multibulk(b"PING")) == ([[b"PING"]], None)


def test_redis_skips_the_byte_after_a_line_end_and_the_two_after_a_bulk_unread():
    # redis-server 7.0.15 answers both with +PONG.
    assert read_all(b"*1\r\n$4\rxPING\r\n") == ([[b"PING"]], None)
    assert read_all(b"*1\r\n$4\r\nPINGxx" + multibulk(b"PING")) == ([[b"PING"], [b"PING"]], None)


def test_a_nul_hides_a_line_end_until_the_line_is_too_big():
    # Redis finds line ends with strchr, which stops at a NUL: it waits.
    reader = RequestReader()
    reader.feed(b"PING\0x\r\n" + multibulk(b"PING"))
    assert reader.gets() is None
    reader.feed(b"y" * INLINE_MAX)
    with pytest.raises(ProtocolError, match="too big inline request"):
        reader.gets()


def test_a_nul_in_a_count_line_or_a_length_line():
    assert read_all(b"*1\0\r\n" + b"y" * INLINE_MAX) == (
        [],
        "ERR Protocol error: too big mbulk count string",
    )
    assert read_all(b"*1\r\n$4\0\r\n" + b"y" * INLINE_MAX) == (
        [],
        "ERR Protocol error: too big bulk count string",
    )


def test_a_nul_inside_a_bulk_is_data():
    assert read_all(multibulk(b"ECHO", b"a\0b")) == ([[b"ECHO", b"a\0b"]], None)


# -- errors, as Redis words them ---------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        (b"*x\r\n", "invalid multibulk length"),
        (b"*\r\n", "invalid multibulk length"),
        (b"*+1\r\n", "invalid multibulk length"),
        (b"*2147483648\r\n", "invalid multibulk length"),
        (b"*99999999999999999999\r\n", "invalid multibulk length"),
        (b"*1\r\n$x\r\n", "invalid bulk length"),
        (b"*1\r\n$-1\r\n", "invalid bulk length"),
        (b"*1\r\n$4\n\r\n", "invalid bulk length"),
        (b"*1\r\n$%d\r\n" % (PROTO_MAX_BULK_LEN + 1), "invalid bulk length"),
        (b"*1\r\n:5\r\n", "expected '$', got ':'"),
        (b"*1\r\n\r\n", "expected '$', got '\r'"),
        (b"*1\r\n\xff\r\n", "expected '$', got '\udcff'"),
        (b"*" + b"1" * (INLINE_MAX + 1), "too big mbulk count string"),
        (b"*1\r\n" + b"x" * (INLINE_MAX + 1), "too big bulk count string"),
        (b"x" * (INLINE_MAX + 1), "too big inline request"),
        (b'ECHO "a\r\n', "unbalanced quotes in request"),
    ],
)
def test_protocol_errors(data, message):
    assert read_all(data) == ([], "ERR Protocol error: " + message)


def test_a_line_waits_for_the_byte_after_its_carriage_return():
    # A count line ending in a lone "\r" is not read yet, as in Redis.
    reader = RequestReader()
    reader.feed(b"*x\r")
    assert reader.gets() is None
    reader.feed(b"\n")
    with pytest.raises(ProtocolError):
        reader.gets()


def test_after_an_error_the_reader_is_spent():
    reader = RequestReader()
    reader.feed(b"*1\r\n:1\r\n")
    with pytest.raises(ProtocolError) as first:
        reader.gets()
    reader.feed(multibulk(b"PING"))
    with pytest.raises(ProtocolError) as again:
        reader.gets()
    assert again.value is first.value


def test_requests_before_an_error_are_read_first():
    assert read_all(multibulk(b"PING") + b"*1\r\n:1\r\n" + multibulk(b"PING")) == (
        [[b"PING"]],
        "ERR Protocol error: expected '$', got ':'",
    )


# -- before authentication ----------------------------------------------------------------


def guarded(data: bytes) -> tuple[list, str | None]:
    return read_all(data, guarded=True)


def test_before_authentication_at_most_ten_arguments_of_16_kib():
    assert guarded(multibulk(*[b"x"] * 10)) == ([[b"x"] * 10], None)
    assert guarded(b"*11\r\n") == ([], "ERR Protocol error: unauthenticated multibulk length")
    assert guarded(multibulk(b"AUTH", b"t" * 16384)) == ([[b"AUTH", b"t" * 16384]], None)
    assert guarded(b"*2\r\n$4\r\nAUTH\r\n$16385\r\n") == (
        [],
        "ERR Protocol error: unauthenticated bulk length",
    )


def test_the_guard_applies_to_what_is_read_while_it_is_up():
    # Redis checks each line as it reads it: a client that authenticated in
    # the previous request may send a big one in the same read.
    reader = RequestReader()
    reader.guarded = True
    reader.feed(multibulk(b"AUTH", b"t") + multibulk(*[b"x"] * 20))
    assert reader.gets() == [b"AUTH", b"t"]
    reader.guarded = False
    assert reader.gets() == [b"x"] * 20


# -- max_request (the server's max_message_size) ---------------------------------------------


def test_a_bulk_declared_over_the_request_limit_is_refused_at_its_line():
    assert read_all(b"*2\r\n$4\r\nECHO\r\n$1001\r\n", max_request=1000) == ([], size_error(1000))


def test_the_request_limit_counts_bytes_as_they_arrive():
    reader = RequestReader(max_request=1000)
    head = b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$1000\r\n"
    reader.feed(head + b"x" * (1000 - len(head)))
    assert reader.gets() is None
    reader.feed(b"x")
    with pytest.raises(ProtocolError, match="max_message_size limit of 1000 bytes"):
        reader.gets()


def test_pipelined_requests_under_the_limit_each_pass():
    request = multibulk(b"PUBLISH", b"c", b"x" * 500)
    assert read_all(request * 10, max_request=1000) == ([[b"PUBLISH", b"c", b"x" * 500]] * 10, None)


def test_an_inline_line_over_the_request_limit():
    assert read_all(b"x" * 1001, max_request=1000) == ([], size_error(1000))
    assert read_all(b"x" * 1001 + b"\r\n", max_request=1000) == ([], size_error(1000))


# -- what input costs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "declared",
    [
        b"*2147483647\r\n",
        b"*2\r\n$4\r\nECHO\r\n$536870912\r\n",
        b"*1000000000\r\n" + b"$0\r\n\r\n" * 10,
    ],
)
def test_a_declared_count_or_length_allocates_nothing(declared):
    reader = RequestReader()
    tracemalloc.start()
    try:
        reader.feed(declared)
        assert reader.gets() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4096 + 64 * len(declared)


@pytest.mark.parametrize(
    "line",
    [
        b"ECHO " + b"x" * 60_000 + b"\r\n",  # inline
        b"*1\r\n$" + b"1" * 60_000 + b"\r\n",  # a length line, refused once whole
    ],
)
def test_a_line_fed_a_byte_at_a_time_searches_each_byte_a_bounded_number_of_times(
    line, monkeypatch
):
    # A line still waiting for its end is searched from where the last
    # search stopped, not from its start: count bytearray.find's work on the
    # buffer the reader keeps once bytes are left over between reads.
    Counting = counting_bytearray()
    monkeypatch.setattr(resp_reader, "bytearray", Counting, raising=False)
    reader = RequestReader()
    for byte in line:
        reader.feed(bytes((byte,)))
        try:
            reader.gets()
        except ProtocolError:
            break
    assert type(reader._buffer) is Counting or reader._error is not None
    assert len(line) <= Counting.searched <= 3 * len(line)


# -- any split gives the same requests -------------------------------------------------------

arguments = st.lists(st.binary(max_size=40), min_size=1, max_size=6)
inline_words = st.lists(
    # A word the line splits at, and no "*" that would make the line multibulk.
    st.binary(min_size=1, max_size=12).filter(
        lambda w: not any(c in w for c in b" \t\n\v\f\r\0\"'*")
    ),
    min_size=1,
    max_size=5,
)
requests_strategy = st.lists(
    st.one_of(
        arguments.map(lambda args: (args, multibulk(*args))),
        inline_words.map(lambda words: (words, b" ".join(words) + b"\r\n")),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(requests_strategy, st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
def test_a_valid_stream_split_anywhere_gives_its_requests(requests, cuts):
    data = b"".join(encoded for _, encoded in requests)
    expected = [list(args) for args, _ in requests]
    assert read_all(data) == (expected, None)
    assert read_all(data, cuts) == (expected, None)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=30),
            st.sampled_from([b"*", b"$", b"\r\n", b"\r", b"\n", b"\0", b"-1", b"2", b"0"]),
            arguments.map(lambda args: multibulk(*args)),
        ),
        max_size=20,
    ).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=600), max_size=30),
    st.integers(min_value=0, max_value=200),
    st.booleans(),
)
# A count line that waited, then was read whole: the next line is searched from its start.
@example(data=b"*1\r\n\r\x00", cuts=[1], limit=0, guard=False)
def test_any_input_split_anywhere_gives_the_same_requests_and_error(data, cuts, limit, guard):
    options = {"guarded": guard, "max_request": limit}
    assert read_all(data, cuts, **options) == read_all(data, **options)
