"""The backplane bridge and the engine hooks it uses, without Redis.

The bridge's two connections are driven with StringTransport: what it writes
is compared with RESP bytes, what Redis would answer is fed back.  Reconnect
backoff and the health check (PINGs, timeouts) run on a Clock: a silent Redis
is one that is fed nothing.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pubsub.backplane.history import PUBLISH_SCRIPT, READ_SCRIPT, RedisHistory
from pubsub.backplane.redis import (
    RESUBSCRIBE_BATCH,
    BackplaneDown,
    RedisBackplane,
    _Connection,
    _ConnectionFactory,
    backoff,
    command,
    escape_glob,
    parse_url,
)
from pubsub.core.commands import Error, Reply, Session, error_kind, execute
from pubsub.core.engine import Engine
from pubsub.core.history import HistoryUnavailable, Position, Recovery
from tests.support.tuples import TupleFrames

NODE = b"0123456789abcdef"
OTHER = b"fedcba9876543210"


class Client:
    encoder = TupleFrames()

    def __init__(self, engine: Engine) -> None:
        self.frames: list = []
        self.token = engine.register(self)
        self.session = Session(engine, self.token)

    def deliver(self, frame: Any) -> None:
        self.frames.append(frame)

    def run(self, *args: bytes | str) -> list:
        return execute(self.session, [a.encode() if isinstance(a, str) else a for a in args])


class Interest:
    """A relay that only records what the engine tells it."""

    def __init__(self) -> None:
        self.events: list = []

    def interest_gained(self, kind: str, name: bytes) -> None:
        self.events.append(("+", kind, name))

    def interest_lost(self, kind: str, name: bytes) -> None:
        self.events.append(("-", kind, name))

    def published(self, kind: str, channel: bytes, payload: bytes) -> None:
        self.events.append(("publish", kind, channel, payload))

    def refusal(self, receivers: int) -> str | None:
        return None


# -- the engine's hooks -------------------------------------------------------------------


def test_the_relay_hears_of_first_and_last_subscribers_only():
    engine = Engine()
    relay = engine.relay = Interest()
    alice, bob = Client(engine), Client(engine)
    alice.run("SUBSCRIBE", "a", "b")
    bob.run("SUBSCRIBE", "a")
    alice.run("PSUBSCRIBE", "a*")
    bob.run("SSUBSCRIBE", "s")
    alice.run("UNSUBSCRIBE", "a")  # bob still holds it
    engine.unregister(bob.token)
    alice.run("PUNSUBSCRIBE")
    assert relay.events == [
        ("+", "channel", b"a"),
        ("+", "channel", b"b"),
        ("+", "pattern", b"a*"),
        ("+", "shard", b"s"),
        ("-", "channel", b"a"),
        ("-", "shard", b"s"),
        ("-", "pattern", b"a*"),
    ]


def test_the_relay_hears_of_every_publish_with_bytes():
    engine = Engine()
    relay = engine.relay = Interest()
    engine.publish("news", "héllo")
    engine.spublish(b"s", b"x")
    assert relay.events == [
        ("publish", "channel", b"news", "héllo".encode()),
        ("publish", "shard", b"s", b"x"),
    ]


def test_messages_from_elsewhere_reach_only_the_named_subscribers():
    engine = Engine()
    channel, pattern, other_pattern, shard = (Client(engine) for _ in range(4))
    channel.run("SUBSCRIBE", "a")
    pattern.run("PSUBSCRIBE", "a*")
    other_pattern.run("PSUBSCRIBE", "?")
    shard.run("SSUBSCRIBE", "a")
    assert engine.deliver_message(b"a", b"m") == 1
    assert engine.deliver_pmessage(b"a*", b"a", b"p") == 1
    assert engine.deliver_smessage(b"a", b"s") == 1
    assert engine.deliver_message(b"nobody", b"m") == 0
    assert engine.deliver_pmessage(b"gone*", b"gone", b"m") == 0
    assert channel.frames == [("message", b"a", b"m")]
    assert pattern.frames == [("pmessage", b"a*", b"a", b"p")]
    assert other_pattern.frames == []
    assert shard.frames == [("smessage", b"a", b"s")]
    assert (engine.publishes, engine.deliveries) == (0, 3)


# -- the bridge ---------------------------------------------------------------------------


class Node:
    """An engine with a bridge whose connections are StringTransports."""

    def __init__(
        self, prefix: bytes = b"pubsub:", password: str = "", timeout: float = 3.0
    ) -> None:
        self.clock = Clock()
        self.engine = Engine()
        auth = f":{password}@" if password else ""
        self.bridge = RedisBackplane(
            self.engine,
            f"redis://{auth}redis.example:6390/0",
            prefix,
            self.clock,
            node_id=NODE,
            ping_interval=1.0,
            timeout=timeout,
        )
        self.subscriber: _Connection | None = None
        self.publisher: _Connection | None = None

    def connect(self, role: str) -> _Connection:
        connection = _Connection(self.bridge, role)
        connection.makeConnection(StringTransport())
        setattr(self, role, connection)
        return connection

    def connect_both(self) -> None:
        self.connect("publisher")
        self.connect("subscriber").dataReceived(b"+PONG\r\n")

    @staticmethod
    def written(connection: _Connection) -> bytes:
        data = connection.transport.value()
        connection.transport.clear()
        return data


def test_a_node_subscribes_in_redis_to_what_its_clients_hold():
    node = Node(prefix=b"app[1]:")
    node.connect_both()
    node.written(node.subscriber)
    alice, bob = Client(node.engine), Client(node.engine)
    alice.run("SUBSCRIBE", "a")
    bob.run("SUBSCRIBE", "a")  # not the first: nothing for Redis
    alice.run("PSUBSCRIBE", "a*")
    alice.run("SSUBSCRIBE", "s")
    assert node.written(node.subscriber) == (
        command(b"SUBSCRIBE", b"app[1]:a")
        + command(b"PSUBSCRIBE", b"app\\[1\\]:a*")
        + command(b"SSUBSCRIBE", b"app[1]:s")
    )
    node.engine.unregister(alice.token)
    assert node.written(node.subscriber) == (
        command(b"SUNSUBSCRIBE", b"app[1]:s") + command(b"PUNSUBSCRIBE", b"app\\[1\\]:a*")
    )
    bob.run("UNSUBSCRIBE")
    assert node.written(node.subscriber) == command(b"UNSUBSCRIBE", b"app[1]:a")


def test_a_publish_is_delivered_here_and_sent_in_an_envelope():
    node = Node()
    node.connect_both()
    alice, bob = Client(node.engine), Client(node.engine)
    alice.run("SUBSCRIBE", "news")
    assert bob.run("PUBLISH", "news", "hi") == [Reply(1)]
    assert bob.run("SPUBLISH", "s", "x") == [Reply(0)]
    assert alice.frames == [("message", b"news", b"hi")]
    assert node.written(node.publisher) == (
        command(b"PUBLISH", b"pubsub:news", NODE + b" hi")
        + command(b"SPUBLISH", b"pubsub:s", NODE + b" x")
    )
    assert node.bridge.sent == 2


def test_messages_from_redis_reach_the_matching_local_subscribers_once():
    node = Node()
    node.connect_both()
    channel, pattern = Client(node.engine), Client(node.engine)
    channel.run("SUBSCRIBE", "a")
    pattern.run("PSUBSCRIBE", "a*")
    channel.run("SSUBSCRIBE", "s")
    # One publish elsewhere on "a" comes as a message and a pmessage; our
    # own publishes come back too and are dropped (delivered already).
    node.subscriber.dataReceived(
        b"*3\r\n$9\r\nsubscribe\r\n$8\r\npubsub:a\r\n:1\r\n"
        + _push(b"message", b"pubsub:a", OTHER + b" hello")
        + _push(b"pmessage", b"pubsub:a*", b"pubsub:a", OTHER + b" hello")
        + _push(b"message", b"pubsub:a", NODE + b" mine")
        + _push(b"pmessage", b"pubsub:a*", b"pubsub:a", NODE + b" mine")
        + _push(b"smessage", b"pubsub:s", OTHER + b" shard")
        + _push(b"message", b"pubsub:a", b"not from a node")
    )
    assert channel.frames == [("message", b"a", b"hello"), ("smessage", b"s", b"shard")]
    assert pattern.frames == [("pmessage", b"a*", b"a", b"hello")]
    assert node.bridge.received == 3


def _push(*items: bytes) -> bytes:
    return command(*items)


def test_state_follows_both_connections_and_the_resubscribe():
    node = Node()
    bridge = node.bridge
    assert bridge.state == "connecting"
    node.connect("publisher")
    subscriber = node.connect("subscriber")
    assert bridge.state == "connecting"  # Redis has not confirmed the subscriptions yet
    subscriber.dataReceived(b"+PONG\r\n")
    assert (bridge.state, bridge.since) == ("connected", 0)
    node.clock.advance(7)
    node.publisher.connectionLost(Failure(ConnectionRefusedError()))
    assert (bridge.state, bridge.since) == ("down", 7)
    assert bridge.health()["state"] == "down"
    assert bridge.health()["url"] == "redis://redis.example:6390/"


def test_while_down_a_publish_reaches_this_node_and_answers_the_backplane_error():
    node = Node()
    node.connect_both()
    alice, bob = Client(node.engine), Client(node.engine)
    alice.run("SUBSCRIBE", "news")
    node.subscriber.connectionLost(Failure(ConnectionRefusedError()))
    [error] = bob.run("PUBLISH", "news", "hi")
    assert error == Error(
        "BACKPLANE redis://redis.example:6390/ is down: delivered to 1 local subscriber only"
    )
    assert error_kind(error.message) == "backplane"
    assert alice.frames == [("message", b"news", b"hi")]
    assert node.written(node.publisher) == b""
    assert (node.bridge.failed, node.bridge.sent) == (1, 0)
    [error] = bob.run("SPUBLISH", "s", "x")
    assert "delivered to 0 local subscribers only" in error.message


def test_a_reconnect_resubscribes_everything_in_batches_then_pings():
    node = Node()
    node.connect_both()
    client = Client(node.engine)
    channels = [b"c%d" % n for n in range(RESUBSCRIBE_BATCH + 3)]
    client.run("SUBSCRIBE", *channels)
    client.run("PSUBSCRIBE", "p*")
    client.run("UNSUBSCRIBE", "c0")
    node.subscriber.connectionLost(Failure(ConnectionRefusedError()))
    client.run("SSUBSCRIBE", "s")  # while down: remembered for the reconnect
    subscriber = node.connect("subscriber")
    sent = _commands(node.written(subscriber))
    subscribes = [c for c in sent if c[0] == b"SUBSCRIBE"]
    assert [len(c) - 1 for c in subscribes] == [RESUBSCRIBE_BATCH, 2]
    assert sorted(name for c in subscribes for name in c[1:]) == sorted(
        b"pubsub:" + c for c in channels[1:]
    )
    assert [b"PSUBSCRIBE", b"pubsub:p*"] in sent
    assert [b"SSUBSCRIBE", b"pubsub:s"] in sent
    assert sent[-1] == [b"PING"]
    assert node.bridge.state == "down"
    subscriber.dataReceived(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    assert (node.bridge.state, node.bridge.reconnects) == ("connected", 1)


def _commands(data: bytes) -> list[list[bytes]]:
    import hiredis

    reader = hiredis.Reader()
    reader.feed(data)
    out = []
    while (item := reader.gets()) is not False:
        out.append(item)
    return out


def test_a_password_in_the_url_is_sent_with_auth_and_never_shown():
    node = Node(password="s3cret")
    connection = node.connect("publisher")
    assert node.written(connection) == command(b"AUTH", b"s3cret")
    assert "s3cret" not in node.bridge.url
    user = parse_url("redis://ops:pw@10.0.0.1/")
    assert (user.username, user.password, user.port, user.display) == (
        "ops",
        "pw",
        6379,
        "redis://ops@10.0.0.1:6379/",
    )


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://host:1/", "must start with redis://"),
        ("redis://:6379/", "no host"),
        ("redis://host:notaport/", "bad port"),
    ],
)
def test_a_bad_url_is_refused_with_the_reason(url, message):
    with pytest.raises(ValueError, match=message):
        parse_url(url)


def test_glob_characters_of_the_prefix_are_escaped():
    assert escape_glob(b"a*b?[c]\\") == b"a\\*b\\?\\[c\\]\\\\"


def test_backoff_doubles_up_to_the_limit_with_jitter():
    low = backoff(5.0, jitter=lambda: 0.0)
    high = backoff(5.0, jitter=lambda: 1.0)
    assert [low(n) for n in range(1, 9)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5]
    assert [high(n) for n in range(1, 9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert high(10_000) == 5.0


class FlakyEndpoint:
    """Refuses the first ``failures`` connection attempts, then connects."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0

    def connect(self, factory: Any) -> defer.Deferred:
        self.attempts += 1
        if self.attempts <= self.failures:
            return defer.fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return defer.succeed(protocol)


