"""Several `twistd pubsub` nodes joined by a real redis-server act as one broker.

Every node here is a real process (the installed package, as users run it),
and so is Redis, which one test kills and starts again.  Subscriptions reach
Redis a round trip after the client's confirmation, so tests wait for Redis's
own PUBSUB NUMSUB (and NUMPAT, SHARDNUMSUB) before publishing elsewhere: that
is also how they check that a node subscribes in Redis to what its clients
hold, and to nothing once they are gone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, readBody

from tests.integration.test_twistd import TWISTD, clean_environment, run_twistd
from tests.support.processes import ServerProcess
from tests.support.resp3 import RespError
from tests.support.respclient import connect as redis_connect

LOCAL = "tcp:0:interface=127.0.0.1"
PREFIX = b"pubsub:"
CLUSTER = str(Path(sys.executable).with_name("pubsub-cluster"))


class Node(ServerProcess):
    """``listening`` fires with (WebSocket port, RESP port) once both are bound
    and ``connected`` backplane lines have appeared (one per worker)."""

    def __init__(self, workers: int = 1) -> None:
        super().__init__(rb"RespFactory starting on (\d+)")
        self.workers = workers

    def outReceived(self, data: bytes) -> None:
        self.output += data
        site = re.search(rb"(?:Site starting on |WebSocket on 127\.0\.0\.1:)(\d+)", self.output)
        resp = re.search(rb"(?:RespFactory starting on |RESP on 127\.0\.0\.1:)(\d+)", self.output)
        ready = self.output.count(b"backplane: connected to") >= self.workers
        if site and resp and ready and not self.listening.called:
            self.listening.callback((int(site.group(1)), int(resp.group(1))))

    errReceived = outReceived


@pytest.fixture
def nodes(tmp_path):
    """start(redis, count) -> [(ws port, resp port)], where ``redis`` is a redis-server's
    port or a backplane URL; every node gets SIGTERM after."""
    running: list = []

    @defer.inlineCallbacks
    def start(redis: int | str, count: int):
        url = redis if isinstance(redis, str) else f"redis://127.0.0.1:{redis}/"
        started = []
        for _ in range(count):
            process = Node()
            args = [TWISTD, "-n", "--pidfile=", "pubsub", "--port", LOCAL, "--resp-port", LOCAL]
            args += ["--backplane", url]
            transport = reactor.spawnProcess(
                process, TWISTD, args, env=clean_environment(), path=str(tmp_path)
            )
            running.append((process, transport))
            started.append(process.listening.addTimeout(60, reactor))
        try:
            ports = yield defer.gatherResults(started, consumeErrors=True)
        except defer.FirstError:
            outputs = [process.output.decode(errors="replace") for process, _ in running]
            raise AssertionError("a node did not start:\n" + "\n----\n".join(outputs)) from None
        return ports

    yield start
    stop_nodes(running)


def stop_nodes(running) -> None:
    """SIGTERM every (process, transport) still running; none may log a traceback."""
    for process, transport in running:
        if not process.ended.called:
            transport.signalProcess("TERM")
        pytest_twisted.blockon(process.ended.addTimeout(30, reactor))
        assert b"Traceback" not in process.output, process.output.decode(errors="replace")


@defer.inlineCallbacks
def wait_for(query, expected, what: str):
    """Ask ``query`` again until it answers ``expected``: the other processes
    get there on their own time.  Fails after 30 s with the last answer."""
    answer = None
    for _ in range(1500):
        answer = yield query()
        if answer == expected:
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"{what}: still {answer!r}, wanted {expected!r}")


def redis_answer(redis_client, *args):
    return redis_client.call(*args).addCallback(lambda values: values[0])


@defer.inlineCallbacks
def health(port: int):
    response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/healthz" % port)
    return json.loads((yield readBody(response)))


def backplane_state(port: int):
    return health(port).addCallback(lambda body: body["backplane"]["state"])


@pytest_twisted.inlineCallbacks
def test_three_nodes_act_as_one_broker(redis, nodes, resp_connect, connect):
    (ws_a, resp_a), (_, resp_b), (ws_c, _) = yield nodes(redis.port, 3)
    watcher = yield redis_connect(redis.port)
    try:
        a = yield resp_connect(resp_a)
        b = yield resp_connect(resp_b)
        c = yield connect(ws_c)
        yield a.call("SUBSCRIBE", "news")
        yield a.call("PSUBSCRIBE", "n*")
        yield a.call("SSUBSCRIBE", "shard")
        assert (yield c.call("SUBSCRIBE", "news")) == [["subscribe", "news", 1]]
        # Each node subscribed in Redis once, whatever its clients hold.
        yield wait_for(
            lambda: redis_answer(watcher, "PUBSUB", "NUMSUB", PREFIX + b"news"),
            [PREFIX + b"news", 2],
            "NUMSUB news",
        )
        assert (yield redis_answer(watcher, "PUBSUB", "NUMPAT")) == 1
        assert (yield redis_answer(watcher, "PUBSUB", "SHARDNUMSUB", PREFIX + b"shard")) == [
            PREFIX + b"shard",
            1,
        ]

        # A publish on B: the count is B's own (none), everyone elsewhere gets it once.
        assert (yield b.call("PUBLISH", "news", "hello")) == [0]
        assert (yield a.next_value()) == [b"message", b"news", b"hello"]
        assert (yield a.next_value()) == [b"pmessage", b"n*", b"news", b"hello"]
        assert (yield c.next_frame()) == ["message", "news", "hello"]
        assert (yield b.call("SPUBLISH", "shard", b"\x00\xff")) == [0]
        assert (yield a.next_value()) == [b"smessage", b"shard", b"\x00\xff"]

        # A publish on A reaches A's own subscriber at once and not again from Redis.
        assert (yield c.call("PUBLISH", "elsewhere", "x")) == [["reply", 0]]
        a_publisher = yield resp_connect(resp_a)
        assert (yield a_publisher.call("PUBLISH", "news", "local")) == [2]
        assert (yield a.next_value()) == [b"message", b"news", b"local"]
        assert (yield a.next_value()) == [b"pmessage", b"n*", b"news", b"local"]
        assert (yield c.next_frame()) == ["message", "news", "local"]

        # One publisher's messages arrive in order, each exactly once.
        for n in range(50):
            b.send("PUBLISH", "news", str(n))
        assert (yield b.drain()) == [0] * 50
        received = []
        for _ in range(100):
            received.append((yield a.next_value()))
        assert [m[-1] for m in received if m[0] == b"message"] == [b"%d" % n for n in range(50)]
        assert [m[-1] for m in received if m[0] == b"pmessage"] == [b"%d" % n for n in range(50)]
        c_received = []
        for _ in range(50):
            c_received.append((yield c.next_frame()))
        assert c_received == [["message", "news", str(n)] for n in range(50)]
        assert (yield a.drain()) == []  # no echo of "local", nothing twice

        # The last local subscriber leaving unsubscribes the node in Redis.
        yield a.call("UNSUBSCRIBE", "news")
        yield wait_for(
            lambda: redis_answer(watcher, "PUBSUB", "NUMSUB", PREFIX + b"news"),
            [PREFIX + b"news", 1],
            "NUMSUB news after A left",
        )
        c.sendClose()
        yield c.closed
        yield wait_for(
            lambda: redis_answer(watcher, "PUBSUB", "NUMSUB", PREFIX + b"news"),
            [PREFIX + b"news", 0],
            "NUMSUB news after C disconnected",
        )
        yield a.abort()
        yield wait_for(
            lambda: redis_answer(watcher, "PUBSUB", "NUMPAT"), 0, "NUMPAT after A disconnected"
        )
        assert (yield redis_answer(watcher, "PUBSUB", "SHARDNUMSUB", PREFIX + b"shard")) == [
            PREFIX + b"shard",
            0,
        ]
        assert (yield health(ws_a))["backplane"]["state"] == "connected"
        response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/metrics" % ws_a)
        metrics = (yield readBody(response)).decode()
        assert 'pubsub_backplane_state{state="connected"} 1.0' in metrics
        assert "pubsub_backplane_sent_total 1.0" in metrics  # "local"
        # One per message, pmessage and smessage from Redis: hello twice (channel
        # and pattern), the shard message, 0-49 twice.
        assert "pubsub_backplane_received_total 103.0" in metrics
    finally:
        yield watcher.abort()


@pytest_twisted.inlineCallbacks
def test_redis_killed_and_restarted_local_delivery_goes_on_then_all_resumes(
    redis, nodes, resp_connect
):
    (ws_a, resp_a), (ws_b, resp_b) = yield nodes(redis.port, 2)
    url = f"redis://127.0.0.1:{redis.port}/"
    subscriber = yield resp_connect(resp_a)
    local_publisher = yield resp_connect(resp_a)
    remote_publisher = yield resp_connect(resp_b)
    yield subscriber.call("SUBSCRIBE", "news")
    watcher = yield redis_connect(redis.port)
    yield wait_for(
        lambda: redis_answer(watcher, "PUBSUB", "NUMSUB", PREFIX + b"news"),
        [PREFIX + b"news", 1],
        "NUMSUB news",
    )
    yield watcher.abort()
    received = []
    assert (yield remote_publisher.call("PUBLISH", "news", "before")) == [0]
    received.append((yield subscriber.next_value()))

    redis.kill()
    for port in (ws_a, ws_b):
        yield wait_for(lambda port=port: backplane_state(port), "down", "state after the kill")
    # Local delivery goes on; the publisher is told it went no further.
    [error] = yield local_publisher.call("PUBLISH", "news", "local")
    assert isinstance(error, RespError)
    assert str(error) == f"BACKPLANE {url} is down: delivered to 1 local subscriber only"
    received.append((yield subscriber.next_value()))
    [error] = yield remote_publisher.call("PUBLISH", "news", "lost")
    assert str(error) == f"BACKPLANE {url} is down: delivered to 0 local subscribers only"

    redis.start()
    for port in (ws_a, ws_b):
        yield wait_for(lambda port=port: backplane_state(port), "connected", "state after restart")
    watcher = yield redis_connect(redis.port)
    yield wait_for(
        lambda: redis_answer(watcher, "PUBSUB", "NUMSUB", PREFIX + b"news"),
        [PREFIX + b"news", 1],
        "NUMSUB news after the restart",
    )
    yield watcher.abort()
    for n in range(20):
        remote_publisher.send("PUBLISH", "news", f"after-{n}")
    assert (yield remote_publisher.drain()) == [0] * 20
    for _ in range(20):
        received.append((yield subscriber.next_value()))
    assert (yield subscriber.drain()) == []  # nothing twice, nothing late
    assert [m[2] for m in received] == [b"before", b"local"] + [b"after-%d" % n for n in range(20)]
    body = yield health(ws_b)
    assert body["backplane"]["url"] == url


@pytest_twisted.inlineCallbacks
def test_cluster_workers_share_the_ports_and_act_as_one_broker(redis, tmp_path, resp_connect):
    process = Node(workers=2)
    args = [CLUSTER, "--workers", "2", "--port", "0", "--resp-port", "0"]
    args += ["--backplane", f"redis://127.0.0.1:{redis.port}/"]
    transport = reactor.spawnProcess(
        process, CLUSTER, args, env=clean_environment(), path=str(tmp_path)
    )
    try:
        _, resp_port = yield process.listening.addTimeout(60, reactor)
        subscribers = []
        for _ in range(16):
            client = yield resp_connect(resp_port)
            yield client.call("SUBSCRIBE", "news")
            subscribers.append(client)
        # The kernel spread the connections: both workers subscribed in Redis.
        watcher = yield redis_connect(redis.port)
        yield wait_for(
            lambda: redis_answer(watcher, "PUBSUB", "NUMSUB", PREFIX + b"news"),
            [PREFIX + b"news", 2],
            "NUMSUB news with two workers",
        )
        yield watcher.abort()
        publisher = yield resp_connect(resp_port)
        [local] = yield publisher.call("PUBLISH", "news", "to all")
        assert 0 < local < 16  # this worker's own subscribers
        for client in subscribers:
            assert (yield client.next_value()) == [b"message", b"news", b"to all"]
            assert (yield client.drain()) == []
    finally:
        if not process.ended.called:
            transport.signalProcess("TERM")
    exit_code = yield process.ended.addTimeout(60, reactor)
    output = process.output.decode(errors="replace")
    assert exit_code == 0, output
    assert output.count("Server Shut Down") == 2, output
    assert "Traceback" not in output


def test_cluster_refuses_to_run_workers_without_a_backplane(tmp_path):
    result = subprocess.run(
        [CLUSTER, "--workers", "2", "--port", "0"],
        capture_output=True,
        text=True,
        env=clean_environment(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "pubsub-cluster: workers need a backplane" in result.stderr


def test_twistd_refuses_a_bad_backplane_url_with_a_clear_message(tmp_path):
    result = run_twistd(tmp_path, "--port", LOCAL, "--backplane", "http://127.0.0.1:6379/")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert (
        "pubsub: setting backplane: backplane URL must start with redis://, "
        "got 'http://127.0.0.1:6379/'" in output
    )
    assert "Traceback" not in output
