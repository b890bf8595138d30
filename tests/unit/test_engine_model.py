"""The Engine held against a naive reference model by a hypothesis state machine.

The model is plain dicts, sorted lists and a line-by-line recursive port of Redis
7's ``stringmatchlen`` (``src/util.c``) written here, not pubsub.core.glob.  Several
clients, on two encoders, subscribe, unsubscribe, publish and leave with names from
a small alphabet where channels and patterns collide; every confirmation, receiver
count, delivery (and its order), encoder call and PUBSUB answer is compared, and
the engine's structures are checked against the model after every step.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from pubsub.core.engine import Engine, UnknownClient
from pubsub.core.glob import match
from tests.support.redis_server import redis_server
from tests.support.resp3 import Resp3Client

# -- the reference matcher: Redis's stringmatchlen_impl, nocase = 0 ----------------

_STAR, _QUESTION, _OPEN, _CLOSE, _CARET, _DASH, _BACKSLASH = b"*?[]^-\\"


def _signed(byte: int) -> int:
    return byte - 256 if byte > 127 else byte


def redis_stringmatch(pattern: bytes, string: bytes) -> bool:
    """Whether Redis's stringmatchlen(pattern, string, nocase=0) matches."""
    return _stringmatch(pattern, 0, len(pattern), string, 0, len(string), [False], 0)


def _stringmatch(
    pattern: bytes,
    p: int,
    plen: int,
    string: bytes,
    s: int,
    slen: int,
    skip_longer: list[bool],
    nesting: int,
) -> bool:
    # Indices stand for C's pointers; at() reads past the end as C reads the
    # NUL after an sds (None: equal to no byte).
    def at(i: int) -> int | None:
        return pattern[i] if i < len(pattern) else None

    if nesting > 1000:
        return False
    while plen and slen:
        if pattern[p] == _STAR:
            while plen and at(p + 1) == _STAR:
                p, plen = p + 1, plen - 1
            if plen == 1:
                return True
            while slen:
                if _stringmatch(
                    pattern, p + 1, plen - 1, string, s, slen, skip_longer, nesting + 1
                ):
                    return True
                if skip_longer[0]:
                    return False
                s, slen = s + 1, slen - 1
            skip_longer[0] = True
            return False
        elif pattern[p] == _QUESTION:
            s, slen = s + 1, slen - 1
        elif pattern[p] == _OPEN:
            p, plen = p + 1, plen - 1
            negate = at(p) == _CARET
            if negate:
                p, plen = p + 1, plen - 1
            matched = False
            while True:
                if at(p) == _BACKSLASH and plen >= 2:
                    p, plen = p + 1, plen - 1
                    if pattern[p] == string[s]:
                        matched = True
                elif at(p) == _CLOSE:
                    break
                elif plen == 0:
                    p, plen = p - 1, plen + 1
                    break
                elif plen >= 3 and at(p + 1) == _DASH:
                    start, end = _signed(pattern[p]), _signed(pattern[p + 2])
                    if start > end:
                        start, end = end, start
                    p, plen = p + 2, plen - 2
                    if start <= _signed(string[s]) <= end:
                        matched = True
                elif pattern[p] == string[s]:
                    matched = True
                p, plen = p + 1, plen - 1
            if negate:
                matched = not matched
            if not matched:
                return False
            s, slen = s + 1, slen - 1
        else:
            if pattern[p] == _BACKSLASH and plen >= 2:
                p, plen = p + 1, plen - 1
            if pattern[p] != string[s]:
                return False
            s, slen = s + 1, slen - 1
        p, plen = p + 1, plen - 1
        if slen == 0:
            while at(p) == _STAR:
                p, plen = p + 1, plen - 1
            break
    return plen == 0 and slen == 0


GLOB_ALPHABET = b"ab*?[]^-\\\xff\x00\x80\x7f"