def test_the_service_retries_with_backoff_until_redis_answers():
    clock, engine = Clock(), Engine()
    endpoint = FlakyEndpoint(failures=6)  # three attempts of each connection
    bridge = RedisBackplane(
        engine, "redis://127.0.0.1:1/", clock=clock, max_delay=1.0, endpoint=endpoint
    )
    bridge.startService()
    assert endpoint.attempts == 2
    clock.advance(0.1)
    assert endpoint.attempts == 4
    clock.advance(0.2)
    assert endpoint.attempts == 6
    assert bridge.state == "connecting"
    clock.advance(0.4)
    assert endpoint.attempts == 8
    bridge._subscriber.dataReceived(b"+PONG\r\n")
    assert bridge.state == "connected"
    bridge.stopService()


def test_redis_refusing_everything_keeps_the_node_down_and_logs_once():
    from twisted.logger import globalLogPublisher

    logged: list = []
    globalLogPublisher.addObserver(logged.append)
    try:
        node = Node(password="wrong")
        node.connect("publisher")
        subscriber = node.connect("subscriber")
        refusal = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        subscriber.dataReceived(refusal + b"-NOAUTH Authentication required.\r\n")
        node.publisher.dataReceived(refusal + b"-NOAUTH Authentication required.\r\n" * 3)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert node.bridge.state == "connecting"  # the PING after the subscribes never passed
    errors = [event for event in logged if event.get("log_namespace") == "pubsub.backplane.redis"]
    assert [(e["role"], e["error"]) for e in errors] == [
        ("subscriber", "WRONGPASS invalid username-password pair or user is disabled."),
        ("publisher", "WRONGPASS invalid username-password pair or user is disabled."),
    ]


