"""The WebSocket server over real sockets on 127.0.0.1, with several Autobahn clients."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import Agent, readBody


def unregistered(server, count=1):
    """A Deferred that fires once the engine has dropped ``count`` more clients."""
    done = defer.Deferred()
    original = server.engine.unregister
    seen = []

    def watching(token):
        original(token)
        seen.append(token)
        if len(seen) == count and not done.called:
            done.callback(seen)

    server.engine.unregister = watching
    return done


@pytest_twisted.inlineCallbacks
def test_messages_cross_between_clients(server, connect):
    alice = yield connect(server.port)
    bob = yield connect(server.port)
    carol = yield connect(server.port)
    assert (yield alice.call("SUBSCRIBE", "news", "sport")) == [
        ["subscribe", "news", 1],
        ["subscribe", "sport", 2],
    ]
    assert (yield bob.call("SUBSCRIBE", "news")) == [["subscribe", "news", 1]]
    assert (yield carol.call("PUBLISH", "news", "hello")) == [["reply", 2]]
    assert (yield carol.call("PUBLISH", "sport", "goal")) == [["reply", 1]]
    assert (yield carol.call("PUBLISH", "weather", "rain")) == [["reply", 0]]
    assert (yield alice.drain()) == [["message", "news", "hello"], ["message", "sport", "goal"]]
    assert (yield bob.drain()) == [["message", "news", "hello"]]
    assert (yield carol.call("PUBSUB", "CHANNELS")) == [["reply", ["news", "sport"]]]
    assert (yield carol.call("PUBSUB", "NUMSUB", "news", "sport", "x")) == [
        ["reply", ["news", 2, "sport", 1, "x", 0]]
    ]


@pytest_twisted.inlineCallbacks
def test_pattern_deliveries_their_count_and_order(server, connect):
    subscriber = yield connect(server.port)
    publisher = yield connect(server.port)
    yield subscriber.call("PSUBSCRIBE", "news.*", "*", "news.?ports")
    yield subscriber.call("SUBSCRIBE", "news.sports")
    # One channel subscription and three matching patterns: four deliveries.
    assert (yield publisher.call("PUBLISH", "news.sports", "goal")) == [["reply", 4]]
    assert (yield subscriber.drain()) == [
        ["message", "news.sports", "goal"],
        ["pmessage", "*", "news.sports", "goal"],
        ["pmessage", "news.*", "news.sports", "goal"],
        ["pmessage", "news.?ports", "news.sports", "goal"],
    ]
    assert (yield publisher.call("PUBLISH", "weather", "sun")) == [["reply", 1]]
    assert (yield subscriber.drain()) == [["pmessage", "*", "weather", "sun"]]
    assert (yield publisher.call("PUBSUB", "NUMPAT")) == [["reply", 3]]


@pytest_twisted.inlineCallbacks
def test_subscribers_receive_in_subscription_age_order_and_publish_order(server, connect):
    subscribers = []
    for _ in range(4):
        subscriber = yield connect(server.port)
        subscribers.append(subscriber)
        yield subscriber.call("SUBSCRIBE", "ticks")
    publisher = yield connect(server.port)
    for n in range(50):
        publisher.send("PUBLISH", "ticks", str(n))
    yield publisher.drain()
    for subscriber in subscribers:
        assert (yield subscriber.drain()) == [["message", "ticks", str(n)] for n in range(50)]


@pytest_twisted.inlineCallbacks
def test_abrupt_disconnect_is_cleaned_up(server, connect):
    watcher = yield connect(server.port)
    doomed = yield connect(server.port)
    yield doomed.call("SUBSCRIBE", "news")
    yield doomed.call("PSUBSCRIBE", "n*")
    yield doomed.call("SSUBSCRIBE", "orders")
    assert (yield watcher.call("PUBSUB", "NUMSUB", "news")) == [["reply", ["news", 1]]]
    gone = unregistered(server)
    doomed.transport.abortConnection()  # no close frame: a vanished peer
    yield gone
    assert (yield watcher.call("PUBSUB", "NUMSUB", "news")) == [["reply", ["news", 0]]]
    assert (yield watcher.call("PUBSUB", "NUMPAT")) == [["reply", 0]]
    assert (yield watcher.call("PUBSUB", "SHARDNUMSUB", "orders")) == [["reply", ["orders", 0]]]
    assert (yield watcher.call("PUBLISH", "news", "anyone?")) == [["reply", 0]]
    assert server.engine.client_count == 1


@pytest_twisted.inlineCallbacks
def test_every_bad_input_gets_an_error_and_the_connection_stays_open(server, connect):
    client = yield connect(server.port)
    bad_frames = [
        b"not json",
        b"{}",
        b"[]",
        b"[1, 2]",
        b'["SUBSCRIBE", ["nested"]]',
        b'["PUBLISH", "c", {"base64": "%%%"}]',
        b'["NO-SUCH-COMMAND"]',
        b'["SUBSCRIBE"]',
        b'["PUBSUB", "NOPE"]',
    ]
    for frame in bad_frames:
        client.sendMessage(frame)
    client.sendMessage(b"\x00\xff", isBinary=True)
    frames = yield client.drain()
    assert [kind for kind, _ in frames] == ["error"] * (len(bad_frames) + 1)
    assert all(text.startswith("ERR ") for _, text in frames)
    assert (yield client.call("SUBSCRIBE", "still-here")) == [["subscribe", "still-here", 1]]


@pytest_twisted.inlineCallbacks
def test_a_flood_of_junk_does_not_disturb_other_clients(server, connect):
    flooder = yield connect(server.port)
    subscriber = yield connect(server.port)
    publisher = yield connect(server.port)
    yield subscriber.call("SUBSCRIBE", "c")
    for n in range(500):
        flooder.sendMessage(b"{junk")
        publisher.send("PUBLISH", "c", str(n))
    flood = yield flooder.drain()
    assert len(flood) == 500 and {kind for kind, _ in flood} == {"error"}
    assert (yield publisher.drain()) == [["reply", 1]] * 500
    assert (yield subscriber.drain()) == [["message", "c", str(n)] for n in range(500)]


@pytest_twisted.inlineCallbacks
def test_oversized_message_closes_with_1009_and_others_carry_on(make_server, connect):
    server = yield make_server(max_message_size=1024)
    big = yield connect(server.port)
    other = yield connect(server.port)
    gone = unregistered(server)
    big.send("PUBLISH", "c", "x" * 2000)
    _, code, reason = yield big.closed
    assert code == 1009
    assert "1024" in reason
    yield gone
    assert (yield other.call("PUBLISH", "c", "x" * 900)) == [["reply", 0]]


@pytest_twisted.inlineCallbacks
def test_subscription_limit(make_server, connect):
    server = yield make_server(max_subscriptions=3)
    client = yield connect(server.port)
    assert len((yield client.call("SUBSCRIBE", "a", "b"))) == 2
    [[kind, text]] = yield client.call("PSUBSCRIBE", "x*", "y*")
    assert kind == "error" and "subscription limit" in text and "3" in text
    assert (yield client.call("PSUBSCRIBE", "x*")) == [["psubscribe", "x*", 3]]
    assert (yield client.call("SUBSCRIBE", "a")) == [["subscribe", "a", 3]]


@pytest_twisted.inlineCallbacks
def test_connection_limit_refuses_with_503(make_server, connect):
    server = yield make_server(max_connections=2)
    first = yield connect(server.port)
    yield connect(server.port)
    with pytest.raises(ConnectionError, match="503|maximum number of connections"):
        yield connect(server.port)
    gone = unregistered(server)
    first.sendClose(1000)
    yield gone
    yield first.closed
    # A slot is free again.
    third = yield connect(server.port)
    assert (yield third.call("PING")) == [["pong", ""]]


@pytest_twisted.inlineCallbacks
def test_any_path_upgrades_and_the_subprotocol_is_offered(server, connect):
    client = yield connect(server.port, path="/some/where", protocols=["pubsub.json"])
    assert client.websocket_protocol_in_use == "pubsub.json"
    assert (yield client.call("PING", "hi")) == [["pong", "hi"]]


@pytest_twisted.inlineCallbacks
def test_healthz_and_the_info_page(server, connect):
    client = yield connect(server.port)
    yield client.call("SUBSCRIBE", "a", "b")
    yield client.call("PSUBSCRIBE", "p*")
    agent = Agent(reactor)
    response = yield agent.request(b"GET", b"http://127.0.0.1:%d/healthz" % server.port)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    health = json.loads((yield readBody(response)))
    assert health["status"] == "ok"
    assert (health["connections"], health["channels"], health["patterns"]) == (1, 2, 1)
    assert health["uptime"] >= 0
    response = yield agent.request(b"GET", b"http://127.0.0.1:%d/" % server.port)
    page = yield readBody(response)
    assert response.code == 200 and b"PubSubClient" in page
    response = yield agent.request(b"GET", b"http://127.0.0.1:%d/missing" % server.port)
    yield readBody(response)
    assert response.code == 404


@pytest_twisted.inlineCallbacks
def test_only_other_subprotocols_are_refused_with_a_reason(server, connect):
    with pytest.raises(ConnectionError, match="unsupported subprotocol"):
        yield connect(server.port, protocols=["mqtt"])


@pytest_twisted.inlineCallbacks
def test_head_of_the_info_page(server):
    response = yield Agent(reactor).request(b"HEAD", b"http://127.0.0.1:%d/" % server.port)
    assert response.code == 200
    assert int(response.headers.getRawHeaders(b"content-length")[0]) > 100


@pytest_twisted.inlineCallbacks
def test_a_reader_that_stops_is_cut_off_and_the_others_get_everything(make_server, connect):
    server = yield make_server(output_buffer_hard=1024 * 1024, output_buffer_soft=0)
    stalled = yield connect(server.port)
    healthy = yield connect(server.port)
    publisher = yield connect(server.port)
    yield stalled.call("SUBSCRIBE", "flood")
    yield healthy.call("SUBSCRIBE", "flood")
    gone = unregistered(server)
    stalled.transport.pauseProducing()  # the client stops reading its socket
    payloads = []
    received = []

    def publish_round():
        # 32 messages (512 KB), read by the healthy subscriber before the
        # next round, so only the stalled one can fall behind.
        assert len(payloads) < 16_000, "256 MB published and the stalled reader still served"
        for _ in range(32):
            payloads.append(f"{len(payloads):05d}" + "z" * 16_000)
            publisher.send("PUBLISH", "flood", payloads[-1])
        while len(received) < len(payloads):
            received.append((yield healthy.next_frame()))

    # How much the kernel buffers for the stalled reader varies by machine:
    # publish until it is cut off, then one round more, which must count the
    # healthy subscriber only.
    while not gone.called:
        yield from publish_round()
    yield from publish_round()
    assert server.factory.slow_consumers == 1
    assert received == [["message", "flood", p] for p in payloads]
    replies = yield publisher.drain()
    assert len(replies) == len(payloads)
    counts = [count for _, count in replies]
    assert counts == sorted(counts, reverse=True) and set(counts) == {2, 1}
    assert counts[-32:] == [1] * 32
    assert (yield publisher.call("PUBSUB", "NUMSUB", "flood")) == [["reply", ["flood", 1]]]
    stalled.transport.resumeProducing()