def test_reference_matcher_agrees_with_live_redis() -> None:
    """The model's matcher is only a reference if Redis agrees with it."""
    rng = random.Random(20240601)

    def word(max_size: int) -> bytes:
        return bytes(rng.choice(GLOB_ALPHABET) for _ in range(rng.randint(0, max_size)))

    patterns = sorted({word(8) for _ in range(400)})
    channels = sorted({word(6) for _ in range(300)})
    with redis_server() as port:
        subscriber = Resp3Client("127.0.0.1", port)
        query = Resp3Client("127.0.0.1", port)
        try:
            subscriber.send(b"SUBSCRIBE", *channels)
            for _ in channels:
                subscriber.read()
            disagreements = []
            for pattern in patterns:
                query.send(b"PUBSUB", b"CHANNELS", pattern)
                matched = set(query.read())
                disagreements += [
                    (pattern, channel)
                    for channel in channels
                    if redis_stringmatch(pattern, channel) is not (channel in matched)
                ]
        finally:
            subscriber.close()
            query.close()
    assert disagreements == []
    assert any(redis_stringmatch(p, c) for p in patterns for c in channels if b"[" in p)


@settings(max_examples=800, deadline=None)
@given(
    pattern=st.lists(st.sampled_from(list(GLOB_ALPHABET)), max_size=10).map(bytes),
    channel=st.lists(st.sampled_from(list(GLOB_ALPHABET)), max_size=8).map(bytes),
)
def test_glob_agrees_with_the_reference_matcher(pattern: bytes, channel: bytes) -> None:
    assert match(pattern, channel) is redis_stringmatch(pattern, channel)


# -- fakes -------------------------------------------------------------------------


class Encoder:
    """Tags its frames and counts its calls."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.calls: Counter[str] = Counter()

    def message(self, channel: bytes, payload: bytes) -> Any:
        self.calls["message"] += 1
        return (self.tag, "message", channel, payload)

    def pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> Any:
        self.calls["pmessage"] += 1
        return (self.tag, "pmessage", pattern, channel, payload)

    def smessage(self, channel: bytes, payload: bytes) -> Any:
        self.calls["smessage"] += 1
        return (self.tag, "smessage", channel, payload)


class FakeSubscriber:
    def __init__(self, encoder: Encoder, log: list) -> None:
        self.encoder = encoder
        self.log = log
        self.token = 0
        self.frames: list = []

    def deliver(self, frame: Any) -> None:
        self.frames.append(frame)
        self.log.append((self.token, frame))


class ModelClient:
    """What one client holds, in subscription order, and what it should have got."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.channels: dict[bytes, None] = {}
        self.patterns: dict[bytes, None] = {}
        self.shard_channels: dict[bytes, None] = {}
        self.frames: list = []

    def count(self) -> int:
        return len(self.channels) + len(self.patterns)

    def shard_count(self) -> int:
        return len(self.shard_channels)


# Names that collide: literal channels that look like patterns, patterns that
# match several of them, the empty name, a non-UTF-8 byte.
NAMES = [b"a", b"ab", b"b", b"a*", b"a?", b"[ab]", b"b\\*", b"b*", b"*", b"?b", b"", b"\xff"]
names = st.sampled_from(NAMES)
some_names = st.lists(names, min_size=1, max_size=4)
maybe_names = st.lists(names, max_size=3)