def test_a_redis_that_falls_behind_gets_a_bounded_queue_then_refusals():
    node = Node()
    node.bridge.buffer_limit = 200
    node.connect_both()
    alice, bob = Client(node.engine), Client(node.engine)
    alice.run("SUBSCRIBE", "news")
    publisher = node.publisher
    assert publisher.transport.producer is publisher
    publisher.pauseProducing()  # the transport's buffer is full
    assert bob.run("PUBLISH", "news", "x" * 100) == [Reply(1)]  # 136 bytes queued
    [error] = bob.run("PUBLISH", "news", "y" * 100)
    assert error == Error(
        "BACKPLANE redis://redis.example:6390/ is behind: delivered to 1 local subscriber only"
    )
    assert [frame[2][:1] for frame in alice.frames] == [b"x", b"y"]
    assert (node.bridge.sent, node.bridge.failed) == (1, 1)
    publisher.resumeProducing()  # drained
    assert bob.run("PUBLISH", "news", "z" * 100) == [Reply(1)]
    assert node.bridge.sent == 2


# -- the health check: a silent link is noticed -------------------------------------------

PONG = b"+PONG\r\n"
SUBSCRIBED_PONG = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"  # PING's answer in subscribed mode


def _backplane_log() -> tuple[list, Any]:
    """Collects the bridge's log events; call the second item to stop."""
    from twisted.logger import globalLogPublisher

    logged: list = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "pubsub.backplane.redis":
            logged.append(event)

    globalLogPublisher.addObserver(observe)
    return logged, lambda: globalLogPublisher.removeObserver(observe)


def _warnings(logged: list) -> list[str]:
    from twisted.logger import LogLevel, formatEvent

    return [formatEvent(e) for e in logged if e["log_level"] == LogLevel.warn]


def _tick(node: Node, *, publisher: bytes | None = PONG, subscriber: bytes | None = None) -> None:
    """One second on the clock, then Redis answers each connection's PING
    with the given bytes (None: it stays silent)."""
    node.clock.advance(1.0)
    if publisher is not None:
        node.publisher.dataReceived(publisher)
    if subscriber is not None:
        node.subscriber.dataReceived(subscriber)


def test_both_connections_are_pinged_every_interval_and_answers_keep_the_link():
    node = Node()
    node.connect_both()
    client = Client(node.engine)
    client.run("SUBSCRIBE", "news")
    node.written(node.publisher)
    node.written(node.subscriber)
    for _ in range(20):  # far longer than the timeout, every PING answered in time
        node.clock.advance(1.0)
        assert node.written(node.publisher) == command(b"PING")
        assert node.written(node.subscriber) == command(b"PING")
        node.publisher.dataReceived(PONG)
        node.subscriber.dataReceived(SUBSCRIBED_PONG)
    assert (node.bridge.state, node.bridge.timeouts) == ("connected", 0)
    assert not node.publisher.transport.disconnecting
    assert not node.subscriber.transport.disconnecting


def test_slow_answers_within_the_timeout_keep_the_link():
    node = Node()
    node.connect_both()
    # Redis answers each PING 2.5 s late: always something outstanding, never 3 s.
    for second in range(1, 30):
        node.clock.advance(1.0)
        if second >= 3:
            node.publisher.dataReceived(PONG)
            node.subscriber.dataReceived(SUBSCRIBED_PONG)
    assert (node.bridge.state, node.bridge.timeouts) == ("connected", 0)


def test_a_silent_subscriber_connection_is_closed_and_the_node_is_down():
    node = Node()
    node.connect_both()
    alice, bob = Client(node.engine), Client(node.engine)
    alice.run("SUBSCRIBE", "news")
    logged, stop = _backplane_log()
    try:
        for _ in range(3):  # PINGs at 1, 2 and 3 s go unanswered; 3 s is not yet too long
            _tick(node)
        assert node.bridge.state == "connected"
        assert bob.run("PUBLISH", "news", "in the window") == [Reply(1)]
        _tick(node)  # 4 s: the PING of 1 s has waited 3 s
        subscriber = node.subscriber
        assert subscriber.transport.disconnected  # aborted: no FIN into a dead link
        assert (node.bridge.state, node.bridge.since, node.bridge.timeouts) == ("down", 4, 1)
        [error] = bob.run("PUBLISH", "news", "while down")
        assert error == Error(
            "BACKPLANE redis://redis.example:6390/ is down: delivered to 1 local subscriber only"
        )
        assert alice.frames[-1] == ("message", b"news", b"while down")
        # The transport reports the loss later; that says nothing more.
        subscriber.connectionLost(Failure(ConnectionAborted()))
        assert (node.bridge.state, node.bridge.since) == ("down", 4)
        node.written(subscriber)
        for _ in range(10):
            _tick(node)
        assert node.written(subscriber) == b""  # no more PINGs on the dead one
    finally:
        stop()
    assert _warnings(logged) == [
        (
            "backplane: redis://redis.example:6390/ did not answer the subscriber for 3.0 s; "
            "closing the connection and reconnecting"
        )
    ]


