"""A backplane link that goes silent is noticed, and nothing is delivered twice after it heals.

A half-open TCP connection (a network partition, a NAT or firewall that
dropped its state, a paused VM) sends no RST and no FIN: the bytes just stop.
Killing redis-server cannot show that, since the kernel closes its sockets, so
here a proxy inside the test process (tests/support/proxy.py) sits between
one node and Redis and goes silent on the test's word: it forwards nothing,
in either direction, and closes nothing.  Healing resets every connection it
held (as a NAT that lost its table does, once packets flow again), after
which it forwards again.

The nodes are real ``twistd pubsub`` processes; the proxied one checks its
link more often than the default so the test is quick, and the bounds are
generous because CI machines are loaded.
"""

from __future__ import annotations

import re
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, readBody

from tests.integration.test_backplane import (
    LOCAL,
    PREFIX,
    Node,
    backplane_state,
    redis_answer,
    stop_nodes,
    wait_for,
)
from tests.integration.test_twistd import TWISTD, clean_environment
from tests.support.proxy import TcpProxy
from tests.support.resp3 import RespError
from tests.support.respclient import connect as redis_connect

#: The proxied node's health check: a PING every half second, 2 s to answer.
PING_INTERVAL = 0.5
TIMEOUT = 2.0
#: How long the node may take to notice, far above TIMEOUT + PING_INTERVAL
#: so a loaded machine does not fail the test.
NOTICE_BOUND = 15.0


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def proxy(redis):
    server = TcpProxy(redis.port)
    pytest_twisted.blockon(server.start())
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def start_node(tmp_path):
    """start_node(redis_port, *options) -> (ws port, resp port), once the node
    is connected to the backplane; every node gets SIGTERM after the test."""
    running: list = []

    @defer.inlineCallbacks
    def start(redis_port: int, *options: str):
        process = Node()
        args = [TWISTD, "-n", "--pidfile=", "pubsub", "--port", LOCAL, "--resp-port", LOCAL]
        args += ["--backplane", f"redis://127.0.0.1:{redis_port}/", *options]
        transport = reactor.spawnProcess(
            process, TWISTD, args, env=clean_environment(), path=str(tmp_path)
        )
        running.append((process, transport))
        try:
            ports = yield process.listening.addTimeout(60, reactor)
        except (defer.TimeoutError, RuntimeError):  # no line in time; or it exited
            output = process.output.decode(errors="replace")
            raise AssertionError("a node did not start:\n" + output) from None
        return ports, process

    yield start
    stop_nodes(running)


@defer.inlineCallbacks
def state_after(port: int, wanted: str, since: float, bound: float):
    """Poll the node's /healthz until its backplane state is ``wanted``;
    fires with the seconds from ``since`` (a time.monotonic()) until then.
    Fails once ``bound`` seconds have passed since ``since``."""
    while True:
        state = yield backplane_state(port)
        elapsed = time.monotonic() - since
        if state == wanted:
            return elapsed
        if elapsed > bound:
            raise AssertionError(f"backplane still {state!r} after {elapsed:.1f} s, not {wanted!r}")
        yield task.deferLater(reactor, 0.05, lambda: None)


@defer.inlineCallbacks
def metrics(port: int):
    response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/metrics" % port)
    return (yield readBody(response)).decode()


@defer.inlineCallbacks
def collect(client, count: int):
    """The last item of the next ``count`` messages ``client`` receives."""
    received = []
    for _ in range(count):
        message = yield client.next_value()
        received.append(message[-1])
    return received


