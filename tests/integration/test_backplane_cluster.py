"""Nodes joined by a real Redis Cluster (three primaries, a replica each) act as one broker.

Each test starts its own cluster (tests/support/redis_cluster.py) and real
`twistd pubsub` nodes with a ``redis+cluster://`` backplane.  A node carries
its clients' channels and shard channels as sharded channels, each on the
primary that owns its slot; the tests read each primary's own PUBSUB
SHARDNUMSUB to see that, and wait for it before publishing elsewhere.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from pubsub.backplane.redis_cluster import keyslot
from tests.integration.test_backplane import PREFIX, health, wait_for
from tests.support.respclient import connect as redis_connect

CHANNELS = [f"news.{n}" for n in range(12)]


def cluster_url(cluster) -> str:
    # Two seeds: the node asks the first that answers.
    first, second = cluster.seeds()[:2]
    return f"redis+cluster://127.0.0.1:{first},127.0.0.1:{second}/"


def wire(kind: str, name: str) -> bytes:
    return PREFIX + (b"c:" if kind == "channel" else b"s:") + name.encode()


def owner(cluster, kind: str, name: str) -> int:
    return cluster.slot_owner(keyslot(wire(kind, name)))


def shard_subscribers(cluster, kind: str, name: str):
    """PUBSUB SHARDNUMSUB of ``name`` on the primary that owns its slot now."""
    port = owner(cluster, kind, name)
    reply = cluster.call(port, "PUBSUB", "SHARDNUMSUB", wire(kind, name))
    return defer.succeed(reply[1])


@defer.inlineCallbacks
def all_connected(*ws_ports: int):
    for port in ws_ports:
        yield wait_for(
            lambda port=port: health(port).addCallback(lambda b: b["backplane"]["state"]),
            "connected",
            f"backplane state of the node on {port}",
        )


@defer.inlineCallbacks
def subscribed_everywhere(cluster, kind: str, names, count: int):
    for name in names:
        yield wait_for(
            lambda name=name: shard_subscribers(cluster, kind, name),
            count,
            f"SHARDNUMSUB {name} on its primary",
        )


@defer.inlineCallbacks
def two_nodes(cluster, nodes, resp_connect):
    """Two twistd nodes over ``cluster``, both connected: (WebSocket port of A,
    of B, a RESP client of A, of B)."""
    (ws_a, resp_a), (ws_b, resp_b) = yield nodes(cluster_url(cluster), 2)
    yield all_connected(ws_a, ws_b)
    a = yield resp_connect(resp_a)
    b = yield resp_connect(resp_b)
    return ws_a, ws_b, a, b


@pytest.mark.timeout(180)
@pytest_twisted.inlineCallbacks
def test_two_nodes_act_as_one_broker_over_a_redis_cluster(
    redis_cluster,
    nodes,
    resp_connect,
    connect,
):
    assert {owner(redis_cluster, "channel", c) for c in CHANNELS} == set(
        redis_cluster.primaries()
    ), "the channels should spread over every shard"
    # The slots the nodes compute are Redis's own.
    names = [b"", b"news", b"{user1}.in", b"a{}b{c}", b"{{x}}", bytes(range(256)), "ü".encode()]
    names += [wire(kind, c) for kind in ("channel", "shard") for c in CHANNELS]
    assert [keyslot(n) for n in names] == [redis_cluster.keyslot(n) for n in names]
    (ws_a, resp_a), (ws_b, resp_b) = yield nodes(cluster_url(redis_cluster), 2)
    yield all_connected(ws_a, ws_b)
    body = yield health(ws_a)
    assert sorted(s["state"] for s in body["backplane"]["shards"]) == ["connected"] * 3
    assert body["backplane"]["url"] == cluster_url(redis_cluster)

    a = yield resp_connect(resp_a)
    b = yield resp_connect(resp_b)
    c = yield connect(ws_b)
    yield a.call("SUBSCRIBE", *CHANNELS)
    yield a.call("SSUBSCRIBE", "{orders}.eu")
    assert (yield c.call("SUBSCRIBE", CHANNELS[0])) == [["subscribe", CHANNELS[0], 1]]
    yield subscribed_everywhere(redis_cluster, "channel", CHANNELS[1:], 1)
    yield subscribed_everywhere(redis_cluster, "channel", CHANNELS[:1], 2)  # A's node and B's
    yield subscribed_everywhere(redis_cluster, "shard", ["{orders}.eu"], 1)
    # Plain channels are not published cluster-wide: no classic subscription anywhere.
    for port in redis_cluster.primaries():
        assert redis_cluster.call(port, "PUBSUB", "NUMSUB", PREFIX + b"news.0")[1] == 0

    # B publishes: its count is B's own, A gets every message once, on every shard.
    for channel in CHANNELS:
        b.send("PUBLISH", channel, f"from b {channel}")
    assert (yield b.drain()) == [1] + [0] * (len(CHANNELS) - 1)  # c, on B, holds news.0
    received = []
    for _ in CHANNELS:
        received.append((yield a.next_value()))
    assert sorted(received) == sorted(
        [b"message", c.encode(), f"from b {c}".encode()] for c in CHANNELS
    )
    assert (yield c.next_frame()) == ["message", CHANNELS[0], f"from b {CHANNELS[0]}"]
    assert (yield b.call("SPUBLISH", "{orders}.eu", b"\x00\xff")) == [0]
    assert (yield a.next_value()) == [b"smessage", b"{orders}.eu", b"\x00\xff"]

    # A publish on A: A's subscriber at once, C on B through the cluster, once each.
    a_publisher = yield resp_connect(resp_a)
    assert (yield a_publisher.call("PUBLISH", CHANNELS[0], "local")) == [1]
    assert (yield a.next_value()) == [b"message", CHANNELS[0].encode(), b"local"]
    assert (yield c.next_frame()) == ["message", CHANNELS[0], "local"]
    assert (yield a.drain()) == []

    # The last local subscriber leaving unsubscribes the node on the owning primary.
    yield a.abort()
    yield subscribed_everywhere(redis_cluster, "channel", CHANNELS[1:], 0)
    yield subscribed_everywhere(redis_cluster, "channel", CHANNELS[:1], 1)
    yield subscribed_everywhere(redis_cluster, "shard", ["{orders}.eu"], 0)


@pytest.mark.timeout(240)
@pytest_twisted.inlineCallbacks
def test_a_primarys_failover_keeps_every_subscription_and_duplicates_nothing(
    redis_cluster,
    nodes,
    resp_connect,
):
    ws_a, ws_b, a, b = yield two_nodes(redis_cluster, nodes, resp_connect)
    yield a.call("SUBSCRIBE", *CHANNELS)
    yield subscribed_everywhere(redis_cluster, "channel", CHANNELS, 1)
    failing = owner(redis_cluster, "channel", CHANNELS[0])
    moving = [c for c in CHANNELS if owner(redis_cluster, "channel", c) == failing]

    published, refused = [], []

    @defer.inlineCallbacks
    def publish_round(tag: str):
        for channel in CHANNELS:
            data = f"{tag} {channel}"
            reply = (yield b.call("PUBLISH", channel, data))[0]
            (published if reply == 0 else refused).append((channel, data))

    yield publish_round("before")
    # The replica takes over in the middle of the publishing.
    failover = threads.deferToThread(redis_cluster.failover, failing)
    rounds = 0
    while not failover.called:
        yield publish_round(f"during{rounds}")
        rounds += 1
        yield task.deferLater(reactor, 0.02, lambda: None)
    promoted = yield failover
    assert promoted != failing and owner(redis_cluster, "channel", moving[0]) == promoted

    # Both nodes find the new primary and A's node subscribes there again.
    yield all_connected(ws_a, ws_b)
    yield subscribed_everywhere(redis_cluster, "channel", CHANNELS, 1)
    yield publish_round("after")

    received = []
    while True:
        try:
            received.append((yield a.next_value(timeout=5)))
        except defer.TimeoutError:
            break
    texts = [m[2].decode() for m in received]
    assert len(texts) == len(set(texts)), "a message arrived twice"
    assert {f"before {c}" for c in CHANNELS} <= set(texts)
    late = {f"after {c}" for c in CHANNELS} - set(texts)
    assert not late, ("lost after the failover", late, refused, (yield health(ws_b)))
    # Anything missing is from the failover's window, on the shard that failed
    # over, and was said: counted lost by the publishing node (MOVED), or as
    # subscriptions the old primary dropped by the subscribing one.
    missing = {(channel, data) for channel, data in published if data not in texts}
    assert all(data.startswith("during") and c in moving for c, data in missing), missing
    lost = _counter((yield _metrics(ws_b)), "lost")
    dropped = _counter((yield _metrics(ws_a)), "dropped")
    assert dropped >= 1  # the old primary dropped A's node's subscriptions
    assert not missing or lost + dropped > 0, (missing, lost, dropped, refused)
    assert rounds > 0


def _counter(metrics: str, name: str) -> int:
    return int(
        float(re.search(rf"^pubsub_backplane_{name}_total (\S+)$", metrics, re.MULTILINE)[1])
    )


@defer.inlineCallbacks
def _metrics(port: int):
    from twisted.web.client import Agent, readBody

    response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/metrics" % port)
    return (yield readBody(response)).decode()


@pytest.mark.timeout(180)
@pytest_twisted.inlineCallbacks
def test_patterns_cross_a_redis_cluster_while_a_node_holds_one(redis_cluster, nodes, resp_connect):
    (ws_a, resp_a), (ws_b, resp_b) = yield nodes(cluster_url(redis_cluster), 2)
    yield all_connected(ws_a, ws_b)
    a = yield resp_connect(resp_a)
    b = yield resp_connect(resp_b)
    # A classic subscriber in the cluster sees what nodes broadcast for patterns.
    watcher = yield redis_connect(redis_cluster.primaries()[-1])
    yield watcher.call("SUBSCRIBE", wire("channel", "news.2"))
    yield a.call("PSUBSCRIBE", "news.*")
    yield a.call("SUBSCRIBE", "news.1")
    census = redis_cluster.slot_owner(keyslot(PREFIX + b"patterns"))
    yield wait_for(
        lambda: defer.succeed(redis_cluster.call(census, "PUBSUB", "NUMPAT")),
        1,
        "PUBSUB NUMPAT on the census's primary",
    )
    yield subscribed_everywhere(redis_cluster, "channel", ["news.1"], 1)

    # B publishes: A's channel and pattern subscriber gets both, once.
    assert (yield b.call("PUBLISH", "news.1", "one")) == [0]
    got = sorted([(yield a.next_value()), (yield a.next_value())])
    assert got == [[b"message", b"news.1", b"one"], [b"pmessage", b"news.*", b"news.1", b"one"]]
    assert (yield b.call("PUBLISH", "news.2", "two")) == [0]
    assert (yield a.next_value()) == [b"pmessage", b"news.*", b"news.2", b"two"]
    assert (yield a.drain()) == []
    assert (yield watcher.next_value())[0] == b"message"  # B's broadcast of "two"

    # The last pattern gone, B stops broadcasting once the word has lapsed.
    yield a.call("PUNSUBSCRIBE", "news.*")

    @defer.inlineCallbacks
    def broadcast_seen():
        yield b.call("PUBLISH", "news.2", "probe")
        # The cluster bus may take a moment: two PING round trips' worth.
        seen = (yield watcher.drain()) + (yield watcher.drain())
        return any(m[0] == b"message" for m in seen)

    yield wait_for(broadcast_seen, False, "B still broadcasting without patterns")
    a_publisher = yield resp_connect(resp_a)
    assert (yield a_publisher.call("PUBLISH", "news.1", "local")) == [1]
    assert (yield a.drain()) == [[b"message", b"news.1", b"local"]]
    yield watcher.abort()


@pytest.mark.timeout(180)
@pytest_twisted.inlineCallbacks
def test_a_slot_moved_to_another_primary_redirects_publishes_and_moves_subscriptions(
    redis_cluster, nodes, resp_connect
):
    ws_a, ws_b, a, b = yield two_nodes(redis_cluster, nodes, resp_connect)
    yield a.call("SUBSCRIBE", "news.0")
    yield subscribed_everywhere(redis_cluster, "channel", ["news.0"], 1)
    assert (yield b.call("PUBLISH", "news.0", "before")) == [0]  # B's map: the old owner
    assert (yield a.next_value()) == [b"message", b"news.0", b"before"]

    # The slot goes to another primary (empty, so no MIGRATE): what a resharding does.
    slot = keyslot(wire("channel", "news.0"))
    source = redis_cluster.slot_owner(slot)
    target = next(p for p in redis_cluster.primaries() if p != source)
    target_id = redis_cluster.call(target, "CLUSTER", "MYID")
    for port in [target, source] + [
        p for p in redis_cluster.primaries() if p not in (source, target)
    ]:
        assert redis_cluster.call(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id) == b"OK"
    # A's node hears its subscription dropped and renews it on the new owner.
    yield wait_for(
        lambda: defer.succeed(
            redis_cluster.call(target, "PUBSUB", "SHARDNUMSUB", wire("channel", "news.0"))[1]
        ),
        1,
        "SHARDNUMSUB news.0 on the slot's new owner",
    )
    # B's map is stale: the old owner answers MOVED, B sends it again to the new one.
    assert (yield b.call("PUBLISH", "news.0", "after")) == [0]
    assert (yield a.next_value()) == [b"message", b"news.0", b"after"]
    assert (yield b.call("PUBLISH", "news.0", "later")) == [0]
    assert (yield a.next_value()) == [b"message", b"news.0", b"later"]
    assert (yield a.drain()) == []
    metrics = yield _metrics(ws_b)
    # One or two: "later" may leave before the new map is in.
    assert _counter(metrics, "redirected") >= 1 and _counter(metrics, "lost") == 0
    assert _counter((yield _metrics(ws_a)), "dropped") == 1


@pytest.mark.timeout(240)
@pytest_twisted.inlineCallbacks
def test_a_primary_killed_is_replaced_and_every_subscription_renewed(
    redis_cluster, nodes, resp_connect
):
    ws_a, ws_b, a, b = yield two_nodes(redis_cluster, nodes, resp_connect)
    yield a.call("SUBSCRIBE", *CHANNELS)
    yield subscribed_everywhere(redis_cluster, "channel", CHANNELS, 1)
    # Not a seed of the URL: the nodes must find the map elsewhere too.
    seeds = redis_cluster.seeds()[:2]
    dead = next(p for p in redis_cluster.primaries() if p not in seeds)
    replica = redis_cluster.replica_of(dead)
    gone = [c for c in CHANNELS if owner(redis_cluster, "channel", c) == dead]
    assert gone, "a channel should live on the killed primary"

    redis_cluster.kill(dead)  # a crash: Redis promotes the replica after node_timeout
    # Meanwhile a publish to the dead shard is refused on B (it says so);
    # the others go on.
    refused = []
    while True:
        reply = (yield b.call("PUBLISH", gone[0], "meanwhile"))[0]
        if reply == 0:
            break  # the dead shard's slots are served again
        assert str(reply).startswith("BACKPLANE "), reply
        refused.append(reply)
        yield task.deferLater(reactor, 0.05, lambda: None)
    assert owner(redis_cluster, "channel", gone[0]) == replica
    assert refused, "a publish to a dead shard should be refused, not lost silently"

    yield all_connected(ws_a, ws_b)
    yield subscribed_everywhere(redis_cluster, "channel", CHANNELS, 1)
    for channel in CHANNELS:
        b.send("PUBLISH", channel, f"after {channel}")
    assert (yield b.drain()) == [0] * len(CHANNELS)
    received = []
    for _ in CHANNELS:
        received.append((yield a.next_value()))
    received += yield a.drain()
    texts = [m[2].decode() for m in received if m[2] != b"meanwhile"]
    assert sorted(texts) == sorted(f"after {c}" for c in CHANNELS)
    assert [m for m in received if m[2] == b"meanwhile"] in ([], [received[0]]), received