def test_a_publish_left_without_a_reply_closes_the_publisher_connection():
    node = Node()
    node.connect_both()
    alice, bob = Client(node.engine), Client(node.engine)
    alice.run("SUBSCRIBE", "news")
    node.written(node.publisher)
    _tick(node, subscriber=SUBSCRIBED_PONG)
    node.clock.advance(0.5)
    assert bob.run("PUBLISH", "news", "into the void") == [Reply(1)]
    assert node.written(node.publisher) == command(b"PING") + command(
        b"PUBLISH", b"pubsub:news", NODE + b" into the void"
    )
    logged, stop = _backplane_log()
    try:
        node.clock.advance(0.5)  # 2 s: a PING after the publish; Redis answers nothing more
        node.subscriber.dataReceived(SUBSCRIBED_PONG)
        for _ in range(2):
            _tick(node, publisher=None, subscriber=SUBSCRIBED_PONG)
        assert node.bridge.state == "connected"  # the publish has waited 2.5 s
        _tick(node, publisher=None, subscriber=SUBSCRIBED_PONG)  # 5 s
    finally:
        stop()
    assert node.publisher.transport.disconnected
    assert (node.bridge.state, node.bridge.timeouts) == ("down", 1)
    [error] = bob.run("PUBLISH", "news", "refused")
    assert error.message.startswith("BACKPLANE redis://redis.example:6390/ is down")
    assert node.bridge.failed == 1
    [warning] = _warnings(logged)
    assert "did not answer the publisher for 3.0 s" in warning


def test_late_replies_to_publishes_count_in_order_with_the_pings():
    node = Node()
    node.connect_both()
    bob = Client(node.engine)
    for second in range(1, 40):
        bob.run("PUBLISH", "news", str(second))
        node.clock.advance(1.0)
        node.subscriber.dataReceived(SUBSCRIBED_PONG)
        if second >= 2:  # Redis answers two seconds late: the publish, then the PING
            node.publisher.dataReceived(b":0\r\n" + PONG)
    assert (node.bridge.state, node.bridge.timeouts) == ("connected", 0)


def test_a_refusing_redis_still_answers_and_is_not_timed_out():
    node = Node(password="wrong")
    node.connect("publisher")
    subscriber = node.connect("subscriber")
    refusal = b"-NOAUTH Authentication required.\r\n"
    subscriber.dataReceived(refusal * 2)  # AUTH and the readiness PING
    for _ in range(10):
        node.clock.advance(1.0)
        subscriber.dataReceived(refusal)
        node.publisher.dataReceived(refusal)
    assert (node.bridge.state, node.bridge.timeouts) == ("connecting", 0)


def test_no_verdict_on_redis_from_a_tick_that_comes_late():
    node = Node()
    node.connect_both()
    node.clock.advance(1.0)  # a PING on each connection
    # The process was stalled for 10 s: the reactor runs the overdue tick
    # before it reads what came meanwhile, so the tick does not judge.
    node.clock.advance(10.0)
    assert (node.bridge.state, node.bridge.timeouts) == ("connected", 0)
    node.publisher.dataReceived(PONG * 2)
    node.subscriber.dataReceived(SUBSCRIBED_PONG * 2)
    _tick(node, subscriber=SUBSCRIBED_PONG)
    assert (node.bridge.state, node.bridge.timeouts) == ("connected", 0)
    for _ in range(4):  # a Redis that then stays silent is judged on time, as usual
        _tick(node, publisher=None)
    assert (node.bridge.state, node.bridge.timeouts) == ("down", 2)


def test_a_timeout_of_zero_sends_no_pings_and_closes_nothing():
    node = Node(timeout=0)
    node.connect_both()
    node.written(node.publisher)
    node.written(node.subscriber)
    for _ in range(100):
        node.clock.advance(1.0)
    assert node.written(node.publisher) == node.written(node.subscriber) == b""
    assert (node.bridge.state, node.bridge.timeouts) == ("connected", 0)


class AbortableTransport(StringTransport):
    """A StringTransport whose abortConnection reports the loss on the next
    turn of the clock, as a TCP transport does."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def abortConnection(self) -> None:
        super().abortConnection()
        self.clock.callLater(0, self.protocol.connectionLost, Failure(ConnectionAborted()))


class ReconnectingEndpoint:
    """Connects every time, with a transport that can be aborted."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.connections: list[_Connection] = []

    def connect(self, factory: Any) -> defer.Deferred:
        protocol = factory.buildProtocol(None)
        transport = AbortableTransport(self.clock)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.connections.append(protocol)
        return defer.succeed(protocol)


def test_after_a_timeout_the_service_reconnects_resubscribes_and_is_connected_again():
    clock, engine = Clock(), Engine()
    endpoint = ReconnectingEndpoint(clock)
    bridge = RedisBackplane(
        engine,
        "redis://127.0.0.1:1/",
        clock=clock,
        endpoint=endpoint,
        node_id=NODE,
        ping_interval=1.0,
        timeout=3.0,
    )
    client = Client(engine)
    client.run("SUBSCRIBE", "news")
    bridge.startService()
    subscriber, publisher = endpoint.connections
    subscriber.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$11\r\npubsub:news\r\n:1\r\n" + PONG)
    assert bridge.state == "connected"
    for _ in range(3):
        clock.advance(1.0)
        publisher.dataReceived(PONG)  # only the subscriber's link is silent
    clock.advance(1.0)
    assert (bridge.state, bridge.timeouts) == ("down", 1)
    clock.advance(0)  # the transport reports the abort
    clock.advance(0.1)  # the first retry of the backoff
    assert len(endpoint.connections) == 3
    fresh = endpoint.connections[2]
    assert fresh.role == "subscriber"
    assert _commands(fresh.transport.value()) == [[b"SUBSCRIBE", b"pubsub:news"], [b"PING"]]
    assert bridge.state == "down"
    fresh.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$11\r\npubsub:news\r\n:1\r\n")
    fresh.dataReceived(SUBSCRIBED_PONG)
    assert (bridge.state, bridge.reconnects) == ("connected", 1)
    fresh.transport.clear()
    clock.advance(1.0)
    assert fresh.transport.value() == command(b"PING")  # the new link is checked in turn
    bridge.stopService()


