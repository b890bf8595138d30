"""pubsub.core.commands.execute: Redis 7's exact error texts, the command table and limits.

Every error text in ERROR_CASES is what redis-server 7.0.15 answers to the same
arguments; test_error_texts_agree_with_live_redis checks the table against a
private redis-server, and test_command_arities_agree_with_live_redis the table's
arities against COMMAND INFO.
"""

from __future__ import annotations

import pytest

from pubsub.core.commands import (
    COMMANDS,
    Confirm,
    Error,
    Limits,
    Pong,
    Reply,
    Session,
    execute,
)
from pubsub.core.engine import Engine
from tests.support.redis_server import redis_server
from tests.support.resp3 import Resp3Client, RespError
from tests.support.tuples import TupleSubscriber as Recorder


class RecordingSession(Session):
    """A Session that also keeps the subscriber it registered."""

    recorder: Recorder


def new_session(engine: Engine | None = None, limits: Limits | None = None) -> RecordingSession:
    engine = engine or Engine()
    recorder = Recorder()
    session = RecordingSession(engine, engine.register(recorder), limits or Limits())
    session.recorder = recorder
    return session


def run(session: Session, *args: bytes) -> list:
    return execute(session, list(args))


UNKNOWN = "ERR unknown command '{}', with args beginning with: {}"
ARITY = "ERR wrong number of arguments for '{}' command"
E_ACUTE = "é".encode()

# (arguments, Redis 7.0.15's error text for them)
ERROR_CASES: list[tuple[list[bytes], str]] = [
    # wrong number of arguments
    ([b"publish"], ARITY.format("publish")),
    ([b"publish", b"a"], ARITY.format("publish")),
    ([b"publish", b"a", b"b", b"c"], ARITY.format("publish")),
    ([b"PUBLISH"], ARITY.format("publish")),
    ([b"spublish", b"a"], ARITY.format("spublish")),
    ([b"SPublish", b"a", b"b", b"c"], ARITY.format("spublish")),
    ([b"subscribe"], ARITY.format("subscribe")),
    ([b"psubscribe"], ARITY.format("psubscribe")),
    ([b"SSUBSCRIBE"], ARITY.format("ssubscribe")),
    ([b"ping", b"a", b"b"], ARITY.format("ping")),
    ([b"pubsub"], ARITY.format("pubsub")),
    ([b"pubsub", b"numpat", b"x"], ARITY.format("pubsub|numpat")),
    ([b"PUBSUB", b"NUMPAT", b"x"], ARITY.format("pubsub|numpat")),
    ([b"pubsub", b"help", b"x"], ARITY.format("pubsub|help")),
    # unknown commands
    ([b"foo", b"a", b"b"], UNKNOWN.format("foo", "'a' 'b' ")),
    ([b"foo"], UNKNOWN.format("foo", "")),
    ([b"FOO", b""], UNKNOWN.format("FOO", "'' ")),
    ([b"subscribex", b"a"], UNKNOWN.format("subscribex", "'a' ")),
    # 128-byte truncation: the name, one long argument, arguments adding up
    ([b"f" * 200, b"x"], UNKNOWN.format("f" * 128, "'x' ")),
    ([b"foo", b"x" * 200], UNKNOWN.format("foo", "'" + "x" * 128 + "' ")),
    ([b"foo", b"x" * 200, b"y"], UNKNOWN.format("foo", "'" + "x" * 128 + "' ")),
    ([b"foo", b"x" * 127, b"y"], UNKNOWN.format("foo", "'" + "x" * 127 + "' ")),
    ([b"foo", b"x" * 124, b"y"], UNKNOWN.format("foo", "'" + "x" * 124 + "' 'y' ")),
    ([b"foo", b"x" * 125, b"y"], UNKNOWN.format("foo", "'" + "x" * 125 + "' ")),
    (
        [b"foo", b"a" * 60, b"b" * 60, b"c" * 60, b"d"],
        UNKNOWN.format("foo", "'" + "a" * 60 + "' '" + "b" * 60 + "' 'cc' "),
    ),
    (
        [b"foo", b"a" * 60, b"b" * 70, b"c"],
        UNKNOWN.format("foo", "'" + "a" * 60 + "' '" + "b" * 65 + "' "),
    ),
    # line breaks become spaces, in the name and in the arguments
    ([b"foo", b"a\nb\rc", b"x\r\n"], UNKNOWN.format("foo", "'a b c' 'x  ' ")),
    ([b"fo\no", b"a"], UNKNOWN.format("fo o", "'a' ")),
    # the 128 bytes are bytes, not characters
    ([b"foo", E_ACUTE * 10, b"b"], UNKNOWN.format("foo", "'" + "é" * 10 + "' 'b' ")),
    ([b"foo", E_ACUTE * 100, b"b"], UNKNOWN.format("foo", "'" + "é" * 64 + "' ")),
    (
        [b"foo", b"a" + E_ACUTE * 100, b"b"],
        UNKNOWN.format("foo", "'a" + "é" * 63 + "\udcc3' "),
    ),
    ([b"foo", b"\xff\xfe" * 70, b"z"], UNKNOWN.format("foo", "'" + "\udcff\udcfe" * 64 + "' ")),
    # Redis prints names and arguments as C strings: they stop at a NUL byte
    ([b"foo", b"a\x00b", b"c"], UNKNOWN.format("foo", "'a' 'c' ")),
    ([b"fo\x00o", b"a"], UNKNOWN.format("fo", "'a' ")),
    # PUBSUB subcommands
    ([b"pubsub", b"FOO"], "ERR unknown subcommand 'FOO'. Try PUBSUB HELP."),
    ([b"pubsub", b"foo", b"x"], "ERR unknown subcommand 'foo'. Try PUBSUB HELP."),
    ([b"pubsub", b"x" * 200], "ERR unknown subcommand '" + "x" * 128 + "'. Try PUBSUB HELP."),
    ([b"pubsub", E_ACUTE * 100], "ERR unknown subcommand '" + "é" * 64 + "'. Try PUBSUB HELP."),
    ([b"pubsub", b"a\nb"], "ERR unknown subcommand 'a b'. Try PUBSUB HELP."),
    (
        [b"pubsub", b"channels\n", b"a", b"b"],
        "ERR unknown subcommand 'channels '. Try PUBSUB HELP.",
    ),
    ([b"pubsub", b"fo\x00o"], "ERR unknown subcommand 'fo'. Try PUBSUB HELP."),
    (
        [b"PUBSUB", b"CHANNELS", b"a", b"b"],
        "ERR unknown subcommand or wrong number of arguments for 'CHANNELS'. Try PUBSUB HELP.",
    ),
    (
        [b"pubsub", b"channels", b"a", b"b", b"c"],
        "ERR unknown subcommand or wrong number of arguments for 'channels'. Try PUBSUB HELP.",
    ),
    (
        [b"pubsub", b"ShardChannels", b"a", b"b"],
        "ERR unknown subcommand or wrong number of arguments for 'ShardChannels'. Try PUBSUB HELP.",
    ),
]


