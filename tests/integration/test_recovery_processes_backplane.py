"""Recovery with real processes, two nodes on a backplane (issue 17, parts 3 and 5).

Two ``twistd pubsub`` nodes share one redis-server, and with it the history
of ``chat.*`` (pubsub/backplane/history.py).  The steady publisher publishes
on one node; the subscriber (the Twisted Python client) reaches a node
through a proxy the test controls, which, while it holds the subscriber
away, turns to the other node: the subscriber comes back there and recovers
from the shared history, every message once and in order.  A node that
restarts loses nothing either: unlike a node without a backplane
(test_recovery_processes.py), the history is Redis's.

The same harness as test_recovery_processes.py (tests/support/recovery.py):
every wait is on an event or a count.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from pubsub.client import DISCONNECTED, Recovery
from tests.integration.test_backplane import backplane_state, wait_for
from tests.integration.test_metrics import figure, scrape
from tests.integration.test_recovery_processes import (
    ALL_KEPT,
    AWAY,
    CHANNEL,
    CUTS,
    HISTORY,
    LIVE,
    through,
)
from tests.support.recovery import Rig, assert_every_message_once_in_order, cut_off

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def rig(tmp_path):
    rig = Rig(str(tmp_path))
    yield rig
    pytest_twisted.blockon(rig.close())


@defer.inlineCallbacks
def backplane_node(rig: Rig, redis_port: int):
    """A node keeping chat.*'s history in the Redis on ``redis_port``, once
    its backplane is connected."""
    node = yield rig.node(*HISTORY, *ALL_KEPT, "--backplane", f"redis://127.0.0.1:{redis_port}/")
    yield wait_for(lambda: backplane_state(node.ws_port), "connected", "the node's backplane")
    return node


@defer.inlineCallbacks
def recoveries(*nodes) -> defer.Deferred:
    """The nodes' pubsub_recoveries_total, summed: (recovered, failed)."""
    recovered = failed = 0
    for node in nodes:
        samples = yield scrape(node.ws_port)
        recovered += figure(samples, "pubsub_recoveries_total", result="recovered")
        failed += figure(samples, "pubsub_recoveries_total", result="failed")
    return recovered, failed


@pytest_twisted.inlineCallbacks
def test_a_subscriber_cut_off_comes_back_on_the_other_node_with_every_message_once(rig, redis):
    a = yield backplane_node(rig, redis.port)
    b = yield backplane_node(rig, redis.port)
    proxy = yield rig.proxy(a.ws_port)
    subscriber = yield rig.subscriber(through(proxy), CHANNEL)
    assert subscriber.resumed == Recovery(CHANNEL, True, None, ("", 0))
    publisher = yield rig.publisher(b.resp_port, CHANNEL)  # on the other node
    taken = 0
    for cut_number in range(CUTS):
        yield subscriber.until(taken + LIVE)
        other = b if cut_number % 2 == 0 else a
        cut = yield cut_off(
            subscriber,
            publisher,
            proxy,
            proxy.reset,
            AWAY,
            meanwhile=lambda other=other: proxy.forward_to(other.ws_port),
        )
        assert cut.published_away > 0 and cut.missed >= AWAY, cut
        taken = cut.acked_back
    yield subscriber.until(taken + LIVE)
    total = yield publisher.stop()
    yield subscriber.until(total)

    assert_every_message_once_in_order(subscriber.messages, total)
    assert subscriber.failures == []
    assert (yield recoveries(a, b)) == (CUTS, 0)


@pytest_twisted.inlineCallbacks
def test_a_node_restarted_with_a_backplane_loses_no_history(rig, redis):
    old = yield backplane_node(rig, redis.port)
    steady = yield backplane_node(rig, redis.port)
    proxy = yield rig.proxy(old.ws_port)
    subscriber = yield rig.subscriber(through(proxy), CHANNEL)
    publisher = yield rig.publisher(steady.resp_port, CHANNEL)
    yield subscriber.until(LIVE)

    # The subscriber's node restarts (SIGTERM, then a new process) while the
    # other node's publisher goes on; the subscriber's connections wait at
    # the proxy until the new node is up and more was published.
    proxy.hold()
    lost = subscriber.next_state(DISCONNECTED)
    received_before = len(subscriber.messages)
    assert (yield old.stop()) == 0
    assert (yield lost) == "1001 server shutting down"
    new = yield backplane_node(rig, redis.port)
    proxy.forward_to(new.ws_port)
    yield publisher.until_acked(received_before + AWAY)
    proxy.release()

    yield subscriber.until(publisher.acked + LIVE)
    total = yield publisher.stop()
    yield subscriber.until(total)
    assert_every_message_once_in_order(subscriber.messages, total)
    assert subscriber.failures == []
    assert (yield recoveries(new, steady)) == (1, 0)
