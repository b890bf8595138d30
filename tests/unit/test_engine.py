"""pubsub.core.engine: every command and its corners, with fake subscribers and encoders.

Counts, confirmations and PUBSUB answers follow redis-server 7.0.15 (checked by
hand against a live server: e.g. UNSUBSCRIBE with no names from a client that holds
only a pattern answers [unsubscribe, nil, 1], SUNSUBSCRIBE of a name not held
answers with the shard count, NUMPAT counts distinct patterns).
"""

from __future__ import annotations

from typing import Any

import pytest

from pubsub.core.engine import Engine, Kind, UnknownClient


class Encoder:
    """Builds tagged tuples and counts its calls per kind."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.calls: list[tuple] = []

    def message(self, channel: bytes, payload: bytes) -> Any:
        self.calls.append(("message", channel, payload))
        return (self.tag, "message", channel, payload)

    def pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> Any:
        self.calls.append(("pmessage", pattern, channel, payload))
        return (self.tag, "pmessage", pattern, channel, payload)

    def smessage(self, channel: bytes, payload: bytes) -> Any:
        self.calls.append(("smessage", channel, payload))
        return (self.tag, "smessage", channel, payload)


class Recorder:
    """A subscriber that keeps its frames, and writes them to a shared log too."""

    def __init__(self, name: str, encoder: Encoder, log: list) -> None:
        self.name = name
        self.encoder = encoder
        self.frames: list = []
        self.log = log

    def deliver(self, frame: Any) -> None:
        self.frames.append(frame)
        self.log.append((self.name, frame))


class World:
    """An engine and helpers to register named recorders."""

    def __init__(self) -> None:
        self.engine = Engine()
        self.encoder = Encoder("E")
        self.log: list = []
        self.recorders: dict[int, Recorder] = {}

    def client(self, name: str = "c", encoder: Encoder | None = None) -> int:
        recorder = Recorder(name, encoder or self.encoder, self.log)
        token = self.engine.register(recorder)
        self.recorders[token] = recorder
        return token

    def frames(self, token: int) -> list:
        return self.recorders[token].frames


@pytest.fixture
def world() -> World:
    return World()


def message(channel: bytes, payload: bytes) -> tuple:
    return ("E", "message", channel, payload)


def pmessage(pattern: bytes, channel: bytes, payload: bytes) -> tuple:
    return ("E", "pmessage", pattern, channel, payload)


def smessage(channel: bytes, payload: bytes) -> tuple:
    return ("E", "smessage", channel, payload)


# -- registering ------------------------------------------------------------------


def test_register_gives_distinct_growing_tokens(world: World) -> None:
    tokens = [world.client() for _ in range(5)]
    assert tokens == sorted(set(tokens))
    assert world.engine.client_count == 5


def test_unknown_token_raises_unknown_client(world: World) -> None:
    token = world.client()
    world.engine.unregister(token)
    calls = [
        lambda: world.engine.subscribe(token, [b"a"]),
        lambda: world.engine.unsubscribe(token),
        lambda: world.engine.psubscribe(token, [b"a*"]),
        lambda: world.engine.punsubscribe(token),
        lambda: world.engine.ssubscribe(token, [b"s"]),
        lambda: world.engine.sunsubscribe(token),
        lambda: world.engine.subscription_count(token),
        lambda: world.engine.new_subscriptions(token, "channel", [b"a"]),
        lambda: world.engine.subscribe(12345, [b"a"]),
    ]
    for call in calls:
        with pytest.raises(UnknownClient):
            call()
    assert issubclass(UnknownClient, KeyError)


def test_a_client_can_switch_encoder_and_keep_its_subscriptions(world: World) -> None:
    other = Encoder("F")
    token = world.client("c")
    world.engine.subscribe(token, [b"a"])
    world.engine.publish(b"a", b"1")
    world.engine.set_encoder(token, other)
    world.engine.publish(b"a", b"2")
    assert world.frames(token) == [message(b"a", b"1"), ("F", "message", b"a", b"2")]
    assert world.engine.subscription_count(token) == 1
    world.engine.unregister(token)
    with pytest.raises(UnknownClient):
        world.engine.set_encoder(token, other)


def test_unregister_unknown_or_twice_is_silent(world: World) -> None:
    token = world.client()
    world.engine.subscribe(token, [b"a"])
    world.engine.unregister(token)
    world.engine.unregister(token)
    world.engine.unregister(999)
    assert world.engine.client_count == 0
    assert world.engine.channels() == []


# -- subscribing: counts ---------------------------------------------------------


def test_channels_and_patterns_count_together_shard_channels_alone(world: World) -> None:
    engine, token = world.engine, world.client()
    assert engine.subscribe(token, [b"a", b"b"]) == [(b"a", 1), (b"b", 2)]
    assert engine.psubscribe(token, [b"p*", b"q?"]) == [(b"p*", 3), (b"q?", 4)]
    assert engine.ssubscribe(token, [b"s1"]) == [(b"s1", 1)]
    assert engine.subscribe(token, [b"c"]) == [(b"c", 5)]
    assert engine.ssubscribe(token, [b"s2", b"s3"]) == [(b"s2", 2), (b"s3", 3)]
    assert engine.psubscribe(token, [b"r"]) == [(b"r", 6)]
    assert engine.subscription_count(token) == 9


def test_same_name_as_channel_pattern_and_shard_channel_counts_in_each(world: World) -> None:
    engine, token = world.engine, world.client()
    assert engine.subscribe(token, [b"x"]) == [(b"x", 1)]
    assert engine.psubscribe(token, [b"x"]) == [(b"x", 2)]
    assert engine.ssubscribe(token, [b"x"]) == [(b"x", 1)]
    assert engine.subscription_count(token) == 3


def test_counts_are_per_client(world: World) -> None:
    engine = world.engine
    first, second = world.client(), world.client()
    engine.subscribe(first, [b"a", b"b"])
    assert engine.subscribe(second, [b"a"]) == [(b"a", 1)]
    assert engine.psubscribe(second, [b"*"]) == [(b"*", 2)]
    assert engine.ssubscribe(second, [b"a"]) == [(b"a", 1)]


def test_duplicate_subscribe_is_confirmed_again_without_counting(world: World) -> None:
    engine, token = world.engine, world.client()
    assert engine.subscribe(token, [b"a", b"a", b"b", b"a"]) == [
        (b"a", 1),
        (b"a", 1),
        (b"b", 2),
        (b"a", 2),
    ]
    assert engine.subscribe(token, [b"b"]) == [(b"b", 2)]
    assert engine.numsub([b"a", b"b"]) == [(b"a", 1), (b"b", 1)]
    assert list(engine._channels[b"a"]) == [token]


def test_duplicate_psubscribe_is_confirmed_again_without_counting(world: World) -> None:
    engine, token = world.engine, world.client()
    assert engine.psubscribe(token, [b"a*", b"a*"]) == [(b"a*", 1), (b"a*", 1)]
    assert engine.psubscribe(token, [b"a*"]) == [(b"a*", 1)]
    assert engine.numpat() == 1
    assert list(engine._patterns[b"a*"]) == [token]
    assert engine.publish(b"ab", b"x") == 1
    assert world.frames(token) == [pmessage(b"a*", b"ab", b"x")]


def test_duplicate_ssubscribe_is_confirmed_again_without_counting(world: World) -> None:
    engine, token = world.engine, world.client()
    assert engine.ssubscribe(token, [b"s", b"s"]) == [(b"s", 1), (b"s", 1)]
    assert engine.ssubscribe(token, [b"s"]) == [(b"s", 1)]
    assert engine.shard_numsub([b"s"]) == [(b"s", 1)]
    assert engine.spublish(b"s", b"x") == 1
    assert world.frames(token) == [smessage(b"s", b"x")]


def test_subscribe_with_no_names_confirms_nothing(world: World) -> None:
    engine, token = world.engine, world.client()
    assert engine.subscribe(token, []) == []
    assert engine.psubscribe(token, []) == []
    assert engine.ssubscribe(token, []) == []
    assert engine.subscription_count(token) == 0


def test_new_subscriptions_counts_distinct_names_not_held(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.subscribe(token, [b"a"])
    engine.psubscribe(token, [b"p"])
    engine.ssubscribe(token, [b"s"])
    assert engine.new_subscriptions(token, "channel", [b"a", b"b", b"b", b"p", b"s"]) == 3
    assert engine.new_subscriptions(token, "pattern", [b"a", b"p", b"p"]) == 1
    assert engine.new_subscriptions(token, "shard", [b"s", b"s"]) == 0
    assert engine.new_subscriptions(token, "shard", []) == 0


# -- unsubscribing ---------------------------------------------------------------


def test_unsubscribe_with_no_names_confirms_each_channel_in_subscription_order(
    world: World,
) -> None:
    engine, token = world.engine, world.client()
    engine.subscribe(token, [b"z", b"a", b"m"])
    engine.psubscribe(token, [b"p*"])
    assert engine.unsubscribe(token) == [(b"z", 3), (b"a", 2), (b"m", 1)]
    assert engine.channels() == []
    assert engine.unsubscribe(token) == [(None, 1)]


def test_unsubscribe_order_follows_resubscription(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.subscribe(token, [b"x", b"y"])
    engine.unsubscribe(token, [b"x"])
    engine.subscribe(token, [b"x"])
    assert engine.unsubscribe(token) == [(b"y", 1), (b"x", 0)]


def test_punsubscribe_with_no_names_confirms_each_pattern_in_order(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.psubscribe(token, [b"z*", b"a*", b"m?"])
    engine.subscribe(token, [b"c"])
    assert engine.punsubscribe(token) == [(b"z*", 3), (b"a*", 2), (b"m?", 1)]
    assert engine.numpat() == 0
    assert engine._pattern_index == {}
    assert engine.punsubscribe(token) == [(None, 1)]


def test_sunsubscribe_with_no_names_confirms_each_shard_channel_in_order(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.ssubscribe(token, [b"s2", b"s1", b"s3"])
    engine.subscribe(token, [b"c"])
    engine.psubscribe(token, [b"p"])
    assert engine.sunsubscribe(token) == [(b"s2", 2), (b"s1", 1), (b"s3", 0)]
    assert engine.shard_channels() == []
    assert engine.sunsubscribe(token) == [(None, 0)]


@pytest.mark.parametrize(
    ("method", "other_count"),
    [
        # held: 2 channels, 3 patterns, 4 shard channels, but none of the kind left
        ("unsubscribe", 3),  # channels + patterns: the 3 patterns
        ("punsubscribe", 2),  # channels + patterns: the 2 channels
        ("sunsubscribe", 0),  # shard channels only
    ],
)
def test_unsubscribe_all_holding_none_of_that_kind_answers_none_and_count(
    world: World, method: str, other_count: int
) -> None:
    engine, token = world.engine, world.client()
    held = {
        "unsubscribe": ("subscribe", [b"c1", b"c2"]),
        "punsubscribe": ("psubscribe", [b"p1", b"p2", b"p3"]),
        "sunsubscribe": ("ssubscribe", [b"s1", b"s2", b"s3", b"s4"]),
    }
    for other, (subscribe, names) in held.items():
        if other != method:
            getattr(engine, subscribe)(token, names)
    assert getattr(engine, method)(token) == [(None, other_count)]
    assert engine.subscription_count(token) == 9 - len(held[method][1])


def test_unsubscribe_all_from_a_client_holding_nothing(world: World) -> None:
    engine, token = world.engine, world.client()
    assert engine.unsubscribe(token) == [(None, 0)]
    assert engine.punsubscribe(token) == [(None, 0)]
    assert engine.sunsubscribe(token) == [(None, 0)]


def test_unsubscribe_names_not_held_confirms_them_with_the_count(world: World) -> None:
    engine = world.engine
    token, other = world.client(), world.client()
    engine.subscribe(token, [b"a", b"b"])
    engine.psubscribe(token, [b"p"])
    engine.subscribe(other, [b"elsewhere"])
    assert engine.unsubscribe(token, [b"nope", b"elsewhere"]) == [(b"nope", 3), (b"elsewhere", 3)]
    assert engine.unsubscribe(token, [b"a", b"nope", b"a"]) == [(b"a", 2), (b"nope", 2), (b"a", 2)]
    assert engine.punsubscribe(token, [b"a"]) == [(b"a", 2)]
    assert engine.sunsubscribe(token, [b"a"]) == [(b"a", 0)]
    assert engine.numsub([b"elsewhere", b"b"]) == [(b"elsewhere", 1), (b"b", 1)]


def test_punsubscribe_and_sunsubscribe_by_name(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.psubscribe(token, [b"a*", b"b*"])
    engine.subscribe(token, [b"c"])
    engine.ssubscribe(token, [b"s", b"t"])
    assert engine.punsubscribe(token, [b"b*", b"zz"]) == [(b"b*", 2), (b"zz", 2)]
    assert engine.sunsubscribe(token, [b"t", b"s", b"t"]) == [(b"t", 1), (b"s", 0), (b"t", 0)]
    assert engine.publish(b"bx", b"m") == 0
    assert engine.publish(b"ax", b"m") == 1
    assert engine.spublish(b"s", b"m") == 0


def test_unsubscribing_one_client_keeps_the_others(world: World) -> None:
    engine = world.engine
    first, second = world.client("first"), world.client("second")
    engine.subscribe(first, [b"ch"])
    engine.subscribe(second, [b"ch"])
    engine.psubscribe(first, [b"c*"])
    engine.psubscribe(second, [b"c*"])
    engine.unsubscribe(first, [b"ch"])
    engine.punsubscribe(second, [b"c*"])
    assert engine.publish(b"ch", b"x") == 2
    assert world.log == [
        ("second", message(b"ch", b"x")),
        ("first", pmessage(b"c*", b"ch", b"x")),
    ]
    assert engine.numpat() == 1


# -- publishing ------------------------------------------------------------------


def test_publish_to_nobody_returns_zero(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.subscribe(token, [b"other"])
    engine.psubscribe(token, [b"x*"])
    assert engine.publish(b"ch", b"x") == 0
    assert world.frames(token) == []


def test_publish_counts_every_delivery(world: World) -> None:
    engine = world.engine
    token, other = world.client("one"), world.client("other")
    engine.subscribe(token, [b"ch"])
    engine.psubscribe(token, [b"c*", b"?h", b"*", b"x*"])
    engine.psubscribe(other, [b"c*"])
    assert engine.publish(b"ch", b"hi") == 5
    assert world.frames(token) == [
        message(b"ch", b"hi"),
        pmessage(b"*", b"ch", b"hi"),
        pmessage(b"?h", b"ch", b"hi"),
        pmessage(b"c*", b"ch", b"hi"),
    ]
    assert world.frames(other) == [pmessage(b"c*", b"ch", b"hi")]


def test_delivery_order_channel_first_then_patterns_in_byte_order(world: World) -> None:
    engine = world.engine
    t1, t2, t3 = world.client("t1"), world.client("t2"), world.client("t3")
    # subscriptions made in an order unlike the tokens' and the patterns'
    engine.subscribe(t3, [b"ch"])
    engine.subscribe(t1, [b"ch"])
    engine.subscribe(t2, [b"ch"])
    engine.psubscribe(t3, [b"ch", b"c?"])
    engine.psubscribe(t1, [b"c*"])
    engine.psubscribe(t2, [b"*", b"ch"])
    engine.psubscribe(t1, [b"?h", b"ch"])
    assert engine.publish(b"ch", b"p") == 10
    assert world.log == [
        ("t1", message(b"ch", b"p")),
        ("t2", message(b"ch", b"p")),
        ("t3", message(b"ch", b"p")),
        ("t2", pmessage(b"*", b"ch", b"p")),
        ("t1", pmessage(b"?h", b"ch", b"p")),
        ("t1", pmessage(b"c*", b"ch", b"p")),
        ("t3", pmessage(b"c?", b"ch", b"p")),
        ("t1", pmessage(b"ch", b"ch", b"p")),
        ("t2", pmessage(b"ch", b"ch", b"p")),
        ("t3", pmessage(b"ch", b"ch", b"p")),
    ]


def test_patterns_longer_than_the_channel_do_not_match(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.psubscribe(token, [b"abcdef*", b"abc?", b"abc"])
    assert engine.publish(b"abc", b"x") == 1
    assert engine.publish(b"ab", b"x") == 0
    assert engine.publish(b"abcdefg", b"x") == 1
    assert engine.publish(b"abcd", b"x") == 1
    assert world.frames(token) == [
        pmessage(b"abc", b"abc", b"x"),
        pmessage(b"abcdef*", b"abcdefg", b"x"),
        pmessage(b"abc?", b"abcd", b"x"),
    ]


def test_pattern_star_does_not_match_the_empty_channel(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.psubscribe(token, [b"*", b""])
    engine.subscribe(token, [b""])
    assert engine.publish(b"", b"x") == 2
    assert world.frames(token) == [message(b"", b"x"), pmessage(b"", b"", b"x")]


def test_spublish_reaches_only_shard_subscribers(world: World) -> None:
    engine = world.engine
    shard, plain, pattern = world.client("shard"), world.client("plain"), world.client("pattern")
    engine.ssubscribe(shard, [b"orders"])
    engine.subscribe(plain, [b"orders"])
    engine.psubscribe(pattern, [b"*"])
    assert engine.spublish(b"orders", b"x") == 1
    assert world.log == [("shard", smessage(b"orders", b"x"))]
    assert engine.spublish(b"other", b"x") == 0
    assert engine.publish(b"orders", b"y") == 2
    assert world.frames(shard) == [smessage(b"orders", b"x")]


def test_spublish_in_registration_order(world: World) -> None:
    engine = world.engine
    first, second = world.client("first"), world.client("second")
    engine.ssubscribe(second, [b"s"])
    engine.ssubscribe(first, [b"s"])
    assert engine.spublish(b"s", b"x") == 2
    assert [name for name, _ in world.log] == ["first", "second"]


def test_publish_and_spublish_take_str_as_utf8(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.subscribe(token, ["café".encode()])
    engine.psubscribe(token, [b"caf?*"])
    engine.ssubscribe(token, ["naïve".encode()])
    assert engine.publish("café", "héllo") == 2
    assert engine.spublish("naïve", "wörld") == 1
    assert engine.publish("café".encode(), "x") == 2
    assert world.frames(token) == [
        message("café".encode(), "héllo".encode()),
        pmessage(b"caf?*", "café".encode(), "héllo".encode()),
        smessage("naïve".encode(), "wörld".encode()),
        message("café".encode(), b"x"),
        pmessage(b"caf?*", "café".encode(), b"x"),
    ]


def test_binary_and_non_utf8_names(world: World) -> None:
    engine, token = world.engine, world.client()
    channel = b"\xff\x00bin\x80"
    assert engine.subscribe(token, [channel]) == [(channel, 1)]
    assert engine.psubscribe(token, [b"\xff*", b"[\x80-\xff]?bin?"]) == [
        (b"\xff*", 2),
        (b"[\x80-\xff]?bin?", 3),
    ]
    assert engine.ssubscribe(token, [b"\xfe\xfd"]) == [(b"\xfe\xfd", 1)]
    assert engine.publish(channel, b"\x00\xff") == 3
    assert engine.spublish(b"\xfe\xfd", b"\x01") == 1
    assert world.frames(token) == [
        message(channel, b"\x00\xff"),
        pmessage(b"[\x80-\xff]?bin?", channel, b"\x00\xff"),
        pmessage(b"\xff*", channel, b"\x00\xff"),
        smessage(b"\xfe\xfd", b"\x01"),
    ]
    assert engine.channels() == [channel]
    assert engine.channels(b"\xff?bin*") == [channel]
    assert engine.numsub([channel]) == [(channel, 1)]
    assert engine.shard_channels(b"\xfe*") == [b"\xfe\xfd"]
    assert engine.unsubscribe(token) == [(channel, 2)]
    assert engine.punsubscribe(token) == [(b"\xff*", 1), (b"[\x80-\xff]?bin?", 0)]


# -- encoders ----------------------------------------------------------------------


def test_each_encoder_is_called_once_per_publish(world: World) -> None:
    engine = world.engine
    enc_a, enc_b = Encoder("A"), Encoder("B")
    a_subs = [world.client(f"a{i}", enc_a) for i in range(3)]
    b_subs = [world.client(f"b{i}", enc_b) for i in range(2)]
    for token in a_subs + b_subs:
        engine.subscribe(token, [b"ch"])
    assert engine.publish(b"ch", b"one") == 5
    assert enc_a.calls == [("message", b"ch", b"one")]
    assert enc_b.calls == [("message", b"ch", b"one")]
    frames_a = [world.frames(token)[0] for token in a_subs]
    frames_b = [world.frames(token)[0] for token in b_subs]
    assert frames_a == [("A", "message", b"ch", b"one")] * 3
    assert frames_b == [("B", "message", b"ch", b"one")] * 2
    # the very same frame object is handed to every receiver of one kind
    assert all(frame is frames_a[0] for frame in frames_a)
    assert all(frame is frames_b[0] for frame in frames_b)

    assert engine.publish(b"ch", b"two") == 5
    assert len(enc_a.calls) == 2 and len(enc_b.calls) == 2


def test_each_encoder_is_called_once_per_matching_pattern(world: World) -> None:
    engine = world.engine
    enc_a, enc_b = Encoder("A"), Encoder("B")
    tokens = [world.client(f"a{i}", enc_a) for i in range(3)]
    tokens += [world.client(f"b{i}", enc_b) for i in range(3)]
    for token in tokens:
        engine.subscribe(token, [b"ch"])
        engine.psubscribe(token, [b"c*"])
    engine.psubscribe(tokens[0], [b"?h"])
    engine.psubscribe(tokens[1], [b"?h"])
    engine.psubscribe(tokens[3], [b"*"])
    engine.psubscribe(tokens[4], [b"zz*"])
    assert engine.publish(b"ch", b"p") == 6 + 6 + 2 + 1
    assert sorted(enc_a.calls) == [
        ("message", b"ch", b"p"),
        ("pmessage", b"?h", b"ch", b"p"),
        ("pmessage", b"c*", b"ch", b"p"),
    ]
    assert sorted(enc_b.calls) == [
        ("message", b"ch", b"p"),
        ("pmessage", b"*", b"ch", b"p"),
        ("pmessage", b"c*", b"ch", b"p"),
    ]


def test_each_encoder_is_called_once_per_spublish(world: World) -> None:
    engine = world.engine
    enc_a, enc_b = Encoder("A"), Encoder("B")
    tokens = [world.client("a", enc_a), world.client("b", enc_b), world.client("a", enc_a)]
    tokens.append(world.client("b", enc_b))
    for token in tokens:
        engine.ssubscribe(token, [b"s"])
    assert engine.spublish(b"s", b"x") == 4
    assert enc_a.calls == [("smessage", b"s", b"x")]
    assert enc_b.calls == [("smessage", b"s", b"x")]
    assert [world.frames(t) for t in tokens] == [
        [("A", "smessage", b"s", b"x")],
        [("B", "smessage", b"s", b"x")],
        [("A", "smessage", b"s", b"x")],
        [("B", "smessage", b"s", b"x")],
    ]


def test_no_encoder_call_without_receivers(world: World) -> None:
    engine, token = world.engine, world.client()
    engine.subscribe(token, [b"a"])
    engine.psubscribe(token, [b"x*"])
    engine.ssubscribe(token, [b"s"])
    engine.publish(b"b", b"x")
    engine.spublish(b"t", b"x")
    assert world.encoder.calls == []


# -- PUBSUB ------------------------------------------------------------------------


def test_pubsub_channels(world: World) -> None:
    engine = world.engine
    first, second = world.client(), world.client()
    engine.subscribe(first, [b"news.tech", b"news.art", b"sport", b""])
    engine.subscribe(second, [b"news.tech", b"weather"])
    engine.psubscribe(second, [b"pattern.only"])
    engine.ssubscribe(second, [b"shard.only"])
    assert engine.channels() == [b"", b"news.art", b"news.tech", b"sport", b"weather"]
    assert engine.channels(b"news.*") == [b"news.art", b"news.tech"]
    assert engine.channels(b"*") == [b"news.art", b"news.tech", b"sport", b"weather"]
    assert engine.channels(b"") == [b""]
    assert engine.channels(b"nothing*") == []
    assert engine.channels(b"[sw]*") == [b"sport", b"weather"]
    engine.unsubscribe(first, [b"news.tech", b"sport"])
    assert engine.channels(b"news.*") == [b"news.art", b"news.tech"]
    assert engine.channels(b"s*") == []
    assert engine.channel_count == 4


def test_pubsub_numsub_counts_channel_subscribers_only(world: World) -> None:
    engine = world.engine
    clients = [world.client() for _ in range(3)]
    for token in clients:
        engine.subscribe(token, [b"a"])
    engine.subscribe(clients[0], [b"b"])
    engine.psubscribe(clients[1], [b"b", b"*"])
    engine.ssubscribe(clients[2], [b"b"])
    assert engine.numsub([b"a", b"b", b"missing", b"a"]) == [
        (b"a", 3),
        (b"b", 1),
        (b"missing", 0),
        (b"a", 3),
    ]
    assert engine.numsub([]) == []


def test_pubsub_numpat_counts_distinct_patterns(world: World) -> None:
    engine = world.engine
    first, second = world.client(), world.client()
    assert engine.numpat() == 0
    engine.psubscribe(first, [b"a*", b"b*"])
    engine.psubscribe(second, [b"a*"])
    assert engine.numpat() == 2
    engine.psubscribe(second, [b"c?"])
    assert engine.numpat() == 3
    engine.punsubscribe(first, [b"a*"])
    assert engine.numpat() == 3
    engine.unregister(second)
    assert engine.numpat() == 1
    assert engine.numpat() == 1


def test_pubsub_shardchannels_and_shardnumsub(world: World) -> None:
    engine = world.engine
    first, second = world.client(), world.client()
    engine.ssubscribe(first, [b"s:{1}", b"s:{2}", b"t"])
    engine.ssubscribe(second, [b"s:{1}"])
    engine.subscribe(second, [b"plain"])
    assert engine.shard_channels() == [b"s:{1}", b"s:{2}", b"t"]
    assert engine.shard_channels(b"s:*") == [b"s:{1}", b"s:{2}"]
    assert engine.shard_channels(b"plain") == []
    assert engine.shard_numsub([b"s:{1}", b"t", b"plain", b"x"]) == [
        (b"s:{1}", 2),
        (b"t", 1),
        (b"plain", 0),
        (b"x", 0),
    ]
    assert engine.shard_channel_count == 3
    engine.sunsubscribe(first)
    assert engine.shard_channels() == [b"s:{1}"]
    assert engine.shard_numsub([b"s:{1}"]) == [(b"s:{1}", 1)]


# -- unregister ----------------------------------------------------------------------


def _assert_empty(engine: Engine) -> None:
    assert engine._channels == {}
    assert engine._patterns == {}
    assert engine._pattern_index == {}
    assert engine._shard_channels == {}
    assert engine._clients == {}


def test_unregister_of_the_last_client_empties_every_structure(world: World) -> None:
    engine = world.engine
    tokens = [world.client() for _ in range(3)]
    for i, token in enumerate(tokens):
        engine.subscribe(token, [b"shared", b"own%d" % i, b""])
        engine.psubscribe(token, [b"*", b"sh*", b"own%d*" % i, b"[ab]", b""])
        engine.ssubscribe(token, [b"shared", b"s%d" % i])
    engine.unregister(tokens[1])
    assert engine.numsub([b"shared", b"own1"]) == [(b"shared", 2), (b"own1", 0)]
    assert engine.numpat() == 6
    assert engine.publish(b"own1", b"x") == 2  # '*' for the two left
    engine.unregister(tokens[0])
    engine.unregister(tokens[2])
    _assert_empty(engine)
    assert engine.channels() == engine.shard_channels() == []
    assert engine.numpat() == 0
    assert engine.publish(b"shared", b"x") == 0
    assert engine.spublish(b"shared", b"x") == 0
    assert (engine.client_count, engine.channel_count, engine.numpat()) == (0, 0, 0)
    assert engine.shard_channel_count == 0


def test_unsubscribing_everything_empties_every_structure(world: World) -> None:
    engine = world.engine
    tokens = [world.client() for _ in range(2)]
    for token in tokens:
        engine.subscribe(token, [b"a", b"b"])
        engine.psubscribe(token, [b"a*", b"?", b"ab\\*"])
        engine.ssubscribe(token, [b"s"])
    for token in tokens:
        engine.unsubscribe(token)
        engine.punsubscribe(token, [b"a*", b"?"])
        engine.punsubscribe(token)
        engine.sunsubscribe(token, [b"s"])
    for token in tokens:
        engine.unregister(token)
    _assert_empty(engine)


class _SpyDict(dict):
    """A dict that records which of its methods a caller used."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.used: list[str] = []

    def _note(self, name: str) -> None:
        self.used.append(name)

    def __getitem__(self, key: Any) -> Any:
        self._note("getitem")
        return super().__getitem__(key)

    def get(self, *args: Any) -> Any:
        self._note("get")
        return super().get(*args)

    def __iter__(self) -> Any:
        self._note("iter")
        return super().__iter__()

    def keys(self) -> Any:
        self._note("keys")
        return super().keys()

    def values(self) -> Any:
        self._note("values")
        return super().values()

    def items(self) -> Any:
        self._note("items")
        return super().items()


