"""The Redis Cluster test support (tests/support/redis_cluster.py) gives what the
backplane's cluster tests lean on: six real redis-servers forming three shards,
redirections naming the owner, and a failover that has settled when it returns.

Each test starts its own cluster (the ``redis_cluster`` fixture, conftest.py);
the timeouts are above the support's own 60 s deadlines, so a cluster that
will not form fails with redis-cli's output rather than a stack dump.
"""

from __future__ import annotations

import hiredis
import pytest

from tests.support.redis_cluster import SLOTS, RedisCluster

CHANNEL = b"news"


@pytest.mark.timeout(90)
def test_three_primaries_each_with_a_replica_cover_every_slot(redis_cluster: RedisCluster):
    primaries = redis_cluster.primaries()
    assert len(primaries) == 3
    replicas = [redis_cluster.replica_of(port) for port in primaries]
    assert sorted(primaries + replicas) == sorted(redis_cluster.seeds())
    assert len(redis_cluster.seeds()) == 6
    for port in redis_cluster.seeds():
        info = redis_cluster.call(port, "CLUSTER", "INFO").decode()
        assert "cluster_state:ok" in info
        assert f"cluster_slots_assigned:{SLOTS}" in info
    for slot in (0, 5460, 5461, 10922, 10923, SLOTS - 1):
        assert redis_cluster.slot_owner(slot) in primaries


@pytest.mark.timeout(90)
def test_spublish_on_the_wrong_primary_is_moved_to_the_owner(redis_cluster: RedisCluster):
    slot = redis_cluster.keyslot(CHANNEL)
    owner = redis_cluster.slot_owner(slot)
    other = next(port for port in redis_cluster.primaries() if port != owner)

    reply = redis_cluster.call(other, "SPUBLISH", CHANNEL, b"hello")

    assert isinstance(reply, hiredis.ReplyError)
    assert str(reply) == f"MOVED {slot} 127.0.0.1:{owner}"
    assert redis_cluster.call(owner, "SPUBLISH", CHANNEL, b"hello") == 0


@pytest.mark.timeout(150)
def test_failover_hands_the_slots_to_the_replica(redis_cluster: RedisCluster):
    slot = redis_cluster.keyslot(CHANNEL)
    former = redis_cluster.slot_owner(slot)
    replica = redis_cluster.replica_of(former)

    promoted = redis_cluster.failover(former)

    assert promoted == replica
    assert redis_cluster.slot_owner(slot) == replica
    assert former not in redis_cluster.primaries()
    assert redis_cluster.replica_of(replica) == former
    assert redis_cluster.call(replica, "SPUBLISH", CHANNEL, b"hello") == 0
    other = next(port for port in redis_cluster.primaries() if port != replica)
    assert str(redis_cluster.call(other, "SPUBLISH", CHANNEL, b"x")) == (
        f"MOVED {slot} 127.0.0.1:{replica}"
    )
