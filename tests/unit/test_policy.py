"""The connection policies: origins, connections per address, publish rate, idle
clients and keepalive pings, alone and through both transports on a Clock."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from pubsub.core.engine import Engine
from pubsub.core.vocabulary import Kind
from pubsub.hosting import timers
from pubsub.hosting.timers import BatchedTimer, Deadlines
from pubsub.operations.config import Settings
from pubsub.policy.limits import (
    IdleTimer,
    OriginPolicy,
    PeerCounter,
    PublishLimit,
    TokenBucket,
)
from pubsub.policy.middleware import Client as MiddlewareClient
from pubsub.policy.middleware import Refused
from pubsub.resp.protocol import RespFactory
from pubsub.web.front import FrontFactory
from pubsub.web.site import PubSubResource
from tests.support import wsframes
from tests.support.wsframes import CLOSE, PING, PONG, TEXT, client_frame, close_code, command
from tests.unit.test_front import connect
from tests.unit.test_resp import Client
from tests.unit.test_websocket import Connection, Transport


@pytest.fixture
def make_resp(clock):
    return lambda **settings: RespFactory(Engine(), Settings(**settings), reactor=clock)


def closes(connection: Connection) -> list[tuple[int, str]]:
    """The close frames a connection sent, as (code, reason)."""
    return [
        (close_code(payload), payload[2:].decode())
        for opcode, payload in connection.frames()
        if opcode == CLOSE
    ]


# -- the policies on their own ------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, origin, allowed",
    [
        ("", "https://anything.example", True),
        ("https://app.example.com", None, True),  # not a browser
        ("https://app.example.com", "https://app.example.com", True),
        ("https://app.example.com", "https://app.example.com:443", True),
        ("https://app.example.com", "https://app.example.com:8443", False),
        ("https://app.example.com", "http://app.example.com", False),
        ("https://app.example.com", "https://evil.com", False),
        ("https://app.example.com", "https://app.example.com.evil.com", False),
        ("https://*.example.com", "https://a.b.example.com", True),
        ("https://*.example.com", "https://example.com.evil.net", False),
        ("https://*.example.com, http://localhost:*", "http://localhost:5173", True),
        ("https://app.example.com", "null", False),
        ("null, https://app.example.com", "null", True),
        ("https://app.example.com", "not a url", False),
        ("https://app.example.com", "https://app.example.com:99999", False),
    ],
)
def test_origin_policy(setting, origin, allowed):
    assert OriginPolicy(setting).allows(origin) is allowed


def test_token_bucket_refills_at_its_rate_up_to_its_burst(clock):
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.advance(100)  # never more than the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_publish_limit_refuses_past_the_rate_with_err_per_client(clock):
    limit = PublishLimit(rate=1.0, burst=1, clock=clock)
    alice, bob = MiddlewareClient("resp", 1, "a:1"), MiddlewareClient("websocket", 2, "b:2")
    assert limit.on_publish(alice, Kind.CHANNEL, b"a", b"x") is None
    with pytest.raises(Refused) as refused:
        limit.on_publish(alice, Kind.SHARD, b"a", b"x")
    assert refused.value.code == "ERR"
    assert str(refused.value).startswith(
        "publish rate limit exceeded: at most 1 publishes per second"
    )
    assert limit.on_publish(bob, Kind.CHANNEL, b"a", b"x") is None  # a bucket each
    assert limit.refused == 1
    clock.advance(1)
    assert limit.on_publish(alice, Kind.CHANNEL, b"a", b"x") is None


def test_only_well_formed_publishes_spend_a_token(make_resp):
    # The middlewares are asked once lookup and arity passed, about publishes only.
    client = resp_client(make_resp(publish_rate=1, publish_burst=1))
    assert client.call("PUBLISH", "a").startswith(b"-ERR wrong number")
    assert client.call("PING") == b"+PONG\r\n"
    assert client.call("PUBLISH", "a", "x") == b":0\r\n"
    assert client.call("PUBLISH", "a", "x").startswith(b"-ERR publish rate limit")


def test_publish_limit_off_and_its_default_burst(make_resp, clock):
    assert make_resp().chain is None  # no policy on: no chain at all
    assert make_resp(publish_rate=1).middleware is not None
    # A chain that only screens addresses has no say in commands.
    per_address = make_resp(max_connections_per_ip=5)
    assert per_address.chain is not None and per_address.middleware is None
    assert PublishLimit(50.0, 0, clock).burst == 50
    assert PublishLimit(0.5, 0, clock).burst == 1


def test_peer_counter_counts_per_address_and_releases():
    peers = PeerCounter(2)
    assert peers.acquire("10.0.0.1") and peers.acquire("10.0.0.1")
    assert not peers.acquire("10.0.0.1")
    assert peers.acquire("10.0.0.2")
    assert peers.refused == 1
    peers.release("10.0.0.1")
    assert peers.open_from("10.0.0.1") == 1
    assert peers.acquire("10.0.0.1")
    for _ in range(2):
        peers.release("10.0.0.1")
    assert peers.open_from("10.0.0.1") == 0
    assert PeerCounter(0).acquire("x")  # 0: no limit


def test_idle_timer_waits_for_silence_and_spares_the_exempt(clock):
    expired, exempt = [], [False]
    timer = IdleTimer(clock, 10, lambda: exempt[0], lambda: expired.append(clock.seconds()))
    clock.advance(6)
    timer.touch()
    clock.advance(6)  # 12 s since the start, 6 since the last activity
    assert expired == []
    exempt[0] = True
    clock.pump([1] * 10)
    assert expired == []  # a subscriber is never idle
    exempt[0] = False  # at 22 s; silent since it was last found exempt, at 16 s
    clock.pump([1] * 3)
    assert expired == []
    clock.advance(1)
    assert expired == [26.0]
    timer.cancel()


def test_deadlines_expire_each_item_on_time_on_one_timer(clock):
    expired = []
    deadlines = Deadlines(clock, 5, lambda item: expired.append((item, clock.seconds())))
    deadlines.add("a")
    clock.advance(1)
    deadlines.add("b")
    deadlines.add("c")
    clock.advance(1)
    deadlines.add("d")
    deadlines.discard("c")
    deadlines.discard("never added")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(3)
    assert expired == [("a", 5.0)]
    clock.advance(0.5)
    assert expired == [("a", 5.0)]
    clock.advance(0.5)
    assert expired == [("a", 5.0), ("b", 6.0)]
    deadlines.discard("d")
    clock.advance(10)
    assert expired == [("a", 5.0), ("b", 6.0)] and len(deadlines) == 0
    assert clock.getDelayedCalls() == []  # nothing left to wait for: no timer
    deadlines.add("e")
    clock.advance(5)
    assert expired[-1] == ("e", 21.0)


def test_batched_timer_runs_calls_on_time_on_one_reactor_timer_per_slot(clock):
    timer = BatchedTimer(clock, resolution=0.25)
    ran = []
    clock.advance(0.5)
    for delay in (1, 1.25, 1.125):  # due at 1.5, 1.75, 1.625: slots ending at 1.5 and 1.75
        timer.call_later(delay, lambda d=delay: ran.append((d, clock.seconds())))
    cancelled = timer.call_later(1.25, ran.append, "cancelled")
    with_args = timer.call_later(1.25, lambda *a: ran.append(a), "x", "y")
    assert len(clock.getDelayedCalls()) == 2
    cancelled.cancel()
    cancelled.cancel()  # twice is harmless
    clock.advance(0.9375)  # 1.4375: nothing runs before its slot ends
    assert ran == []
    clock.advance(0.0625)  # 1.5
    assert ran == [(1, 1.5)]
    clock.advance(0.25)  # 1.75
    assert sorted(map(str, ran[1:])) == ["('x', 'y')", "(1.125, 1.75)", "(1.25, 1.75)"]
    assert clock.getDelayedCalls() == []
    with_args.cancel()  # after it ran: nothing to do


def test_batched_timer_runs_a_crowd_in_chunks_and_survives_a_faulty_call(clock, monkeypatch):
    events = []
    monkeypatch.setattr(timers, "_log", Logger(observer=events.append))
    timer = BatchedTimer(clock, resolution=1, chunk=3)
    ran = []

    def faulty():
        raise RuntimeError("boom")

    for n in range(3):
        timer.call_later(1, ran.append, n)
    timer.call_later(1, faulty)
    for n in range(3, 5):
        timer.call_later(1, ran.append, n)
    next_turn = []
    schedule = clock.callLater
    monkeypatch.setattr(
        clock,
        "callLater",
        lambda delay, f, *a: next_turn.append((f, a)) if delay == 0 else schedule(delay, f, *a),
    )
    clock.advance(1)
    assert len(ran) + len(events) == 3  # one chunk this turn
    [(rest, args)] = next_turn
    rest(*args)  # the next reactor turn
    assert sorted(ran) == list(range(5))
    assert [type(e["log_failure"].value) for e in events] == [RuntimeError]
    assert clock.getDelayedCalls() == []


# -- WebSocket ------------------------------------------------------------------------------


def test_a_refused_origin_is_accepted_then_closed_with_1008_naming_it(make_factory):
    factory = make_factory(allowed_origins="https://app.example.com")
    refused = Connection(factory, extra="Origin: https://evil.example\r\n")
    assert refused.response.startswith(b"HTTP/1.1 101")
    assert closes(refused) == [(1008, "origin not allowed: https://evil.example")]
    assert factory.engine.client_count == 0
    assert factory.origins.refused == 1
    allowed = Connection(factory, extra="Origin: https://app.example.com\r\n")
    assert allowed.call("PING") == [["pong", ""]]
    no_origin = Connection(factory)
    assert no_origin.call("PING") == [["pong", ""]]
    assert factory.origins.refused == 1


def test_a_long_refused_origin_still_makes_a_valid_close_frame(make_factory):
    factory = make_factory(allowed_origins="https://app.example.com")
    refused = Connection(factory, extra=f"Origin: https://{'a' * 300}.example\r\n")
    [(code, reason)] = closes(refused)
    assert code == 1008 and reason.startswith("origin not allowed: https://aaa")
    assert len(reason.encode()) <= 123


def test_publishes_over_the_rate_get_an_error_and_are_not_delivered(make_factory, clock):
    factory = make_factory(publish_rate=1, publish_burst=2)
    subscriber, publisher = Connection(factory), Connection(factory)
    subscriber.call("SUBSCRIBE", "news")
    replies = [publisher.call("PUBLISH", "news", str(n)) for n in range(3)]
    assert replies[:2] == [[["reply", 1]], [["reply", 1]]]
    [[kind, message]] = replies[2]
    assert kind == "error" and message.startswith("ERR publish rate limit exceeded")
    assert publisher.call("SPUBLISH", "news", "s")[0][0] == "error"
    assert subscriber.messages() == [["message", "news", "0"], ["message", "news", "1"]]
    assert factory.publish_limit.refused == 2
    assert factory.errors["limit"] == 2
    clock.advance(1)
    assert publisher.call("PUBLISH", "news", "later") == [["reply", 1]]
    # Each client has its own bucket.
    assert subscriber.call("UNSUBSCRIBE") and Connection(factory).call("PUBLISH", "x", "y")


def test_an_idle_client_is_closed_with_1008_but_a_subscriber_is_not(make_factory, clock):
    factory = make_factory(idle_timeout=60, ping_interval=0)
    idle, busy, subscriber = Connection(factory), Connection(factory), Connection(factory)
    subscriber.call("SUBSCRIBE", "news")
    for _ in range(3):
        clock.advance(30)
        busy.call("PING")
    assert closes(idle) == [(1008, "idle for 60 s (idle_timeout)")]
    assert closes(busy) == [] and closes(subscriber) == []
    assert factory.idle_disconnects == 1
    clock.advance(60)
    assert closes(busy) == [(1008, "idle for 60 s (idle_timeout)")]
    assert closes(subscriber) == []


def test_a_websocket_ping_from_the_client_counts_as_activity(make_factory, clock):
    factory = make_factory(idle_timeout=10, ping_interval=0)
    client = Connection(factory)
    for _ in range(3):
        clock.advance(6)
        client.send(client_frame(b"hi", opcode=PING))
    assert client.frames() == [(PONG, b"hi")] * 3
    clock.advance(10)
    assert closes(client) == [(1008, "idle for 10 s (idle_timeout)")]


def test_the_server_pings_and_drops_a_client_that_never_answers(make_factory, clock):
    factory = make_factory(ping_interval=5, ping_timeout=3)
    client = Connection(factory)
    clock.advance(5.5)
    [(opcode, payload)] = client.frames()
    assert opcode == PING
    client.send(client_frame(payload, opcode=PONG))  # answered: no drop
    clock.advance(3.5)
    assert not client.transport.disconnecting
    clock.advance(2)
    assert [opcode for opcode, _ in client.frames()] == [PING]  # the next one
    clock.advance(3.5)  # ... is never answered
    assert client.transport.disconnecting
    assert factory.ping_timeouts == 1


def test_commands_read_by_the_lean_path_keep_a_client_alive_as_autobahn_does(make_factory, clock):
    # Autobahn counts any data frame as a sign of life while a pong is due;
    # frames the lean path reads must count the same.
    factory = make_factory(ping_interval=5, ping_timeout=3)
    client = Connection(factory)
    clock.advance(5.5)
    assert [opcode for opcode, _ in client.frames()] == [PING]
    client.send(command("PING", "still here"))
    clock.advance(3.5)
    assert not client.transport.disconnecting
    assert factory.ping_timeouts == 0
    assert json.loads(client.frames()[0][1]) == ["pong", "still here"]


def test_no_pings_when_the_interval_is_zero(make_factory, clock):
    client = Connection(make_factory(ping_interval=0))
    clock.advance(3600)
    assert client.frames() == []


# -- the front door: connections per address --------------------------------------------------


def front_for(factory, clock):
    site = Site(PubSubResource(factory, clock), timeout=factory.settings.open_handshake_timeout)
    return FrontFactory(site, clock)


def connect_from(front, host: str, *chunks: bytes) -> Transport:
    return connect(front, *chunks, host=host)


def test_the_front_refuses_connections_past_the_per_address_limit(make_factory, clock):
    factory = make_factory(max_connections_per_ip=2)
    front = front_for(factory, clock)
    first = connect_from(front, "10.0.0.1", wsframes.handshake())
    second = connect_from(front, "10.0.0.1", b"GET /healthz HTTP/1.1\r\n\r\n")
    assert first.value().startswith(b"HTTP/1.1 101")
    third = connect_from(front, "10.0.0.1")  # refused before it sends a byte
    assert third.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert third.value().endswith(b"max number of clients reached for this address\n")
    assert third.disconnecting
    other = connect_from(front, "10.0.0.2", wsframes.handshake())
    assert other.value().startswith(b"HTTP/1.1 101")
    assert factory.peers.refused == 1
    # The slot comes back when a connection ends, whatever served it.
    second.protocol.connectionLost(Failure(ConnectionDone()))
    assert factory.peers.open_from("10.0.0.1") == 1
    fourth = connect_from(front, "10.0.0.1", wsframes.handshake())
    assert fourth.value().startswith(b"HTTP/1.1 101")
    fourth.clear()
    fourth.protocol.dataReceived(command("PING"))  # the front passes frames on
    clock.advance(0)
    assert wsframes.parse_frames(fourth.value()) == [(TEXT, b'["pong",""]')]
    fourth.protocol.connectionLost(Failure(ConnectionDone()))
    first.protocol.connectionLost(Failure(ConnectionDone()))
    assert factory.peers.open_from("10.0.0.1") == 0
    assert factory.engine.client_count == 1  # "other" only


def test_an_upgrade_that_twisted_web_serves_still_gives_its_slot_back(make_factory, clock):
    # A percent-encoded path goes through twisted.web, where Autobahn's
    # resource takes the transport over from the HTTP channel.
    factory = make_factory(max_connections_per_ip=5)
    front = front_for(factory, clock)
    transport = connect_from(front, "10.0.0.1", wsframes.handshake("/%70ubsub"))
    assert transport.value().startswith(b"HTTP/1.1 101")
    assert factory.engine.client_count == 1
    assert factory.peers.open_from("10.0.0.1") == 1
    transport.clear()
    transport.protocol.dataReceived(command("PING"))
    clock.advance(0)
    assert wsframes.parse_frames(transport.value()) == [(TEXT, b'["pong",""]')]
    transport.protocol.connectionLost(Failure(ConnectionDone()))
    assert factory.peers.open_from("10.0.0.1") == 0
    assert factory.engine.client_count == 0


def test_without_a_per_address_limit_the_front_steps_aside(make_factory, clock):
    front = front_for(make_factory(), clock)
    transport = connect_from(front, "10.0.0.1", wsframes.handshake())
    assert type(transport.protocol).__name__ != "_Front"
    assert front.chain is None


# -- RESP -------------------------------------------------------------------------------------


def resp_client(factory, host="127.0.0.1") -> Client:
    client = Client.__new__(Client)
    client.factory, client.clock, client.transport = factory, factory.reactor, Transport()
    client.transport.peerAddr = IPv4Address("TCP", host, 50000)
    client.protocol = factory.buildProtocol(IPv4Address("TCP", host, 50000))
    client.protocol.makeConnection(client.transport)
    return client


def test_resp_refuses_connections_past_the_per_address_limit(make_resp):
    factory = make_resp(max_connections_per_ip=1)
    first = resp_client(factory)
    second = resp_client(factory)
    assert second.transport.value() == b"-ERR max number of clients reached for this address\r\n"
    assert second.closing
    assert resp_client(factory, "10.0.0.9").call("PING") == b"+PONG\r\n"
    first.lose()
    second.lose()  # refused: never counted, nothing to give back
    assert factory.peers.open_from("127.0.0.1") == 0
    assert resp_client(factory).call("PING") == b"+PONG\r\n"
    assert factory.peers.refused == 1


def test_resp_publishes_over_the_rate_get_an_error(make_resp, clock):
    factory = make_resp(publish_rate=10, publish_burst=1)
    client = resp_client(factory)
    assert client.call("PUBLISH", "a", "x") == b":0\r\n"
    reply = client.call("PUBLISH", "a", "x")
    assert reply.startswith(b"-ERR publish rate limit exceeded: at most 10 publishes per second")
    clock.advance(0.1)
    assert client.call("SPUBLISH", "a", "x") == b":0\r\n"
    assert factory.publish_limit.refused == 1
    assert factory.errors["limit"] == 1


def test_resp_idle_clients_are_closed_silently_but_subscribers_stay(make_resp, clock):
    factory = make_resp(idle_timeout=5)
    idle, subscriber = resp_client(factory), resp_client(factory)
    subscriber.call("SUBSCRIBE", "news")
    clock.advance(5)
    assert idle.closing and idle.output() == b""
    assert not subscriber.closing
    assert factory.idle_disconnects == 1
    idle.lose()
    subscriber.lose()
    clock.advance(60)  # no timer is left behind
    assert not clock.getDelayedCalls()


def test_a_refused_binary_frame_still_counts_as_activity(make_factory, clock):
    factory = make_factory(idle_timeout=10, ping_interval=0)
    client = Connection(factory)
    clock.advance(6)
    client.send(client_frame(b"\x00", opcode=wsframes.BINARY))
    assert client.messages()[0][0] == "error"
    clock.advance(6)
    assert closes(client) == []
    clock.advance(4)
    assert closes(client) == [(1008, "idle for 10 s (idle_timeout)")]
