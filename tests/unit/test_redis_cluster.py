"""The Redis Cluster backplane's own pieces: hash slots, the URL, the slot map, the census."""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pubsub.backplane.redis import BackplaneDown
from pubsub.backplane.redis_cluster import (
    ClusterTarget,
    RedisClusterBackplane,
    is_cluster_url,
    keyslot,
    parse_cluster_url,
    parse_slots,
    slot_tags,
)
from pubsub.core.engine import Engine, Kind


def _crc16_bitwise(data: bytes) -> int:
    """CRC16-XMODEM computed bit by bit, as the Redis Cluster spec describes it."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


@pytest.mark.parametrize(
    ("name", "slot"),
    [
        (b"123456789", 0x31C3),  # the spec's check value
        (b"foo", 12182),
        (b"", 0),
        (b"{user1000}.following", keyslot(b"user1000")),
        (b"foo{}{bar}", _crc16_bitwise(b"foo{}{bar}") % 16384),  # empty tag: the whole name
        (b"foo{{bar}}zap", keyslot(b"{bar")),  # from the first { to the first } after it
        (b"foo{bar}{zap}", keyslot(b"bar")),
    ],
)
def test_the_slot_of_a_name_is_redis_clusters(name, slot):
    assert keyslot(name) == slot


@given(st.binary(max_size=64))
def test_the_table_driven_crc_is_the_bitwise_one(name):
    if b"{" not in name:
        assert keyslot(name) == _crc16_bitwise(name) % 16384


def test_a_cluster_url_names_its_seeds_and_credentials():
    target = parse_cluster_url("redis+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2,[::1]:7002/")
    assert target == ClusterTarget(
        (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)), "app", "s@cret", False
    )
    assert target.display == "redis+cluster://app@10.0.0.1:7000,10.0.0.2:6379,[::1]:7002/"
    assert parse_cluster_url("rediss+cluster://:pw@h:1").tls
    assert parse_cluster_url("rediss+cluster://:pw@h:1").password == "pw"
    assert parse_cluster_url("rediss+cluster://:pw@h:1").username is None
    assert is_cluster_url(" REDIS+CLUSTER://h:1") and not is_cluster_url("redis://h:1")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h:1", r"must start with redis\+cluster://"),
        ("redis+cluster://h:1,:2", "seed without a host"),
        ("redis+cluster://h:x", "bad port"),
        ("redis+cluster://h:70000", "bad port"),
    ],
)
def test_a_bad_cluster_url_says_what_is_wrong(url, message):
    with pytest.raises(ValueError, match=message):
        parse_cluster_url(url)


def test_the_slot_map_names_each_ranges_primary():
    reply = [
        [0, 5460, [b"127.0.0.1", 7000, b"id0"], [b"127.0.0.1", 7003, b"id3"]],
        [5461, 10922, [b"", 7001, b"id1"]],  # an unknown address: the node asked
        [10923, 16383, [b"?", 7002, b"id2"]],
    ]
    assert parse_slots(reply, "10.1.1.1") == {
        (0, 5460): ("127.0.0.1", 7000),
        (5461, 10922): ("10.1.1.1", 7001),
        (10923, 16383): ("10.1.1.1", 7002),
    }


def test_an_error_instead_of_a_slot_map_is_refused():
    with pytest.raises(ValueError, match="cluster support disabled"):
        parse_slots(hiredis.ReplyError("ERR This instance has cluster support disabled"), "h")


class _Link:
    state = "connected"


def _cluster(clock):
    cluster = RedisClusterBackplane(Engine(), "redis+cluster://127.0.0.1:1/", clock=clock)
    cluster.links[("127.0.0.1", 1)] = _Link()
    cluster.state = "connected"
    return cluster


def test_a_node_broadcasts_until_it_has_heard_the_census_long_enough():
    clock = Clock()
    cluster = _cluster(clock)
    assert cluster.broadcast  # nothing heard yet: other nodes may hold patterns
    cluster._count_holders()
    clock.advance(cluster.census_ttl - 0.1)
    cluster._count_holders()
    assert cluster.broadcast
    clock.advance(0.2)
    cluster._count_holders()
    assert not cluster.broadcast
    cluster.state = "down"  # the census may be missed: broadcast again
    cluster._count_holders()
    assert cluster.broadcast


def test_a_holders_word_holds_until_it_says_off_or_lapses():
    clock = Clock()
    cluster = _cluster(clock)
    cluster._count_holders()
    clock.advance(cluster.census_ttl)
    cluster._count_holders()
    assert not cluster.broadcast
    cluster.census_heard(b"a" * 16, b"on")
    assert cluster.broadcast
    cluster.census_heard(b"a" * 16, b"off")
    assert not cluster.broadcast
    cluster.census_heard(b"b" * 16, b"on")
    clock.advance(cluster.census_ttl + 0.1)  # b crashed: no more words
    cluster._count_holders()
    assert not cluster.broadcast


class _Forwarding:
    """A shard link that records what it is asked to send again."""

    url = "redis://127.0.0.1:2/"
    state = "connected"
    redirected = dropped = sent = received = failed = reconnects = timeouts = 0

    def __init__(self, takes: bool = True, address=("10.0.0.3", 7002)) -> None:
        self.takes = takes
        self.address = address
        self.forwarded: list[tuple[bytes, int, bool]] = []

    def forward(self, data: bytes, hops: int, asking: bool) -> bool:
        self.forwarded.append((data, hops, asking))
        return self.takes


def test_a_redirected_publish_goes_where_redis_says():
    cluster = _cluster(Clock())
    there = cluster.links[("10.0.0.2", 7001)] = _Forwarding()
    here = _Forwarding()
    cluster.redirect(here, "MOVED 42 10.0.0.2:7001", b"one", 0)
    cluster.redirect(here, "ASK 42 10.0.0.2:7001", b"two", 0)  # ASKING first
    assert there.forwarded == [(b"one", 1, False), (b"two", 1, True)]
    assert cluster.lost == 0


def test_a_publish_moved_to_a_node_not_linked_yet_waits_for_the_new_map():
    cluster = _cluster(Clock())
    here = _Forwarding()
    cluster.redirect(here, "MOVED 42 10.0.0.3:7002", b"one", 0)
    assert cluster.lost == 0
    new = cluster.links[("10.0.0.3", 7002)] = _Forwarding()
    cluster._send_held()  # as _apply does once the new map is in
    assert new.forwarded == [(b"one", 1, False)]
    cluster.redirect(here, "MOVED 42 10.0.0.9:7009", b"two", 0)
    cluster._send_held()  # the new map has no such node: lost, and counted
    assert cluster.lost == 1


def test_a_publish_moved_to_a_node_whose_link_is_not_up_yet_waits_for_it_a_while():
    clock = Clock()
    cluster = _cluster(clock)
    here = _Forwarding()
    new = cluster.links[("10.0.0.3", 7002)] = _Forwarding(takes=False)  # connecting
    new.state = "connecting"
    cluster.redirect(here, "MOVED 42 10.0.0.3:7002", b"one", 0)
    cluster._send_held()  # the new map is in; the promoted replica's link is not up
    assert cluster.lost == 0
    new.takes, new.state = True, "connected"
    cluster.link_changed(new)
    # Tried at the redirect and with the new map (refused: not up), sent once up.
    assert new.forwarded == [(b"one", 1, False)] * 3
    assert (cluster.lost, cluster._held) == (0, [])
    new.takes, new.state = False, "connecting"
    cluster.redirect(here, "MOVED 42 10.0.0.3:7002", b"two", 0)
    clock.advance(cluster.hold_limit)
    cluster._tick()  # held too long: lost, and counted
    assert (cluster.lost, cluster._held, cluster._held_bytes) == (1, [], 0)


def test_a_publish_that_cannot_be_sent_again_is_counted_lost():
    cluster = _cluster(Clock())
    cluster.links[("10.0.0.2", 7001)] = _Forwarding(takes=False)
    here = _Forwarding()
    cluster.redirect(here, "CLUSTERDOWN The cluster is down", b"a", 0)
    cluster.redirect(here, "MOVED 42 10.0.0.2:7001", b"b", 2)  # redirected twice already
    cluster.redirect(here, "ASK 42 10.0.0.2:7001", b"c", 0)  # that link is down
    assert cluster.lost == 3
    cluster.buffer_limit = 1
    cluster.redirect(here, "MOVED 42 10.0.0.5:7005", b"too big to hold", 0)
    assert cluster.lost == 4


# -- the history's keys and commands (pubsub.backplane.history) ----------------------------


def test_every_slot_has_a_short_tag_of_its_own():
    tags = slot_tags()
    assert len(tags) == 16384
    assert all(keyslot(tag) == slot for slot, tag in enumerate(tags))
    assert all(tag.isalnum() and 1 <= len(tag) <= 3 for tag in tags)


@given(st.binary(max_size=40))
def test_a_kept_channels_keys_are_in_the_slot_of_its_sharded_name(channel):
    cluster = _cluster(Clock())
    stream, position, wire, _ = cluster.history_names(channel)
    assert wire == b"pubsub:c:" + channel
    assert keyslot(stream) == keyslot(position) == keyslot(wire)
    assert stream.endswith(b"pubsub:history:" + channel)
    assert position.endswith(b"pubsub:history-position:" + channel)


def test_a_kept_channels_messages_go_cluster_wide_too_while_any_node_holds_patterns():
    clock = Clock()
    cluster = _cluster(clock)
    assert cluster.history_names(b"chat")[3] == (b"SPUBLISH", b"PUBLISH")  # not settled
    cluster._count_holders()
    clock.advance(cluster.census_ttl)
    cluster._count_holders()
    assert cluster.history_names(b"chat")[3] == (b"SPUBLISH",)
    cluster.interest[Kind.PATTERN].add(b"ch*")  # this node's own: delivered back from Redis
    assert cluster.history_names(b"chat")[3] == (b"SPUBLISH", b"PUBLISH")
    cluster.interest[Kind.PATTERN].clear()
    cluster.census_heard(b"a" * 16, b"on")
    assert cluster.history_names(b"chat")[3] == (b"SPUBLISH", b"PUBLISH")


class _Carrier:
    """A shard link that records what the history sends through it."""

    url = "redis://127.0.0.1:2/"

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def carry(self, channel, data):
        self.sent.append(("carry", channel, data))
        return True

    def call(self, channel, *args):
        self.sent.append(("call", channel, *args))
        return "called"

    def barrier(self, channel):
        self.sent.append(("barrier", channel))
        return "barrier"

    def refusal(self, receivers):
        return None


def test_the_history_goes_to_the_shard_that_carries_the_channel_or_is_refused():
    cluster = _cluster(Clock())
    assert not cluster.carry(b"chat", b"script")
    assert cluster.refusal(2).startswith("BACKPLANE redis+cluster://127.0.0.1:1/ has no slot map")
    for asked in (cluster.call(b"chat", b"GET", b"k"), cluster.barrier(b"chat")):
        failures: list = []
        asked.addErrback(failures.append)
        assert failures[0].check(BackplaneDown)
        assert str(failures[0].value) == "redis+cluster://127.0.0.1:1/ has no slot map yet"
    link = _Carrier()
    cluster._slots = [link] * 16384
    assert cluster.carry(b"chat", b"script")
    assert cluster.refusal(0) is None
    assert cluster.call(b"chat", b"GET", b"k") == "called"
    assert cluster.barrier(b"chat") == "barrier"
    assert link.sent == [
        ("carry", b"chat", b"script"),
        ("call", b"chat", b"GET", b"k"),
        ("barrier", b"chat"),
    ]


# -- a link's publishes not answered yet ---------------------------------------------------


def _linked(clock: Clock):
    """A cluster with one link to 10.0.0.1:7000, both connections on StringTransports."""
    from twisted.internet.testing import StringTransport

    from pubsub.backplane.redis import _Connection
    from pubsub.backplane.redis_cluster import _ShardLink

    cluster = _cluster(clock)
    cluster.links.clear()
    link = cluster.links[("10.0.0.1", 7000)] = _ShardLink(cluster, "10.0.0.1", 7000)
    connections = {}
    for role in ("publisher", "subscriber"):
        connections[role] = _Connection(link, role)
        connections[role].makeConnection(StringTransport())
    connections["subscriber"].dataReceived(b"+PONG\r\n")
    assert link.state == "connected"
    return cluster, link, connections["publisher"]


def test_a_link_whose_node_left_the_map_waits_for_its_publishes_answers():
    clock = Clock()
    cluster, link, publisher = _linked(clock)
    link.published(Kind.CHANNEL, b"news", b"one")
    cluster._apply({(0, 16383): ("10.0.0.2", 7001)})  # a new map, without this node
    assert link._retired is not True  # not closed: "one" is not answered yet
    assert cluster.sent == 1  # its counts are still counted
    # A primary just demoted answers what it had paused: MOVED, sent on.
    publisher.dataReceived(b"-MOVED 42 10.0.0.2:7001\r\n")
    assert link._retired is True
    assert (cluster.lost, len(cluster._held)) == (0, 1)  # held for the new map
    assert cluster.sent == 1  # the closed link's counts are kept


def test_publishes_never_answered_are_counted_lost():
    clock = Clock()
    cluster, link, publisher = _linked(clock)
    link.published(Kind.CHANNEL, b"news", b"one")
    cluster.links.pop(("10.0.0.1", 7000)).retire(cluster.hold_limit)
    clock.advance(cluster.hold_limit)
    assert (link._retired, cluster.lost) == (True, 1)

    cluster, link, publisher = _linked(clock)
    link.published(Kind.CHANNEL, b"news", b"one")
    link.published(Kind.CHANNEL, b"news", b"two")
    publisher.dataReceived(b":0\r\n")  # "one" answered
    publisher.connectionLost(Failure(ConnectionAborted()))
    assert cluster.lost == 1  # "two": sent, and no answer before the link went


def test_a_publish_a_shard_refuses_is_counted_lost_and_a_redirect_is_not():
    cluster, link, publisher = _linked(Clock())
    for payload in (b"one", b"two", b"three"):
        link.published(Kind.CHANNEL, b"news", payload)
    publisher.dataReceived(b":0\r\n")
    publisher.dataReceived(b"-OOM command not allowed when used memory > 'maxmemory'.\r\n")
    assert cluster.lost == 1  # "two" reached no node
    publisher.dataReceived(b"-MOVED 42 10.0.0.2:7001\r\n")
    assert (cluster.lost, len(cluster._held)) == (1, 1)  # "three" goes on
