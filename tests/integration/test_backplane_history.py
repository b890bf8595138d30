"""Recovery across nodes: the history lives in the backplane's Redis, shared.

Two nodes (in this process, each with its own engine, ports and backplane
connections) and a real redis-server.  A subscriber cut off from one node
comes back on the other and gets every message once and in order; every node
delivers a channel's messages in the order of its history, whoever published
them; and when Redis is down, or has lost or trimmed the history, the client
is told, never left with a silent gap.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor

from tests.integration.test_backplane import PREFIX, redis_answer, wait_for
from tests.integration.test_metrics import figure, scrape
from tests.integration.test_recovery import CHANNEL, Reader, SteadyPublisher
from tests.support.proxy import TcpProxy
from tests.support.respclient import connect as redis_connect

COUNT = 300


def url(redis) -> str:
    return f"redis://127.0.0.1:{redis.port}/"


@defer.inlineCallbacks
def come_back_on_either_node(connect, a, b):
    """A subscriber on node A is cut off three times while node B publishes
    COUNT messages, and comes back on B, A, then B: it gets every message
    once and in order, some of them replayed."""
    reader = Reader(connect, a.port)
    yield reader.join()
    publisher = SteadyPublisher((yield connect(b.port)), COUNT)
    for stop, back_on in ((40, b), (110, a), (200, b)):
        yield reader.read_until(stop)
        yield reader.cut()
        yield publisher.sent_more(5)  # missed while away
        reader._port = back_on.port
        yield reader.join()
    yield publisher.done
    yield reader.read_until(COUNT)
    assert reader.failures == []
    assert reader.payloads == [str(n) for n in range(COUNT)]
    assert reader.position["offset"] == COUNT
    assert reader.replayed > 0  # the cuts did miss messages


@pytest_twisted.inlineCallbacks
def test_a_subscriber_cut_off_comes_back_on_the_other_node_with_every_message_once_in_order(
    redis, make_node, connect
):
    a = yield make_node(url(redis), history_size=COUNT)
    b = yield make_node(url(redis), history_size=COUNT)
    yield come_back_on_either_node(connect, a, b)
    samples = yield scrape(b.port)
    assert figure(samples, "pubsub_recoveries_total", result="recovered") >= 1
    assert figure(samples, "pubsub_recoveries_total", result="failed") == 0
    assert ("pubsub_history_messages", ()) not in samples  # in Redis, not here


@pytest_twisted.inlineCallbacks
def test_every_node_delivers_a_channels_messages_in_the_order_of_its_history(
    redis, make_node, connect
):
    a = yield make_node(url(redis))
    b = yield make_node(url(redis))
    readers = yield defer.gatherResults([connect(node.port) for node in (a, b)])
    for reader in readers:
        assert (yield reader.call("RESUME", CHANNEL))[-1][0] == "position"
    publishers = yield defer.gatherResults([connect(node.port) for node in (a, b)])
    for n in range(100):  # both nodes at once, interleaved on the wire
        for name, publisher in zip("ab", publishers, strict=True):
            publisher.send("PUBLISH", CHANNEL, f"{name}{n}")
    seen = []
    for reader in readers:
        frames = yield defer.gatherResults([reader.next_frame() for _ in range(200)])
        seen.append([(frame[2], frame[3]["offset"]) for frame in frames])
    assert seen[0] == seen[1]  # the same order on both nodes
    assert [offset for _, offset in seen[0]] == list(range(1, 201))
    assert sorted(payload for payload, _ in seen[0]) == sorted(
        f"{name}{n}" for name in "ab" for n in range(100)
    )
    watcher = yield redis_connect(redis.port)
    try:
        stream = PREFIX + b"history:" + CHANNEL.encode()
        assert (yield redis_answer(watcher, "XLEN", stream)) == 100  # history_size
        assert 0 < (yield redis_answer(watcher, "PTTL", stream)) <= 300_000  # history_ttl
    finally:
        yield watcher.abort()


@pytest_twisted.inlineCallbacks
def test_a_history_lost_or_trimmed_in_redis_is_reported_not_silent(redis, make_node, connect):
    a = yield make_node(url(redis), history_size=5)
    b = yield make_node(url(redis), history_size=5)
    publisher = yield connect(a.port)
    for n in range(20):
        publisher.send("PUBLISH", CHANNEL, str(n))
    yield publisher.drain()
    reader = yield connect(b.port)
    history = yield reader.call("HISTORY", CHANNEL, "10")
    [[kind, channel, top, messages]] = history
    assert (kind, channel, top["offset"]) == ("history", CHANNEL, 20)
    assert messages == [[n + 1, str(n)] for n in range(15, 20)]
    frames = yield reader.call("RESUME", CHANNEL, top["epoch"], "3")
    assert frames[-1] == [
        "recovery_failed",
        CHANNEL,
        top,
        "messages after the position are no longer kept",
    ]
    watcher = yield redis_connect(redis.port)
    try:
        yield watcher.call("FLUSHALL")  # Redis lost it all (a restart without persistence)
    finally:
        yield watcher.abort()
    yield publisher.call("PUBLISH", CHANNEL, "new")
    again = yield connect(b.port)
    frames = yield again.call("RESUME", CHANNEL, top["epoch"], "20")
    [kind, channel, now, reason] = frames[-1]
    assert (kind, channel, now["offset"]) == ("recovery_failed", CHANNEL, 1)
    assert now["epoch"] != top["epoch"]
    assert reason == "the channel's history was lost since (its epoch changed)"


@pytest_twisted.inlineCallbacks
def test_redis_down_publishes_answer_the_backplane_error_and_recovery_fails(
    redis, make_node, connect
):
    a = yield make_node(url(redis))
    reader = yield connect(a.port)
    yield reader.call("RESUME", CHANNEL)
    publisher = yield connect(a.port)
    yield publisher.call("PUBLISH", CHANNEL, "before")
    [_, _, _, position] = yield reader.next_frame()  # once back from Redis
    redis.kill()
    backplane = a.resource.health.backplane
    yield wait_for(lambda: defer.succeed(backplane.state), "down", "the backplane")
    [[kind, text]] = yield publisher.call("PUBLISH", CHANNEL, "during")
    assert kind == "error" and text.startswith("BACKPLANE redis://127.0.0.1:")
    assert text.endswith("is down: delivered to 1 local subscriber only")
    assert (yield reader.drain()) == [["message", CHANNEL, "during"]]  # here, no position
    back = yield connect(a.port)
    frames = yield back.call("RESUME", CHANNEL, position["epoch"], str(position["offset"]))
    [kind, channel, where, reason] = frames[-1]
    assert (kind, channel, where) == ("recovery_failed", CHANNEL, None)
    assert reason.startswith("the channel's history cannot be read: redis://127.0.0.1:")
    [[kind, text]] = yield back.call("HISTORY", CHANNEL, "5")
    assert kind == "error" and text.startswith("BACKPLANE redis://127.0.0.1:")


@pytest_twisted.inlineCallbacks
def test_a_subscriber_that_stays_gets_what_its_node_missed_while_cut_off_from_redis(
    redis, make_node, connect
):
    proxy = TcpProxy(redis.port)
    yield proxy.start()
    try:
        a = yield make_node(url(redis), history_size=COUNT)
        b = yield make_node(f"redis://127.0.0.1:{proxy.port}/", history_size=COUNT)
        reader = Reader(connect, b.port)
        yield reader.join()
        publisher = SteadyPublisher((yield connect(a.port)), COUNT)
        yield reader.read_until(50)
        # B's link to Redis is reset and kept from coming back while A publishes.
        proxy.hold()
        proxy.reset()
        yield publisher.sent_more(40)
        proxy.release()
        yield publisher.done
        # Without the gap filled, what B missed would never come: fail, not hang.
        yield reader.read_until(COUNT).addTimeout(30, reactor)
        assert reader.failures == []
        assert reader.payloads == [str(n) for n in range(COUNT)]  # none lost, none twice
        assert reader.position["offset"] == COUNT
        samples = yield scrape(b.port)
        assert figure(samples, "pubsub_history_missed_total", result="filled") >= 30
        assert figure(samples, "pubsub_history_missed_total", result="lost") == 0
    finally:
        yield proxy.stop()


@pytest_twisted.inlineCallbacks
def test_what_a_node_missed_comes_when_it_is_back_with_no_later_message(redis, make_node, connect):
    proxy = TcpProxy(redis.port)
    yield proxy.start()
    try:
        a = yield make_node(url(redis))
        b = yield make_node(f"redis://127.0.0.1:{proxy.port}/")
        reader = yield connect(b.port)
        yield reader.call("RESUME", CHANNEL)
        publisher = yield connect(a.port)
        yield publisher.call("PUBLISH", CHANNEL, "before")
        assert (yield reader.next_frame())[2] == "before"
        proxy.hold()
        proxy.reset()
        backplane = b.resource.health.backplane
        yield wait_for(lambda: defer.succeed(backplane.state), "down", "B's backplane")
        for n in range(5):  # a quiet channel: nothing after these
            yield publisher.call("PUBLISH", CHANNEL, f"meanwhile {n}")
        proxy.release()
        # Without a look at the tops once back, these would come with the next message only.
        frames = yield defer.gatherResults([reader.next_frame() for _ in range(5)]).addTimeout(
            30, reactor
        )
        assert [(f[2], f[3]["offset"]) for f in frames] == [
            (f"meanwhile {n}", n + 2) for n in range(5)
        ]
        assert (yield reader.drain()) == []
    finally:
        yield proxy.stop()