class KeepAliveTransport(StringTransport):
    """A StringTransport with a TCP transport's keepalive switch and socket."""

    def __init__(self) -> None:
        super().__init__()
        self.keepalive: bool | None = None
        self.socket = socket.socket()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepalive = enabled

    def getHandle(self) -> socket.socket:
        return self.socket


def test_both_connections_turn_tcp_keepalive_on_with_short_probes():
    node = Node()
    for role in ("publisher", "subscriber"):
        connection = _Connection(node.bridge, role)
        transport = KeepAliveTransport()
        try:
            connection.makeConnection(transport)
            assert transport.keepalive is True
            for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, name):
                    option = getattr(socket, name)
                    assert transport.socket.getsockopt(socket.IPPROTO_TCP, option) == value
        finally:
            transport.socket.close()


def test_metrics_count_the_links_closed_for_silence():
    from pubsub.operations.metrics import _backplane_figures

    node = Node()
    node.connect_both()
    for _ in range(4):
        _tick(node, publisher=None, subscriber=None)
    figures = {family.name: family for family in _backplane_figures(node.bridge)}
    [sample] = [
        s for s in figures["pubsub_backplane_timeouts"].samples if s.name.endswith("_total")
    ]
    assert sample.value == 2  # both connections
    [down] = [s for s in figures["pubsub_backplane_state"].samples if s.labels["state"] == "down"]
    assert down.value == 1


# -- TLS: rediss:// ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("rediss://10.0.0.5/", ("10.0.0.5", 6379, None, None, True, "rediss://10.0.0.5:6379/")),
        (
            "rediss://ops:s3cret@redis.example:6380/0",
            ("redis.example", 6380, "ops", "s3cret", True, "rediss://ops@redis.example:6380/"),
        ),
        (
            "rediss://:s3cret@[::1]:6390",
            ("::1", 6390, None, "s3cret", True, "rediss://[::1]:6390/"),
        ),
        ("redis://10.0.0.5/", ("10.0.0.5", 6379, None, None, False, "redis://10.0.0.5:6379/")),
    ],
)
def test_a_rediss_url_is_tls_and_shows_its_scheme_without_the_password(url, expected):
    target = parse_url(url)
    assert (
        target.host,
        target.port,
        target.username,
        target.password,
        target.tls,
        target.display,
    ) == expected


def test_tls_settings_need_a_rediss_url():
    from twisted.internet.ssl import platformTrust

    with pytest.raises(ValueError, match="need a rediss:// URL"):
        RedisBackplane(Engine(), "redis://127.0.0.1:6379/", trust_root=platformTrust())


def _first_bytes(url: str) -> bytes:
    """What the endpoint the bridge builds for ``url`` sends first on a new connection."""
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    bridge = RedisBackplane(Engine(), url, clock=reactor, node_id=NODE)
    bridge.build_endpoint(reactor).connect(_ConnectionFactory(bridge, "subscriber"))
    reactor.advance(0)
    [(host, port, factory, _, _)] = reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 6380)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport.value()


def test_the_endpoint_for_rediss_wraps_the_connection_in_tls():
    # A TLS handshake record (0x16), a ClientHello (0x01) before any command.
    hello = _first_bytes("rediss://127.0.0.1:6380/")
    assert hello[:1] == b"\x16" and hello[5:6] == b"\x01"
    assert b"PING" not in hello and b"SUBSCRIBE" not in hello
    # Plain redis:// sends the commands themselves.
    assert _first_bytes("redis://127.0.0.1:6380/") == command(b"PING")


def _tls_error(reason: str) -> Failure:
    from OpenSSL.SSL import Error

    return Failure(Error([("SSL routines", "", reason)]))


def test_a_tls_failure_is_logged_once_per_streak_and_retried_with_the_backoff():
    clock, engine = Clock(), Engine()
    endpoint = ReconnectingEndpoint(clock)
    bridge = RedisBackplane(
        engine,
        "rediss://127.0.0.1:6380/",
        clock=clock,
        endpoint=endpoint,
        node_id=NODE,
        timeout=0,  # no health check: only the TLS failures close connections here
    )
    logged, stop = _backplane_log()
    bridge.startService()
    try:
        waits = []
        for _ in range(6):
            # Both connections fail their handshake before Redis says a word.
            for connection in endpoint.connections[-2:]:
                connection.connectionLost(_tls_error("certificate verify failed"))
            assert bridge.state == "connecting"
            before, waited = len(endpoint.connections), 0.0
            while len(endpoint.connections) < before + 2:
                clock.advance(0.01)
                waited += 0.01
            waits.append(waited)
        # The backoff grows as for failed connects (jitter: 0.5 to 1 of each step),
        # rather than starting again at 0.1 s after every TCP connection.
        for n, waited in enumerate(waits):
            step = 0.1 * 2**n
            assert step / 2 - 0.02 <= waited <= step + 0.02, waits
        errors = [e for e in logged if e["log_level"].name == "error"]
        assert len(errors) == 1  # once for the streak, both connections, every retry
        assert errors[0]["url"] == "rediss://127.0.0.1:6380/"
        assert errors[0]["reason"] == "certificate verify failed"
        # A different reason is news.
        endpoint.connections[-1].connectionLost(_tls_error("tlsv13 alert certificate required"))
        assert [e["reason"] for e in logged if e["log_level"].name == "error"] == [
            "certificate verify failed",
            "tlsv13 alert certificate required",
        ]
        clock.advance(5.0)
        # Once connected, a later failure starts a new streak: logged, quick retry.
        latest = {connection.role: connection for connection in endpoint.connections}
        subscriber, publisher = latest["subscriber"], latest["publisher"]
        subscriber.dataReceived(PONG)
        publisher.dataReceived(PONG)
        assert bridge.state == "connected"
        subscriber.connectionLost(_tls_error("tlsv13 alert certificate required"))
        assert len([e for e in logged if e["log_level"].name == "error"]) == 3
        before = len(endpoint.connections)
        clock.advance(0.1)
        assert len(endpoint.connections) == before + 1
    finally:
        stop()
        bridge.stopService()


def test_a_certificate_for_another_host_is_a_tls_failure_that_says_so():
    from service_identity import VerificationError
    from service_identity.hazmat import DNS_ID, DNSMismatch

    node = Node()
    logged, stop = _backplane_log()
    try:
        connection = node.connect("subscriber")
        mismatch = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("redis.example"))])
        connection.connectionLost(Failure(mismatch))
        # Not TLS: the ordinary loss, no TLS line.
        node.connect("publisher").connectionLost(Failure(ConnectionRefusedError()))
    finally:
        stop()
    [error] = [e for e in logged if e["log_level"].name == "error"]
    assert error["reason"].startswith("Redis's certificate is not for this host (DNSMismatch")