def _error_id(case: tuple[list[bytes], str]) -> str:
    return repr(b" ".join(arg[:16] for arg in case[0]))


@pytest.mark.parametrize(
    "case", ERROR_CASES, ids=[f"{i}:{_error_id(c)}" for i, c in enumerate(ERROR_CASES)]
)
def test_error_texts(case: tuple[list[bytes], str]) -> None:
    args, expected = case
    session = new_session()
    assert execute(session, args) == [Error(expected)]
    assert session.engine.subscription_count(session.client_id) == 0


def test_error_texts_agree_with_live_redis() -> None:
    with redis_server() as port:
        client = Resp3Client("127.0.0.1", port)
        try:
            answers = []
            for args, _ in ERROR_CASES:
                client.send(*args)
                answers.append(client.read())
        finally:
            client.close()
    assert all(isinstance(answer, RespError) for answer in answers)
    disagreements = [
        (_error_id(case), str(answer))
        for case, answer in zip(ERROR_CASES, answers, strict=True)
        if str(answer) != case[1]
    ]
    assert disagreements == []


def test_command_arities_agree_with_live_redis() -> None:
    names = [name.encode() for name in COMMANDS]
    names += [b"pubsub|" + sub.encode() for sub in (COMMANDS["pubsub"].subcommands or {})]
    with redis_server() as port:
        client = Resp3Client("127.0.0.1", port)
        try:
            client.send(b"COMMAND", b"INFO", *names)
            info = client.read()
        finally:
            client.close()
    redis_arities = {entry[0]: entry[1] for entry in info}
    ours = {name.encode(): command.arity for name, command in COMMANDS.items()}
    ours.update(
        (b"pubsub|" + name.encode(), command.arity)
        for name, command in COMMANDS["pubsub"].subcommands.items()
    )
    assert ours == redis_arities


