"""Recovery over the JSON protocol: RESUME and HISTORY on a channel's history, on a Clock."""

from __future__ import annotations

import pytest

from pubsub.core.history import Position
from pubsub.operations.config import ConfigError, Settings
from pubsub.resp.protocol import RespFactory
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


def test_history_cannot_be_used_with_a_backplane_yet():
    with pytest.raises(ConfigError, match="cannot be used with a backplane yet"):
        Settings(history_channels="news", backplane="redis://127.0.0.1:6379/")


@pytest.mark.parametrize(
    "setting, value", [("history_ttl", 0), ("history_size", 0), ("history_max_bytes", 0)]
)
def test_history_bounds_must_be_positive(setting, value):
    with pytest.raises(ConfigError, match=setting):
        Settings(history_channels="news", **{setting: value})