# -- the history in Redis (pubsub.backplane.history) ---------------------------------------


def _with_history(node: Node, size: int = 10) -> RedisHistory:
    history = RedisHistory(node.bridge, [b"chat.*"], size=size, ttl=60)
    node.engine.history = history
    return history


def _array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(b"$%d\r\n%s\r\n" % (len(i), i) for i in items)


def test_a_kept_channels_publish_runs_the_script_and_reaches_subscribers_back_from_redis():
    node = Node()
    _with_history(node, size=10)
    node.connect_both()
    preamble = node.written(node.publisher)
    assert preamble == command(b"SCRIPT", b"LOAD", PUBLISH_SCRIPT) + command(
        b"SCRIPT", b"LOAD", READ_SCRIPT
    )
    alice, pattern = Client(node.engine), Client(node.engine)
    alice.run("SUBSCRIBE", "chat.1")
    pattern.run("PSUBSCRIBE", "chat.*")
    assert alice.run("PUBLISH", "chat.1", "hi") == [Reply(2)]  # who it will reach
    written = node.written(node.publisher)
    assert (
        written
        == command(
            b"EVALSHA",
            hashlib.sha1(PUBLISH_SCRIPT).hexdigest().encode(),
            b"2",
            b"pubsub:history:chat.1",
            b"pubsub:history-position:chat.1",
            b"pubsub:chat.1",
            b"hi",
            b"10",  # history_size
            b"60000",  # history_ttl, in ms
            NODE[:8] + b".1",  # an epoch, should the stream begin now
            b"86400000",
            NODE + b"@",
            b"PUBLISH",  # the commands that publish it
        )
    )
    assert alice.frames == [] and pattern.frames == []  # not before Redis has it
    node.subscriber.dataReceived(
        _push(b"message", b"pubsub:chat.1", NODE + b"@e1 7 hi")
        + _push(b"pmessage", b"pubsub:chat.*", b"pubsub:chat.1", NODE + b"@e1 7 hi")
        + _push(b"message", b"pubsub:chat.1", OTHER + b"@e1 8 there you are")
        + _push(b"message", b"pubsub:chat.1", OTHER + b"@e1 nine bad")
    )
    assert alice.frames == [
        ("message", b"chat.1", b"hi", Position("e1", 7)),
        ("message", b"chat.1", b"there you are", Position("e1", 8)),
    ]
    assert pattern.frames == [("pmessage", b"chat.*", b"chat.1", b"hi")]
    assert node.bridge.received == 1  # only another node's


def test_a_kept_channels_publish_while_the_backplane_is_down_is_delivered_here_only():
    node = Node()
    _with_history(node)
    alice = Client(node.engine)
    alice.run("SUBSCRIBE", "chat.1")
    assert alice.run("PUBLISH", "chat.1", "hi") == [
        Error(
            "BACKPLANE redis://redis.example:6390/ is connecting: delivered to 1 local subscriber only"
        )
    ]
    assert alice.frames == [("message", b"chat.1", b"hi")]
    assert node.bridge.failed == 1


def test_calls_and_barriers_fire_with_their_own_replies_and_fail_when_the_link_goes():
    node = Node()
    node.connect_both()
    bridge = node.bridge
    Client(node.engine).run("PUBLISH", "news", "x")  # a reply the call must not take
    answer, barrier = bridge.call(b"k", b"GET", b"k"), bridge.barrier(b"k")
    got: list = []
    answer.addCallback(got.append)
    barrier.addCallback(got.append)
    node.publisher.dataReceived(b":0\r\n")
    assert got == []
    node.publisher.dataReceived(b"$5\r\nvalue\r\n")
    node.subscriber.dataReceived(b"+PONG\r\n")
    assert got == [b"value", b"PONG"]
    refused = bridge.call(b"k", b"GET", b"k")
    node.publisher.dataReceived(b"-ERR wrong\r\n")
    assert "answered: ERR wrong" in str(_failure_of(refused, BackplaneDown))
    lost = bridge.call(b"k", b"GET", b"k")
    node.publisher.connectionLost(Failure(ConnectionAborted()))
    assert "lost the connection" in str(_failure_of(lost, BackplaneDown))
    assert "is down" in str(_failure_of(bridge.call(b"k", b"GET", b"k"), BackplaneDown))
    assert "is down" in str(_failure_of(bridge.barrier(b"k"), BackplaneDown))
    assert bridge.lost == 0  # the publish was answered; the calls were not publishes


def test_publishes_answered_with_an_error_or_not_at_all_are_counted_lost():
    node = Node()
    node.connect_both()
    bridge, alice = node.bridge, Client(node.engine)
    alice.run("PUBLISH", "news", "1")
    alice.run("PUBLISH", "news", "2")
    read = bridge.call(b"k", b"GET", b"k")
    alice.run("PUBLISH", "news", "3")
    node.clock.advance(bridge.ping_interval)  # a PING, unanswered
    alice.run("PUBLISH", "news", "4")
    alice.run("PUBLISH", "news", "5")
    node.publisher.dataReceived(b":0\r\n")
    # Refused by Redis: it reached no node.
    node.publisher.dataReceived(b"-OOM command not allowed when used memory > 'maxmemory'.\r\n")
    assert bridge.lost == 1
    # A call's error is the call's: not a publish lost.
    node.publisher.dataReceived(b"-ERR wrong\r\n")
    _failure_of(read, BackplaneDown)
    node.publisher.dataReceived(b":0\r\n")
    assert bridge.lost == 1
    # 4 and 5 were sent, never answered: Redis may have taken them or not.
    node.publisher.connectionLost(Failure(ConnectionAborted()))
    assert bridge.lost == 3


def _failure_of(deferred: defer.Deferred, kind: type) -> BaseException:
    failures: list = []
    deferred.addErrback(failures.append)
    [failure] = failures
    assert failure.check(kind), failure
    return failure.value