class EngineMachine(RuleBasedStateMachine):
    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        self.engine = Engine()
        self.encoders = [Encoder("A"), Encoder("B")]
        self.log: list = []
        self.subscribers: dict[int, FakeSubscriber] = {}
        self.model: dict[int, ModelClient] = {}
        self.gone: list[int] = []
        self.payloads = itertools.count()

    # -- clients ---------------------------------------------------------------

    def _register(self, which: int) -> int:
        encoder = self.encoders[which]
        subscriber = FakeSubscriber(encoder, self.log)
        token = self.engine.register(subscriber)
        assert token not in self.subscribers
        subscriber.token = token
        self.subscribers[token] = subscriber
        self.model[token] = ModelClient(encoder)
        return token

    @initialize(target=clients)
    def two_clients(self) -> Any:
        return multiple(self._register(0), self._register(1))

    @precondition(lambda self: len(self.model) < 4)
    @rule(target=clients, which=st.integers(0, 1))
    def register(self, which: int) -> int:
        return self._register(which)

    @rule(token=consumes(clients))
    def unregister(self, token: int) -> None:
        self.engine.unregister(token)
        del self.model[token]
        self.gone.append(token)

    @precondition(lambda self: bool(self.gone))
    @rule(data=st.data())
    def use_a_gone_client(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from(self.gone))
        with pytest.raises(UnknownClient):
            self.engine.subscribe(token, [b"a"])
        with pytest.raises(UnknownClient):
            self.engine.punsubscribe(token)
        self.engine.unregister(token)  # silent, and changes nothing

    # -- subscribing -------------------------------------------------------------

    @rule(token=clients, channels=some_names)
    def subscribe(self, token: int, channels: list[bytes]) -> None:
        client = self.model[token]
        expected = []
        for channel in channels:
            client.channels.setdefault(channel, None)
            expected.append((channel, client.count()))
        assert self.engine.subscribe(token, channels) == expected

    @rule(token=clients, patterns=some_names)
    def psubscribe(self, token: int, patterns: list[bytes]) -> None:
        client = self.model[token]
        expected = []
        for pattern in patterns:
            client.patterns.setdefault(pattern, None)
            expected.append((pattern, client.count()))
        assert self.engine.psubscribe(token, patterns) == expected

    @rule(token=clients, channels=some_names)
    def ssubscribe(self, token: int, channels: list[bytes]) -> None:
        client = self.model[token]
        expected = []
        for channel in channels:
            client.shard_channels.setdefault(channel, None)
            expected.append((channel, client.shard_count()))
        assert self.engine.ssubscribe(token, channels) == expected

    @staticmethod
    def _leave(held: dict[bytes, None], names: list[bytes], count: Any) -> list:
        if not names:
            if not held:
                return [(None, count())]
            names = list(held)
        expected = []
        for name in names:
            held.pop(name, None)
            expected.append((name, count()))
        return expected

    @rule(token=clients, channels=maybe_names)
    def unsubscribe(self, token: int, channels: list[bytes]) -> None:
        client = self.model[token]
        expected = self._leave(client.channels, channels, client.count)
        assert self.engine.unsubscribe(token, channels) == expected

    @rule(token=clients, patterns=maybe_names)
    def punsubscribe(self, token: int, patterns: list[bytes]) -> None:
        client = self.model[token]
        expected = self._leave(client.patterns, patterns, client.count)
        assert self.engine.punsubscribe(token, patterns) == expected

    @rule(token=clients, channels=maybe_names)
    def sunsubscribe(self, token: int, channels: list[bytes]) -> None:
        client = self.model[token]
        expected = self._leave(client.shard_channels, channels, client.shard_count)
        assert self.engine.sunsubscribe(token, channels) == expected

    # -- publishing ----------------------------------------------------------------

    def _holders(self, kind: str, name: bytes) -> list[int]:
        return sorted(t for t, client in self.model.items() if name in getattr(client, kind))

    def _expect(self, tokens: list[int], fields: tuple, calls: Counter) -> list:
        """The deliveries of one fan-out; counts one encoder call per encoder."""
        deliveries = []
        for encoder in {self.model[t].encoder for t in tokens}:
            calls[(encoder.tag, fields[0])] += 1
        for token in tokens:
            frame = (self.model[token].encoder.tag, *fields)
            deliveries.append((token, frame))
            self.model[token].frames.append(frame)
        return deliveries

    def _calls(self) -> Counter:
        return Counter(
            {(e.tag, kind): n for e in self.encoders for kind, n in e.calls.items() if n}
        )

    def _published(self, count: int, expected: list, calls_before: Counter, calls: Counter) -> None:
        assert count == len(expected)
        assert self.log == expected
        assert self._calls() - calls_before == calls
        self.log.clear()

    @rule(channel=names, as_str=st.booleans())
    def publish(self, channel: bytes, as_str: bool) -> None:
        payload = b"m%d" % next(self.payloads)
        calls: Counter = Counter()
        before = self._calls()
        expected = self._expect(
            self._holders("channels", channel), ("message", channel, payload), calls
        )
        active_patterns = {p for client in self.model.values() for p in client.patterns}
        for pattern in sorted(active_patterns):
            if redis_stringmatch(pattern, channel):
                expected += self._expect(
                    self._holders("patterns", pattern),
                    ("pmessage", pattern, channel, payload),
                    calls,
                )
        if as_str and channel != b"\xff":
            count = self.engine.publish(channel.decode(), payload.decode())
        else:
            count = self.engine.publish(channel, payload)
        self._published(count, expected, before, calls)

    @rule(channel=names, as_str=st.booleans())
    def spublish(self, channel: bytes, as_str: bool) -> None:
        payload = b"s%d" % next(self.payloads)
        calls: Counter = Counter()
        before = self._calls()
        expected = self._expect(
            self._holders("shard_channels", channel), ("smessage", channel, payload), calls
        )
        if as_str and channel != b"\xff":
            count = self.engine.spublish(channel.decode(), payload.decode())
        else:
            count = self.engine.spublish(channel, payload)
        self._published(count, expected, before, calls)

    # -- PUBSUB ------------------------------------------------------------------------

    def _active(self, kind: str) -> set[bytes]:
        return {name for client in self.model.values() for name in getattr(client, kind)}

    @rule(pattern=st.none() | names)
    def pubsub_channels(self, pattern: bytes | None) -> None:
        for kind, method in (
            ("channels", self.engine.channels),
            ("shard_channels", self.engine.shard_channels),
        ):
            expected = sorted(
                name
                for name in self._active(kind)
                if pattern is None or redis_stringmatch(pattern, name)
            )
            assert method(pattern) == expected

    @rule(query=st.lists(names, max_size=4))
    def pubsub_numsub(self, query: list[bytes]) -> None:
        assert self.engine.numsub(query) == [
            (name, len(self._holders("channels", name))) for name in query
        ]
        assert self.engine.shard_numsub(query) == [
            (name, len(self._holders("shard_channels", name))) for name in query
        ]

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def numpat_counts_distinct_patterns(self) -> None:
        assert self.engine.numpat() == len(self._active("patterns"))

    @invariant()
    def counts_agree(self) -> None:
        engine = self.engine
        assert engine.client_count == len(self.model)
        assert engine.channel_count == len(self._active("channels"))
        assert engine.numpat() == len(self._active("patterns"))
        assert engine.shard_channel_count == len(self._active("shard_channels"))
        for token, client in self.model.items():
            assert engine.subscription_count(token) == client.count() + client.shard_count()

    @invariant()
    def structures_agree(self) -> None:
        engine = self.engine
        for kind, registry in (
            ("channels", engine._channels),
            ("patterns", engine._patterns),
            ("shard_channels", engine._shard_channels),
        ):
            expected = {name: self._holders(kind, name) for name in self._active(kind)}
            assert {name: list(tokens) for name, tokens in registry.items()} == expected
        indexed = [
            pattern
            for by_prefix in engine._pattern_index.values()
            for bucket in by_prefix.values()
            for pattern in bucket
        ]
        assert sorted(indexed) == sorted(self._active("patterns"))
        assert all(engine._pattern_index.values())
        assert all(b for by_prefix in engine._pattern_index.values() for b in by_prefix.values())
        assert set(engine._clients) == set(self.model)

    @invariant()
    def every_client_got_exactly_its_frames(self) -> None:
        for token, client in self.model.items():
            assert self.subscribers[token].frames == client.frames
        assert self.log == []

    def teardown(self) -> None:
        for token in list(self.model):
            self.engine.unregister(token)
        engine = self.engine
        assert engine._channels == {}
        assert engine._patterns == {}
        assert engine._pattern_index == {}
        assert engine._shard_channels == {}
        assert engine._clients == {}


EngineMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestEngineAgainstModel = EngineMachine.TestCase
