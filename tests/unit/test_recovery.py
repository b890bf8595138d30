"""Recovery over the JSON protocol: RESUME and HISTORY on a channel's history, on a Clock."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import Logger

from pubsub.core.history import HistoryUnavailable, Kept, Position, Recovery
from pubsub.operations.config import ConfigError, Settings
from pubsub.resp.protocol import RespFactory
from pubsub.websocket import commands as ws_commands
from tests.support.wsframes import command
from tests.unit import test_resp as resp
from tests.unit.test_auth import SECRET, token
from tests.unit.test_websocket import Connection


@pytest.fixture
def factory(make_factory):
    return make_factory(history_channels="chat.*,news", history_size=3, history_ttl=60)


def at(position: dict) -> Position:
    return Position(position["epoch"], position["offset"])


def test_resume_without_a_position_subscribes_and_says_where_the_channel_is(factory):
    publisher, reader = Connection(factory), Connection(factory)
    assert reader.call("RESUME", "news") == [
        ["subscribe", "news", 1],
        ["position", "news", {"epoch": "", "offset": 0}],  # nothing published yet
    ]
    assert publisher.call("PUBLISH", "news", "one") == [["reply", 1]]
    [[kind, channel, payload, position]] = reader.messages()
    assert (kind, channel, payload, position["offset"]) == ("message", "news", "one", 1)
    assert reader.call("RESUME", "news") == [
        ["subscribe", "news", 1],
        ["position", "news", position],
    ]


def test_a_client_that_comes_back_gets_what_it_missed_then_the_live_messages(factory):
    publisher, reader = Connection(factory), Connection(factory)
    reader.call("RESUME", "chat.1")
    publisher.call("PUBLISH", "chat.1", "a")
    [[_, _, _, seen]] = reader.messages()
    reader.protocol.onClose(True, 1000, None)  # gone for a while
    for payload in ("b", "c"):
        publisher.call("PUBLISH", "chat.1", payload)
    back = Connection(factory)
    answer = back.call("RESUME", "chat.1", seen["epoch"], str(seen["offset"]))
    epoch = seen["epoch"]
    assert answer == [
        ["subscribe", "chat.1", 1],
        ["message", "chat.1", "b", {"epoch": epoch, "offset": 2}],
        ["message", "chat.1", "c", {"epoch": epoch, "offset": 3}],
        ["position", "chat.1", {"epoch": epoch, "offset": 3}],
    ]
    publisher.call("PUBLISH", "chat.1", "d")
    assert back.messages() == [["message", "chat.1", "d", {"epoch": epoch, "offset": 4}]]
    assert factory.engine.history.recoveries == 1


def test_a_client_whose_missed_messages_were_trimmed_is_told_and_subscribed(factory):
    publisher, reader = Connection(factory), Connection(factory)
    publisher.call("PUBLISH", "news", "1")
    top = factory.engine.history.top(b"news")
    for n in range(2, 6):  # the history keeps 3: message 2 is gone
        publisher.call("PUBLISH", "news", str(n))
    answer = reader.call("RESUME", "news", top.epoch, "1")
    assert answer == [
        ["subscribe", "news", 1],
        [
            "recovery_failed",
            "news",
            {"epoch": top.epoch, "offset": 5},
            "messages after the position are no longer kept",
        ],
    ]
    publisher.call("PUBLISH", "news", "6")
    assert reader.messages() == [["message", "news", "6", {"epoch": top.epoch, "offset": 6}]]
    assert factory.engine.history.failed_recoveries == 1


@pytest.mark.parametrize(
    "epoch, offset, why",
    [
        ("other", "1", "the channel's history was lost since (its epoch changed)"),
        (None, "9", "the position is ahead of the channel's"),
    ],
)
def test_a_position_that_cannot_be_honoured_says_why(factory, epoch, offset, why):
    publisher, reader = Connection(factory), Connection(factory)
    publisher.call("PUBLISH", "news", "1")
    top = factory.engine.history.top(b"news")
    [_, [kind, _, position, reason]] = reader.call("RESUME", "news", epoch or top.epoch, offset)
    assert (kind, at(position), reason) == ("recovery_failed", top, why)


def test_a_channel_without_history_cannot_be_recovered_and_says_so(factory):
    reader = Connection(factory)
    assert reader.call("RESUME", "other") == [
        ["subscribe", "other", 1],
        ["position", "other", None],
    ]
    assert reader.call("RESUME", "other", "e", "3") == [
        ["subscribe", "other", 1],
        ["recovery_failed", "other", None, "the channel keeps no history"],
    ]
    assert Connection(factory).call("PUBLISH", "other", "x") == [["reply", 1]]
    assert reader.messages() == [["message", "other", "x"]]  # no position: none exists


def test_without_history_channels_nothing_is_kept_and_resume_says_so(make_factory):
    factory = make_factory()
    assert factory.engine.history is None
    assert Connection(factory).call("RESUME", "news", "e", "0")[1] == [
        "recovery_failed",
        "news",
        None,
        "the channel keeps no history",
    ]


def test_a_client_that_never_resumed_gets_redis_frames(factory):
    plain = Connection(factory)
    plain.call("SUBSCRIBE", "news")
    Connection(factory).call("PUBLISH", "news", "x")
    assert plain.messages() == [["message", "news", "x"]]


def test_history_reads_the_last_messages_of_a_channel(factory):
    publisher = Connection(factory)
    for payload in ("a", {"base64": "/w=="}, "c", "d"):  # b"\xff" is not text: base64
        publisher.send(command("PUBLISH", "chat.x", payload))
    publisher.messages()
    epoch = factory.engine.history.top(b"chat.x").epoch
    assert publisher.call("HISTORY", "chat.x", "2") == [
        ["history", "chat.x", {"epoch": epoch, "offset": 4}, [[3, "c"], [4, "d"]]]
    ]
    assert publisher.call("HISTORY", "chat.x", "10") == [
        [
            "history",
            "chat.x",
            {"epoch": epoch, "offset": 4},
            [[2, {"base64": "/w=="}], [3, "c"], [4, "d"]],
        ]
    ]
    assert publisher.call("HISTORY", "elsewhere", "10") == [["history", "elsewhere", None, []]]


@pytest.mark.parametrize(
    "args, error",
    [
        (["RESUME"], "ERR wrong number of arguments for 'resume' command"),
        (["RESUME", "news", "e"], "ERR wrong number of arguments for 'resume' command"),
        (["RESUME", "news", "e", "-1"], "ERR value is not an integer or out of range"),
        (["RESUME", "news", "e", "1" * 19], "ERR value is not an integer or out of range"),
        (["HISTORY", "news"], "ERR wrong number of arguments for 'history' command"),
        (["HISTORY", "news", "x"], "ERR value is not an integer or out of range"),
    ],
)
def test_malformed_recovery_commands_get_redis_style_errors(factory, args, error):
    client = Connection(factory)
    assert client.call(*args) == [["error", error]]
    assert factory.engine.subscription_total == 0


def test_resume_and_history_need_the_channels_subscribe_permission(make_factory):
    factory = make_factory(history_channels="*", jwt_secret=SECRET)
    reader = Connection(factory, path=f"/?token={token(subscribe=['news'])}")
    refused = "NOPERM User alice has no permissions to access the 'secret' channel"
    assert reader.call("RESUME", "secret") == [["error", refused]]
    assert reader.call("HISTORY", "secret", "5") == [["error", refused]]
    assert reader.call("RESUME", "news")[0] == ["subscribe", "news", 1]


def test_resp_clients_have_neither_command_and_see_redis_messages(clock):
    settings = Settings(history_channels="news")
    redis = RespFactory(None, settings, reactor=clock)
    client = resp.Client(redis)
    assert client.call("RESUME", "news").startswith(b"-ERR unknown command 'RESUME'")
    assert client.call("PUBLISH", "news", "x") == b":0\r\n"
    assert redis.engine.history.top(b"news").offset == 1  # kept all the same


@pytest.mark.parametrize(
    "setting, value", [("history_ttl", 0), ("history_size", 0), ("history_max_bytes", 0)]
)
def test_history_bounds_must_be_positive(setting, value):
    with pytest.raises(ConfigError, match=setting):
        Settings(history_channels="news", **{setting: value})


# -- a history the nodes share (a backplane's, in Redis): answers come later -------------


class SharedStub:
    """A :class:`SharedHistory` whose reads the test answers, and whose
    publishes it hands back as a backplane would."""

    shared = True

    def __init__(self, channels: list[bytes]) -> None:
        self.keeps = Kept(channels)
        self.recoveries = self.failed_recoveries = 0
        self.published: list[tuple[bytes, bytes]] = []
        self.carried = True
        self.reads: list[tuple[bytes, object, defer.Deferred]] = []

    def publish(self, channel: bytes, payload: bytes) -> bool:
        self.published.append((channel, payload))
        return self.carried

    def since(self, channel, position):
        answer: defer.Deferred = defer.Deferred()
        self.reads.append((channel, position, answer))
        return answer

    recent = since


@pytest.fixture
def shared(make_factory):
    factory = make_factory()
    factory.engine.history = SharedStub([b"news"])
    return factory


def test_a_shared_channels_publish_reaches_subscribers_only_back_from_the_backplane(shared):
    engine, history = shared.engine, shared.engine.history
    publisher, plain, pattern = Connection(shared), Connection(shared), Connection(shared)
    plain.call("SUBSCRIBE", "news")
    pattern.call("PSUBSCRIBE", "n*")
    assert publisher.call("PUBLISH", "news", "one") == [["reply", 2]]  # who will get it
    assert history.published == [(b"news", b"one")]
    assert plain.messages() == [] and pattern.messages() == []
    engine.deliver_message_at(b"news", b"one", Position("e", 7))  # back from Redis
    engine.deliver_pmessage(b"n*", b"news", b"one")
    assert plain.messages() == [["message", "news", "one"]]  # no position asked for
    assert pattern.messages() == [["pmessage", "n*", "news", "one"]]
    assert publisher.call("PUBLISH", "nope", "x") == [["reply", 1]]  # not kept: as ever
    assert pattern.messages() == [["pmessage", "n*", "nope", "x"]]


def test_a_shared_channels_publish_the_backplane_refuses_is_delivered_here_without_position(
    shared,
):
    shared.engine.history.carried = False
    publisher, reader = Connection(shared), Connection(shared)
    reader.call("SUBSCRIBE", "news")
    assert publisher.call("PUBLISH", "news", "one") == [["reply", 1]]
    assert reader.messages() == [["message", "news", "one"]]


def test_resume_on_a_shared_history_holds_live_messages_until_the_read_and_drops_the_replayed(
    shared,
):
    engine, history = shared.engine, shared.engine.history
    reader = Connection(shared)
    reader.call("SUBSCRIBE", "other")
    assert reader.call("RESUME", "news", "e", "2") == []  # answered once read
    reader.send(command("PING"))  # waits its turn behind RESUME
    [(channel, asked, answer)] = history.reads
    assert (channel, asked) == (b"news", Position("e", 2))
    # Live meanwhile: 3 and 4 were also read (below the top), 5 was not.
    for offset in (3, 4, 5):
        engine.deliver_message_at(b"news", b"m%d" % offset, Position("e", offset))
    engine.deliver_message(b"other", b"x")
    assert reader.messages() == []
    answer.callback(Recovery([(3, b"m3"), (4, b"m4")], Position("e", 4), True))
    assert reader.messages() == [
        ["subscribe", "news", 2],
        ["message", "news", "m3", {"epoch": "e", "offset": 3}],
        ["message", "news", "m4", {"epoch": "e", "offset": 4}],
        ["position", "news", {"epoch": "e", "offset": 4}],
        ["message", "news", "m5", {"epoch": "e", "offset": 5}],
        ["message", "other", "x"],
        ["pong", ""],
    ]
    engine.deliver_message_at(b"news", b"m6", Position("e", 6))
    assert reader.messages() == [["message", "news", "m6", {"epoch": "e", "offset": 6}]]


def test_resume_on_a_shared_history_that_cannot_be_read_says_so_and_stays_subscribed(shared):
    engine, history = shared.engine, shared.engine.history
    reader = Connection(shared)
    reader.call("RESUME", "news", "e", "2")
    engine.deliver_message_at(b"news", b"m3", Position("e", 3))
    history.reads[0][2].errback(HistoryUnavailable("redis://127.0.0.1:6379 is down"))
    assert reader.messages() == [
        ["subscribe", "news", 1],
        [
            "recovery_failed",
            "news",
            None,
            "the channel's history cannot be read: redis://127.0.0.1:6379 is down",
        ],
        ["message", "news", "m3", {"epoch": "e", "offset": 3}],
    ]


def test_history_on_a_shared_history_answers_once_read_or_with_the_backplane_error(shared):
    history = shared.engine.history
    reader = Connection(shared)
    assert reader.call("HISTORY", "news", "2") == []
    history.reads[0][2].callback(Recovery([(4, b"m4")], Position("e", 4), True))
    assert reader.messages() == [["history", "news", {"epoch": "e", "offset": 4}, [[4, "m4"]]]]
    reader.call("HISTORY", "news", "2")
    history.reads[1][2].errback(HistoryUnavailable("redis://127.0.0.1:6379 is down"))
    assert reader.messages() == [["error", "BACKPLANE redis://127.0.0.1:6379 is down"]]


def test_what_is_held_counts_against_the_hard_output_limit(make_factory):
    factory = make_factory(output_buffer_hard=1000)
    factory.engine.history = SharedStub([b"news"])
    reader = Connection(factory)
    reader.call("RESUME", "news", "e", "0")
    for offset in range(1, 30):
        factory.engine.deliver_message_at(b"news", b"x" * 50, Position("e", offset))
    assert factory.slow_consumers == 1
    assert reader.transport.value()[-100:].find(b"hard limit") >= 0


def test_a_fault_reading_a_shared_history_is_logged_and_answered(shared, monkeypatch):
    events: list[dict] = []
    monkeypatch.setattr(ws_commands, "_log", Logger(observer=events.append))
    history = shared.engine.history
    reader = Connection(shared)
    reader.call("HISTORY", "news", "2")
    history.reads[0][2].errback(ZeroDivisionError("a bug"))
    assert reader.messages() == [["error", "ERR the channel's history could not be read"]]
    reader.call("RESUME", "news", "e", "1")
    history.reads[1][2].errback(ZeroDivisionError("a bug"))
    assert reader.messages() == [
        ["subscribe", "news", 1],
        ["recovery_failed", "news", None, "the channel's history could not be read"],
    ]
    faults = [event["log_failure"].value for event in events if "log_failure" in event]
    assert [type(fault) for fault in faults] == [ZeroDivisionError, ZeroDivisionError]