# -- what the commands do ------------------------------------------------------------


def test_subscribe_family_confirms_each_name() -> None:
    session = new_session()
    assert run(session, b"SUBSCRIBE", b"a", b"b", b"a") == [
        Confirm("subscribe", b"a", 1),
        Confirm("subscribe", b"b", 2),
        Confirm("subscribe", b"a", 2),
    ]
    assert run(session, b"PSUBSCRIBE", b"p*") == [Confirm("psubscribe", b"p*", 3)]
    assert run(session, b"SSUBSCRIBE", b"s") == [Confirm("ssubscribe", b"s", 1)]
    assert run(session, b"UNSUBSCRIBE", b"b", b"zz") == [
        Confirm("unsubscribe", b"b", 2),
        Confirm("unsubscribe", b"zz", 2),
    ]
    assert run(session, b"UNSUBSCRIBE") == [Confirm("unsubscribe", b"a", 1)]
    assert run(session, b"UNSUBSCRIBE") == [Confirm("unsubscribe", None, 1)]
    assert run(session, b"PUNSUBSCRIBE") == [Confirm("punsubscribe", b"p*", 0)]
    assert run(session, b"PUNSUBSCRIBE", b"q") == [Confirm("punsubscribe", b"q", 0)]
    assert run(session, b"SUNSUBSCRIBE") == [Confirm("sunsubscribe", b"s", 0)]
    assert run(session, b"SUNSUBSCRIBE") == [Confirm("sunsubscribe", None, 0)]


def test_publish_and_spublish_reply_with_the_receiver_count() -> None:
    engine = Engine()
    publisher, subscriber = new_session(engine), new_session(engine)
    run(subscriber, b"SUBSCRIBE", b"ch")
    run(subscriber, b"PSUBSCRIBE", b"c*", b"?h")
    run(subscriber, b"SSUBSCRIBE", b"ch")
    assert run(publisher, b"PUBLISH", b"ch", b"hello") == [Reply(3)]
    assert run(publisher, b"SPUBLISH", b"ch", b"shard") == [Reply(1)]
    assert run(publisher, b"PUBLISH", b"nobody", b"x") == [Reply(0)]
    assert subscriber.recorder.frames == [
        ("message", b"ch", b"hello"),
        ("pmessage", b"?h", b"ch", b"hello"),
        ("pmessage", b"c*", b"ch", b"hello"),
        ("smessage", b"ch", b"shard"),
    ]


def test_pubsub_subcommands() -> None:
    engine = Engine()
    first, second = new_session(engine), new_session(engine)
    run(first, b"SUBSCRIBE", b"news", b"sport")
    run(second, b"SUBSCRIBE", b"news")
    run(first, b"PSUBSCRIBE", b"n*", b"s*")
    run(second, b"PSUBSCRIBE", b"n*")
    run(second, b"SSUBSCRIBE", b"orders:{1}", b"orders:{2}")
    assert run(first, b"PUBSUB", b"CHANNELS") == [Reply([b"news", b"sport"])]
    assert run(first, b"pubsub", b"channels", b"n*") == [Reply([b"news"])]
    assert run(first, b"PUBSUB", b"NUMSUB", b"news", b"x", b"sport") == [
        Reply([b"news", 2, b"x", 0, b"sport", 1])
    ]
    assert run(first, b"PUBSUB", b"NUMSUB") == [Reply([])]
    assert run(first, b"PUBSUB", b"NUMPAT") == [Reply(2)]
    assert run(first, b"PUBSUB", b"SHARDCHANNELS") == [Reply([b"orders:{1}", b"orders:{2}"])]
    assert run(first, b"PUBSUB", b"SHARDCHANNELS", b"*2}") == [Reply([b"orders:{2}"])]
    assert run(first, b"PUBSUB", b"SHARDNUMSUB", b"orders:{1}", b"news") == [
        Reply([b"orders:{1}", 1, b"news", 0])
    ]
    assert run(first, b"PUBSUB", b"SHARDNUMSUB") == [Reply([])]