# -- the test ----------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest_twisted.inlineCallbacks
def test_a_silent_link_is_noticed_and_after_it_heals_every_message_arrives_once(
    redis, proxy, start_node, resp_connect
):
    (ws_a, resp_a), node_a = yield start_node(
        proxy.port,
        "--backplane-ping-interval",
        str(PING_INTERVAL),
        "--backplane-timeout",
        str(TIMEOUT),
    )
    (_, resp_b), _ = yield start_node(redis.port)
    url_a = f"redis://127.0.0.1:{proxy.port}/"
    sub_a = yield resp_connect(resp_a)
    sub_b = yield resp_connect(resp_b)
    pub_a = yield resp_connect(resp_a)
    pub_b = yield resp_connect(resp_b)
    yield sub_a.call("SUBSCRIBE", "news")
    yield sub_b.call("SUBSCRIBE", "news")
    watcher = yield redis_connect(redis.port)
    try:
        yield wait_for(
            lambda: redis_answer(watcher, "PUBSUB", "NUMSUB", PREFIX + b"news"),
            [PREFIX + b"news", 2],
            "NUMSUB news",
        )
        # Through the proxy, both ways, before anything goes wrong.
        assert (yield pub_a.call("PUBLISH", "news", "before-a")) == [1]
        assert (yield pub_b.call("PUBLISH", "news", "before-b")) == [1]
        assert sorted((yield collect(sub_a, 2))) == [b"before-a", b"before-b"]
        assert sorted((yield collect(sub_b, 2))) == [b"before-a", b"before-b"]

        proxy.go_silent()
        silent_since = time.monotonic()
        # Local delivery goes on while the link is silent, noticed or not.
        [reply] = yield pub_a.call("PUBLISH", "news", "local while silent")
        assert reply == 1 or str(reply).startswith(f"BACKPLANE {url_a} is down"), reply
        assert (yield sub_a.next_value()) == [b"message", b"news", b"local while silent"]

        noticed = yield state_after(ws_a, "down", silent_since, NOTICE_BOUND)
        print(
            f"\ntime to notice a silent backplane link: {noticed:.2f} s "
            f"(ping interval {PING_INTERVAL} s, timeout {TIMEOUT} s)"
        )
        assert noticed >= TIMEOUT - 0.5  # it did wait for Redis, not give up at once
        [error] = yield pub_a.call("PUBLISH", "news", "local while down")
        assert isinstance(error, RespError)
        assert str(error) == f"BACKPLANE {url_a} is down: delivered to 1 local subscriber only"
        assert (yield sub_a.next_value()) == [b"message", b"news", b"local while down"]
        # Published elsewhere during the silence: lost for A (documented), not late.
        assert (yield pub_b.call("PUBLISH", "news", "lost for a")) == [1]
        assert (yield sub_b.next_value()) == [b"message", b"news", b"lost for a"]
        output = node_a.output.decode(errors="replace")
        assert re.search(
            rf"backplane: {re.escape(url_a)} did not answer the (subscriber|publisher) "
            r"for \d+\.\d s; closing the connection and reconnecting",
            output,
        ), output
        timeouts = re.search(r"pubsub_backplane_timeouts_total (\d+)\.0", (yield metrics(ws_a)))
        assert timeouts and int(timeouts.group(1)) >= 1

        proxy.heal()
        healed_since = time.monotonic()
        back = yield state_after(ws_a, "connected", healed_since, 60)
        print(f"time to reconnect after the link was reset: {back:.2f} s")
        # A's old subscriber connection, reset by the proxy, is gone from
        # Redis: only the fresh one and B's remain.
        yield wait_for(
            lambda: redis_answer(watcher, "PUBSUB", "NUMSUB", PREFIX + b"news"),
            [PREFIX + b"news", 2],
            "NUMSUB news after healing",
        )
        assert (yield sub_a.drain()) == []  # nothing from the silence came late
        assert (yield sub_b.drain()) == []

        count = 25
        for n in range(count):
            pub_a.send("PUBLISH", "news", f"a-{n}")
            pub_b.send("PUBLISH", "news", f"b-{n}")
        assert (yield pub_a.drain()) == [1] * count
        assert (yield pub_b.drain()) == [1] * count
        for subscriber in (sub_a, sub_b):
            received = yield collect(subscriber, 2 * count)
            assert [m for m in received if m.startswith(b"a-")] == [
                b"a-%d" % n for n in range(count)
            ]
            assert [m for m in received if m.startswith(b"b-")] == [
                b"b-%d" % n for n in range(count)
            ]
            assert (yield subscriber.drain()) == []  # each exactly once
        assert (yield backplane_state(ws_a)) == "connected"
    finally:
        yield watcher.abort()