def test_noscript_loads_the_scripts_again():
    node = Node()
    _with_history(node)
    node.connect_both()
    loading = command(b"SCRIPT", b"LOAD", PUBLISH_SCRIPT) + command(b"SCRIPT", b"LOAD", READ_SCRIPT)
    assert node.written(node.publisher) == loading
    node.publisher.dataReceived(b"+sha1\r\n+sha2\r\n")
    Client(node.engine).run("PUBLISH", "chat.1", "hi")
    node.written(node.publisher)
    node.publisher.dataReceived(b"-NOSCRIPT No matching script.\r\n")
    assert node.written(node.publisher) == loading
    assert node.bridge.lost == 1  # that publish reached no node
    # A read answered NOSCRIPT loads them too; it was not a publish.
    node.publisher.dataReceived(b"+sha1\r\n+sha2\r\n")
    node.bridge.call(b"chat.1", b"EVALSHA", b"sha2", b"0").addErrback(lambda _: None)
    node.written(node.publisher)
    node.publisher.dataReceived(b"-NOSCRIPT No matching script.\r\n")
    assert node.written(node.publisher) == loading
    assert node.bridge.lost == 1


#: What the read script of chat.1's history is sent as.
_READ_CHAT_1 = command(
    b"EVALSHA",
    hashlib.sha1(READ_SCRIPT).hexdigest().encode(),
    b"2",
    b"pubsub:history:chat.1",
    b"pubsub:history-position:chat.1",
    b"60000",
)


def _read_reply(epoch: bytes, top: int, *messages: tuple[int, bytes]) -> bytes:
    items = [epoch, b"%d" % top]
    for offset, payload in messages:
        items += [b"%d" % offset, payload]
    return _array(*items)


@pytest.mark.parametrize(
    "asked, reply, expected",
    [
        # from the position: what came after it
        (
            Position("e", 1),
            _read_reply(b"e", 3, (1, b"a"), (2, b"b"), (3, b"c")),
            Recovery([(2, b"b"), (3, b"c")], Position("e", 3), True),
        ),
        # at the top: nothing missed, even with nothing kept
        (Position("e", 3), _read_reply(b"e", 3), Recovery([], Position("e", 3), True)),
        # trimmed: message 2 is gone
        (
            Position("e", 1),
            _read_reply(b"e", 5, (3, b"c"), (4, b"d"), (5, b"e")),
            Recovery([(3, b"c"), (4, b"d"), (5, b"e")], Position("e", 5), False),
        ),
        # another epoch
        (
            Position("old", 1),
            _read_reply(b"e", 1, (1, b"a")),
            Recovery([(1, b"a")], Position("e", 1), False),
        ),
        # no history at all: only from the start
        (Position("", 0), b"*0\r\n", Recovery([], None, True)),
        (Position("e", 4), b"*0\r\n", Recovery([], None, False)),
    ],
)
def test_since_reads_after_the_barrier_and_judges_as_a_nodes_own_history(asked, reply, expected):
    node = Node()
    history = _with_history(node)
    node.connect_both()
    node.written(node.publisher)
    node.written(node.subscriber)
    answer = history.since(b"chat.1", asked)
    assert node.written(node.subscriber) == command(b"PING")
    assert node.written(node.publisher) == b""  # not before Redis has the subscription
    node.subscriber.dataReceived(b"+PONG\r\n")
    assert node.written(node.publisher) == _READ_CHAT_1
    got: list = []
    answer.addCallback(got.append)
    node.publisher.dataReceived(b"+sha\r\n+sha\r\n")  # the preamble's, first
    assert got == []
    node.publisher.dataReceived(reply)
    # Not before what was published ahead of the read has come in on the
    # subscriber connection, which a second PING's answer proves.
    assert got == []
    assert node.written(node.subscriber) == command(b"PING")
    node.subscriber.dataReceived(b"+PONG\r\n")
    assert got == [expected]
    assert (history.recoveries, history.failed_recoveries) == (
        (1, 0) if expected.recovered else (0, 1)
    )


def test_since_and_recent_fail_as_history_unavailable_when_redis_is_not_there():
    node = Node()
    history = _with_history(node)
    failure = _failure_of(history.since(b"chat.1", Position("e", 1)), HistoryUnavailable)
    assert str(failure) == "redis://redis.example:6390/ is connecting"
    assert history.failed_recoveries == 1
    _failure_of(history.recent(b"chat.1", 5), HistoryUnavailable)
    assert history.failed_recoveries == 1  # HISTORY is not a recovery


def test_recent_is_the_last_messages_kept():
    node = Node()
    history = _with_history(node)
    node.connect_both()
    got: list = []
    history.recent(b"chat.1", 2).addCallback(got.append)
    history.recent(b"chat.1", 9).addCallback(got.append)
    node.written(node.publisher)
    reply = _read_reply(b"e", 3, (1, b"a"), (2, b"b"), (3, b"c"))
    node.publisher.dataReceived(b"+sha\r\n+sha\r\n" + reply + reply)  # the preamble's first
    assert got == [
        Recovery([(2, b"b"), (3, b"c")], Position("e", 3), True),
        Recovery([(1, b"a"), (2, b"b"), (3, b"c")], Position("e", 3), True),
    ]


# -- gaps: messages this node missed while its clients stayed ------------------------------


def _message(offset: int, payload: bytes, epoch: bytes = b"e1") -> bytes:
    return _push(b"message", b"pubsub:chat.1", OTHER + b"@%s %d %s" % (epoch, offset, payload))


def _gap_node() -> tuple[Node, RedisHistory, Client]:
    node = Node()
    history = _with_history(node)
    node.connect_both()
    node.publisher.dataReceived(b"+sha\r\n+sha\r\n")  # the preamble's
    alice = Client(node.engine)
    alice.run("SUBSCRIBE", "chat.1")
    node.written(node.publisher)
    return node, history, alice


def _offsets(client: Client) -> list[int]:
    return [frame[3].offset for frame in client.frames]


def test_a_gap_is_filled_from_the_history_before_the_next_messages():
    node, history, alice = _gap_node()
    node.subscriber.dataReceived(_message(1, b"a") + _message(2, b"b"))
    # 3 and 4 were missed (the link was lost a moment); 5 and 6 come on.
    node.subscriber.dataReceived(_message(5, b"e") + _message(6, b"f"))
    assert _offsets(alice) == [1, 2]  # held while the gap is read
    assert node.written(node.publisher) == _READ_CHAT_1
    messages = [(n, payload) for n, payload in zip(range(1, 8), b"abcdefg", strict=True)]
    node.publisher.dataReceived(_read_reply(b"e1", 7, *[(n, bytes([p])) for n, p in messages]))
    node.subscriber.dataReceived(_message(7, b"g") + _message(8, b"h"))  # 7: read, and live
    assert _offsets(alice) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [frame[2] for frame in alice.frames] == [bytes([c]) for c in b"abcdefgh"]
    assert (history.missed_filled, history.missed_lost) == (2, 0)