def test_pubsub_help_is_redis_s_text_line_for_line() -> None:
    [reply] = run(new_session(), b"PUBSUB", b"HELP")
    with redis_server() as port:
        client = Resp3Client("127.0.0.1", port)
        try:
            client.send(b"PUBSUB", b"HELP")
            expected = client.read()
        finally:
            client.close()
    # Redis sends the lines as simple strings; the text is what counts.
    assert reply == Reply([line.encode() for line in expected])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([b"PING"], [Pong(None)]),
        ([b"ping", b"hello"], [Pong(b"hello")]),
        ([b"Ping", b""], [Pong(b"")]),
        ([b"PING", b"\xff\x00"], [Pong(b"\xff\x00")]),
        ([b"PING", b"a", b"b"], [Error("ERR wrong number of arguments for 'ping' command")]),
        ([b"PING", b"a", b"b", b"c"], [Error("ERR wrong number of arguments for 'ping' command")]),
    ],
)
def test_ping(args: list[bytes], expected: list) -> None:
    assert execute(new_session(), args) == expected


@pytest.mark.parametrize(
    "name", [b"subscribe", b"SUBSCRIBE", b"Subscribe", b"sUbScRiBe"], ids=lambda n: n.decode()
)
def test_command_names_are_case_insensitive(name: bytes) -> None:
    session = new_session()
    assert execute(session, [name, b"Chan"]) == [Confirm("subscribe", b"Chan", 1)]
    # the names themselves keep their case
    assert session.engine.channels() == [b"Chan"]


def test_every_command_and_subcommand_in_any_case() -> None:
    engine = Engine()
    session = new_session(engine)
    for spelling in (str.lower, str.upper, str.title):
        cmd = [spelling(name).encode() for name in ("publish", "pubsub", "numpat", "ping")]
        assert execute(session, [cmd[0], b"c", b"m"]) == [Reply(0)]
        assert execute(session, [cmd[1], cmd[2]]) == [Reply(0)]
        assert execute(session, [cmd[3]]) == [Pong(None)]
        for subcommand in ("channels", "numsub", "shardchannels", "shardnumsub"):
            [reply] = execute(session, [cmd[1], spelling(subcommand).encode()])
            assert reply == Reply([])


# -- limits: subscriptions per client --------------------------------------------


def _limited(max_subscriptions: int) -> Session:
    return new_session(limits=Limits(max_subscriptions=max_subscriptions))


def _is_limit_error(results: list, limit: int) -> bool:
    return (
        len(results) == 1
        and isinstance(results[0], Error)
        and results[0].message.startswith("ERR ")
        and str(limit) in results[0].message
    )


def test_subscriptions_up_to_the_limit_pass() -> None:
    session = _limited(3)
    assert len(run(session, b"SUBSCRIBE", b"a", b"b", b"c")) == 3
    assert session.engine.subscription_count(session.client_id) == 3


def test_one_subscription_over_the_limit_is_refused() -> None:
    session = _limited(3)
    run(session, b"SUBSCRIBE", b"a", b"b", b"c")
    assert _is_limit_error(run(session, b"SUBSCRIBE", b"d"), 3)
    assert _is_limit_error(run(session, b"PSUBSCRIBE", b"d*"), 3)
    assert _is_limit_error(run(session, b"SSUBSCRIBE", b"d"), 3)
    assert session.engine.numsub([b"d"]) == [(b"d", 0)]
    assert session.engine.numpat() == 0
    assert session.engine.shard_channels() == []


def test_the_limit_is_all_or_nothing() -> None:
    session = _limited(3)
    run(session, b"SUBSCRIBE", b"a")
    assert _is_limit_error(run(session, b"SUBSCRIBE", b"x", b"y", b"z"), 3)
    assert session.engine.channels() == [b"a"]
    assert _is_limit_error(run(session, b"PSUBSCRIBE", b"x", b"y", b"z"), 3)
    assert session.engine.numpat() == 0
    assert len(run(session, b"SUBSCRIBE", b"x", b"y")) == 2


def test_duplicates_and_names_already_held_do_not_count() -> None:
    session = _limited(2)
    assert len(run(session, b"SUBSCRIBE", b"a", b"a", b"a", b"b", b"b")) == 5
    assert run(session, b"SUBSCRIBE", b"a", b"b", b"a") == [
        Confirm("subscribe", b"a", 2),
        Confirm("subscribe", b"b", 2),
        Confirm("subscribe", b"a", 2),
    ]
    assert _is_limit_error(run(session, b"SUBSCRIBE", b"a", b"c"), 2)


