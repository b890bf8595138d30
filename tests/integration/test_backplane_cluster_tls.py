"""Nodes joined by a Redis Cluster over TLS (``rediss+cluster://``), with client certificates.

Every cluster node listens on a TLS port only and wants a client certificate
the test's CA signed (``tls-auth-clients yes``); the cluster bus and
replication speak TLS too, so CLUSTER SLOTS announces the TLS ports
(tests/support/redis_cluster.py with ``tls``).  The PKI, and the nodes
started with ``--backplane-tls-ca``, ``--backplane-tls-cert`` and
``--backplane-tls-key``, are test_backplane_tls.py's; the cross-node checks
are test_backplane_cluster.py's, over TLS: a node asks a seed for the slot
map over TLS, links to each primary it names over TLS, and carries its
channels and shard channels as sharded channels on the owning primaries.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted

from tests.integration.test_backplane import health
from tests.integration.test_backplane_cluster import (
    CHANNELS,
    all_connected,
    owner,
    subscribed_everywhere,
)
from tests.integration.test_backplane_tls import (  # noqa: F401 - fixtures: the PKI, the nodes
    TLS_FAILED,
    nodes,
    pki,
)
from tests.support.redis_cluster import RedisCluster

SHARD = "{orders}.eu"


@pytest.fixture
def tls_cluster(tmp_path, pki):  # noqa: F811 - the imported fixture
    """A Redis Cluster (three primaries, a replica each) on TLS ports only, every
    port and link wanting a certificate the PKI's CA signed."""
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    cluster = RedisCluster(str(workdir), tls=pki.redis_tls())
    cluster.start()  # stops every node itself if the cluster does not form
    yield cluster
    cluster.stop()


def tls_cluster_url(cluster: RedisCluster) -> str:
    # Two seeds, as test_backplane_cluster.py's cluster_url, over TLS.
    first, second = cluster.seeds()[:2]
    return f"rediss+cluster://127.0.0.1:{first},127.0.0.1:{second}/"


@pytest.mark.timeout(180)
@pytest_twisted.inlineCallbacks
def test_two_nodes_act_as_one_broker_over_a_redis_cluster_with_tls_and_client_certificates(
    tls_cluster,
    pki,  # noqa: F811 - the imported fixture
    nodes,  # noqa: F811 - the imported fixture
    resp_connect,
):
    for port in tls_cluster.seeds():
        assert tls_cluster.call(port, "CONFIG", "GET", "tls-auth-clients") == [
            b"tls-auth-clients",
            b"yes",
        ]
    assert {owner(tls_cluster, "channel", c) for c in CHANNELS} == set(tls_cluster.primaries()), (
        "the channels should spread over every shard"
    )
    url = tls_cluster_url(tls_cluster)
    node_a, ws_a, resp_a = yield nodes(url, *pki.node_options())
    node_b, ws_b, resp_b = yield nodes(url, *pki.node_options())
    yield all_connected(ws_a, ws_b)
    for ws in (ws_a, ws_b):
        body = (yield health(ws))["backplane"]
        assert body["url"] == url
        shards = body["shards"]
        assert sorted(s["state"] for s in shards) == ["connected"] * 3, shards
        assert all(s["url"].startswith("rediss://") for s in shards), shards
        # The links are to the primaries' TLS ports, as CLUSTER SLOTS announced them.
        assert sorted(s["url"] for s in shards) == sorted(
            f"rediss://127.0.0.1:{port}/" for port in tls_cluster.primaries()
        )

    a = yield resp_connect(resp_a)
    b = yield resp_connect(resp_b)
    yield a.call("SUBSCRIBE", *CHANNELS)
    yield a.call("SSUBSCRIBE", SHARD)
    # Each primary's own count, asked over TLS with the client certificate.
    yield subscribed_everywhere(tls_cluster, "channel", CHANNELS, 1)
    yield subscribed_everywhere(tls_cluster, "shard", [SHARD], 1)

    # B publishes on every shard: no subscriber on B, A gets each message once.
    for channel in CHANNELS:
        b.send("PUBLISH", channel, f"from b {channel}")
    assert (yield b.drain()) == [0] * len(CHANNELS)
    received = []
    for _ in CHANNELS:
        received.append((yield a.next_value()))
    assert sorted(received) == sorted(
        [b"message", c.encode(), f"from b {c}".encode()] for c in CHANNELS
    )
    assert (yield b.call("SPUBLISH", SHARD, b"\x00\xff")) == [0]
    assert (yield a.next_value()) == [b"smessage", SHARD.encode(), b"\x00\xff"]
    assert (yield a.drain()) == []  # nothing twice

    for node in (node_a, node_b):
        assert f"backplane: connected to {url} (3 shards)".encode() in node.output
        assert not re.search(TLS_FAILED, node.output), node.output.decode(errors="replace")