def test_what_the_history_no_longer_has_is_counted_lost_and_the_rest_goes_on():
    from twisted.logger import globalLogPublisher

    node, history, alice = _gap_node()
    logged: list = []
    globalLogPublisher.addObserver(logged.append)
    try:
        node.subscriber.dataReceived(_message(1, b"a") + _message(9, b"i"))
        reply = _read_reply(b"e1", 9, (6, b"f"), (7, b"g"), (8, b"h"), (9, b"i"))
        node.publisher.dataReceived(reply)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert _offsets(alice) == [1, 6, 7, 8, 9]  # 2 to 5 were trimmed
    assert (history.missed_filled, history.missed_lost) == (3, 4)
    [warning] = [e for e in logged if e["log_level"].name == "warn"]
    assert (warning["count"], warning["first"], warning["last"]) == (4, 2, 5)
    node.subscriber.dataReceived(_message(10, b"j"))
    assert _offsets(alice) == [1, 6, 7, 8, 9, 10]


def test_a_gap_whose_epoch_is_gone_delivers_what_comes_next():
    node, history, alice = _gap_node()
    node.subscriber.dataReceived(_message(1, b"a") + _message(4, b"d"))
    node.publisher.dataReceived(_read_reply(b"e2", 1, (1, b"x")))  # history lost since
    node.subscriber.dataReceived(_message(5, b"e"))
    assert _offsets(alice) == [1, 4, 5]
    assert (history.missed_filled, history.missed_lost) == (0, 2)


def test_a_gaps_read_waits_for_the_backplane_to_be_up_a_while():
    node, history, alice = _gap_node()
    node.subscriber.dataReceived(_message(1, b"a") + _message(3, b"c"))
    node.written(node.publisher)
    node.publisher.connectionLost(Failure(ConnectionAborted()))  # the read fails: down
    node.clock.advance(0.1)
    node.clock.advance(0.1)
    assert _offsets(alice) == [1]  # still held, read again and again
    new = node.connect("publisher")
    node.publisher = new
    new.dataReceived(b"+sha\r\n+sha\r\n")
    node.written(new)
    node.clock.advance(0.1)  # the next read: connected
    new.dataReceived(_read_reply(b"e1", 3, (1, b"a"), (2, b"b"), (3, b"c")))
    assert _offsets(alice) == [1, 2, 3]
    # Down for longer than hold_limit: what was held goes on, the gap counted.
    node.subscriber.dataReceived(_message(5, b"e"))
    new.connectionLost(Failure(ConnectionAborted()))
    node.clock.advance(history.hold_limit + 1)
    node.clock.advance(1)
    assert _offsets(alice) == [1, 2, 3, 5]
    assert (history.missed_filled, history.missed_lost) == (1, 1)


def test_no_gap_is_seen_across_a_time_without_subscribers():
    node, history, alice = _gap_node()
    node.subscriber.dataReceived(_message(1, b"a"))
    alice.run("UNSUBSCRIBE", "chat.1")
    bob = Client(node.engine)
    bob.run("SUBSCRIBE", "chat.1")
    node.written(node.publisher)
    node.subscriber.dataReceived(_message(7, b"g"))  # published while no one was here
    assert _offsets(bob) == [7]
    assert node.written(node.publisher) == b""  # nothing read
    assert (history.missed_filled, history.missed_lost) == (0, 0)


def test_a_resume_waits_for_a_gap_being_filled():
    node, history, alice = _gap_node()
    node.subscriber.dataReceived(_message(1, b"a"))
    node.written(node.subscriber)
    got: list = []
    history.since(b"chat.1", Position("e1", 1)).addCallback(got.append)
    node.subscriber.dataReceived(b"+PONG\r\n")  # the barrier: RESUME's read is sent
    # Then a message shows a gap: the fill's read goes after RESUME's.
    node.subscriber.dataReceived(_message(3, b"c"))
    assert node.written(node.publisher) == _READ_CHAT_1 + _READ_CHAT_1
    reply = _read_reply(b"e1", 3, (1, b"a"), (2, b"b"), (3, b"c"))
    node.publisher.dataReceived(reply)  # RESUME's
    node.subscriber.dataReceived(b"+PONG\r\n")  # its second barrier
    assert got == []  # not while the fill may still deliver 2 and 3
    node.publisher.dataReceived(reply)  # the fill's
    assert got == [Recovery([(2, b"b"), (3, b"c")], Position("e1", 3), True)]
    assert _offsets(alice) == [1, 2, 3]


def test_offsets_that_go_back_in_one_epoch_are_delivered_not_taken_for_a_gap():
    # Redis restarted from an older snapshot: it gives offsets again.
    node, history, alice = _gap_node()
    node.subscriber.dataReceived(_message(5, b"e") + _message(3, b"c2") + _message(4, b"d2"))
    assert _offsets(alice) == [5, 3, 4]
    assert node.written(node.publisher) == b""
    assert (history.missed_filled, history.missed_lost) == (0, 0)


def test_back_after_being_down_a_node_asks_each_channels_top_and_fills_what_it_missed():
    node, history, alice = _gap_node()
    node.subscriber.dataReceived(_message(1, b"a") + _message(2, b"b"))
    node.subscriber.connectionLost(Failure(ConnectionAborted()))
    assert node.bridge.state == "down"
    node.connect("subscriber").dataReceived(b"+PONG\r\n")  # back: no message since
    assert node.bridge.state == "connected"
    assert node.written(node.publisher) == command(
        b"HMGET", b"pubsub:history-position:chat.1", b"epoch", b"offset"
    )
    node.publisher.dataReceived(_array(b"e1", b"4"))  # 3 and 4 came meanwhile
    assert node.written(node.publisher) == _READ_CHAT_1
    reply = _read_reply(b"e1", 4, (1, b"a"), (2, b"b"), (3, b"c"), (4, b"d"))
    node.publisher.dataReceived(reply)
    assert _offsets(alice) == [1, 2, 3, 4]
    assert (history.missed_filled, history.missed_lost) == (2, 0)
    # Back again, nothing missed: the top is where this node is.
    node.subscriber.connectionLost(Failure(ConnectionAborted()))
    node.connect("subscriber").dataReceived(b"+PONG\r\n")
    node.written(node.publisher)
    node.publisher.dataReceived(_array(b"e1", b"4"))
    assert node.written(node.publisher) == b""