def test_channels_patterns_and_shard_channels_share_the_limit() -> None:
    session = _limited(3)
    run(session, b"SUBSCRIBE", b"a")
    run(session, b"PSUBSCRIBE", b"a")  # the same name as a pattern is another one
    run(session, b"SSUBSCRIBE", b"a")
    assert session.engine.subscription_count(session.client_id) == 3
    for command in (b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"):
        assert _is_limit_error(run(session, command, b"b"), 3)
    run(session, b"SUNSUBSCRIBE", b"a")
    assert run(session, b"PSUBSCRIBE", b"b") == [Confirm("psubscribe", b"b", 3)]
    assert _is_limit_error(run(session, b"SSUBSCRIBE", b"a"), 3)


def test_unsubscribing_frees_room_under_the_limit() -> None:
    session = _limited(1)
    run(session, b"SUBSCRIBE", b"a")
    assert _is_limit_error(run(session, b"SUBSCRIBE", b"b"), 1)
    run(session, b"UNSUBSCRIBE")
    assert run(session, b"SUBSCRIBE", b"b") == [Confirm("subscribe", b"b", 1)]


def test_the_limit_is_per_client() -> None:
    engine = Engine()
    limits = Limits(max_subscriptions=1)
    first, second = new_session(engine, limits), new_session(engine, limits)
    assert run(first, b"SUBSCRIBE", b"a") == [Confirm("subscribe", b"a", 1)]
    assert run(second, b"SUBSCRIBE", b"b") == [Confirm("subscribe", b"b", 1)]


def test_zero_means_no_subscription_limit() -> None:
    session = new_session(limits=Limits(max_subscriptions=0))
    names = [b"c%d" % i for i in range(10_001)]  # more than the default limit
    assert len(run(session, b"SUBSCRIBE", *names)) == len(names)
    assert len(run(session, b"PSUBSCRIBE", b"p1", b"p2")) == 2
    assert session.engine.subscription_count(session.client_id) == len(names) + 2


def test_default_subscription_limit() -> None:
    assert Limits().max_subscriptions == 10_000
    session = new_session()
    assert len(run(session, b"SUBSCRIBE", *[b"c%d" % i for i in range(10_000)])) == 10_000
    assert _is_limit_error(run(session, b"SSUBSCRIBE", b"one-more"), 10_000)


# -- limits: name length -----------------------------------------------------------


def _short_names(limit: int = 5) -> Session:
    return new_session(limits=Limits(max_name_length=limit))


@pytest.mark.parametrize("command", [b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"])
def test_subscribing_to_a_name_over_the_length_limit_is_refused(command: bytes) -> None:
    session = _short_names()
    [error] = run(session, command, b"ok", b"123456")
    assert isinstance(error, Error) and error.message.startswith("ERR ")
    assert "5" in error.message
    assert session.engine.subscription_count(session.client_id) == 0
    assert len(run(session, command, b"12345", b"ok")) == 2


@pytest.mark.parametrize("command", [b"PUBLISH", b"SPUBLISH"])
def test_publishing_to_a_channel_over_the_length_limit_is_refused(command: bytes) -> None:
    engine = Engine()
    session = new_session(engine, Limits(max_name_length=5))
    watcher = new_session(engine)
    run(watcher, b"PSUBSCRIBE", b"*")
    run(watcher, b"SSUBSCRIBE", b"123456", b"12345")
    [error] = run(session, command, b"123456", b"x")
    assert isinstance(error, Error) and error.message.startswith("ERR ")
    assert watcher.recorder.frames == []
    # the payload is no name: its length is not limited here
    assert run(session, command, b"12345", b"a long payload") == [Reply(1)]


@pytest.mark.parametrize("subcommand", [b"CHANNELS", b"SHARDCHANNELS"])
def test_pubsub_channels_pattern_over_the_length_limit_is_refused(subcommand: bytes) -> None:
    session = _short_names()
    [error] = run(session, b"PUBSUB", subcommand, b"123456")
    assert isinstance(error, Error) and error.message.startswith("ERR ")
    assert run(session, b"PUBSUB", subcommand, b"1234*") == [Reply([])]
    assert run(session, b"PUBSUB", subcommand) == [Reply([])]


def test_zero_means_no_name_length_limit() -> None:
    session = _short_names(0)
    name = b"n" * 100_000
    assert run(session, b"SUBSCRIBE", name) == [Confirm("subscribe", name, 1)]
    assert run(session, b"PUBLISH", name, b"x") == [Reply(1)]


def test_default_name_length_limit() -> None:
    assert Limits().max_name_length == 4096
    session = new_session()
    assert len(run(session, b"SUBSCRIBE", b"n" * 4096)) == 1
    [error] = run(session, b"SUBSCRIBE", b"n" * 4097)
    assert isinstance(error, Error)