def test_unregister_costs_only_the_clients_own_subscriptions(world: World) -> None:
    engine = world.engine
    crowd = world.client("crowd")
    engine.subscribe(crowd, [b"c%d" % i for i in range(500)])
    engine.psubscribe(crowd, [b"p%d*" % i for i in range(500)])
    engine.ssubscribe(crowd, [b"s%d" % i for i in range(500)])
    leaver = world.client("leaver")
    engine.subscribe(leaver, [b"c1", b"mine"])
    engine.psubscribe(leaver, [b"p1*", b"mine*", b"[m]ine"])
    engine.ssubscribe(leaver, [b"s1"])
    spies = {}
    for kind, name in zip(Kind, ("_channels", "_patterns", "_shard_channels"), strict=True):
        spies[name] = _SpyDict(getattr(engine, name))
        setattr(engine, name, spies[name])
        engine._registries[kind] = spies[name]
    engine.unregister(leaver)
    assert spies["_channels"].used == ["getitem", "getitem"]
    assert spies["_patterns"].used == ["getitem", "getitem", "getitem"]
    assert spies["_shard_channels"].used == ["getitem"]
    assert engine.channel_count == 500
    assert engine.numpat() == 500
    assert engine.shard_channel_count == 500
    assert engine.numsub([b"c1"]) == [(b"c1", 1)]


def test_unregistered_client_gets_nothing_more(world: World) -> None:
    engine = world.engine
    gone, stays = world.client("gone"), world.client("stays")
    for token in (gone, stays):
        engine.subscribe(token, [b"ch"])
        engine.psubscribe(token, [b"c*"])
        engine.ssubscribe(token, [b"ch"])
    engine.unregister(gone)
    assert engine.publish(b"ch", b"x") == 2
    assert engine.spublish(b"ch", b"y") == 1
    assert world.frames(gone) == []
    assert world.frames(stays) == [
        message(b"ch", b"x"),
        pmessage(b"c*", b"ch", b"x"),
        smessage(b"ch", b"y"),
    ]


def test_a_name_with_one_subscriber_holds_a_tuple_and_more_a_sorted_set(world: World) -> None:
    first, second = world.client("1"), world.client("2")
    engine = world.engine
    engine.subscribe(second, [b"a"])
    assert engine._channels[b"a"] == (second,)
    engine.subscribe(first, [b"a"])
    assert list(engine._channels[b"a"]) == [first, second]  # token order, not arrival
    engine.publish(b"a", b"x")
    assert [name for name, _ in world.log] == ["1", "2"]
    engine.unsubscribe(second, [b"a"])
    assert engine._channels[b"a"] == (first,)
    assert engine.numsub([b"a"]) == [(b"a", 1)]
    engine.unregister(first)
    assert b"a" not in engine._channels
