"""pubsub.client's recovery against a real server: a steady publisher, the
client's connection cut from the server's side, and the client back by itself.

The client reconnects on its own; its token function is where a test makes
it late: a reconnect waits until the publisher has sent more, so that every
cut misses messages the RESUME must bring back. The Twisted host runs on the
test's reactor, the asyncio host on a loop of its own in a worker thread (as
in test_client.py), reaching the reactor through blockingCallFromThread.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher

from pubsub.client import CONNECTED, Message, Recovery, RecoveryFailed
from pubsub.client import asyncio as aio
from pubsub.client.twisted import connect as twisted_connect
from tests.integration.test_backplane import wait_for
from tests.integration.test_client import WAIT, in_own_loop, state_reached, url
from tests.integration.test_metrics import figure, scrape
from tests.integration.test_recovery import CHANNEL, COUNT, SteadyPublisher
from tests.support.proxy import TcpProxy

LOST = "messages after the position are no longer kept"
STOPS = (40, 110, 200)  # how many messages the client has when its connection is cut


@pytest.fixture
def open_client():
    """pubsub.client.twisted.connect, quick to reconnect; every client closed after the test."""
    clients = []

    @defer.inlineCallbacks
    def open_(*args, **kwargs):
        client = yield twisted_connect(*args, min_delay=0.01, max_delay=0.05, **kwargs)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        pytest_twisted.blockon(client.close())


def cut(server) -> None:
    """The server drops the one subscribed connection, without a close frame."""
    [connection] = [c for c in server.factory.connections if c._subscribed()]
    connection.transport.abortConnection()


class Collector:
    """Messages in arrival order; ``until(n)`` fires once there are ``n``."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)
        for waiting in [w for w in self._waiting if w[0] <= len(self.messages)]:
            self._waiting.remove(waiting)
            waiting[1].callback(None)

    def until(self, count: int) -> defer.Deferred:
        if len(self.messages) >= count:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((count, d))
        return d.addTimeout(WAIT, reactor)


def assert_every_message_once_in_order(messages: list[Message]) -> None:
    assert [m.data for m in messages] == [str(n) for n in range(COUNT)]
    [epoch] = {m.position[0] for m in messages}
    assert [m.position for m in messages] == [(epoch, n) for n in range(1, COUNT + 1)]


@pytest_twisted.inlineCallbacks
def test_twisted_client_cut_off_gets_every_message_once_in_order(make_server, connect, open_client):
    server = yield make_server(history_channels="chat.*", history_size=COUNT)
    publishing: list[SteadyPublisher] = []

    def late_token():
        """No token, once the publisher has sent five more (when it runs)."""
        if not publishing:
            return None
        return publishing[0].sent_more(5).addCallback(lambda _: None)

    client = yield open_client(url(server), token=late_token)
    failures: list[RecoveryFailed] = []
    client.on_recovery_failed(failures.append)
    received = Collector()
    # Nothing published yet: the channel's history is at its start.
    assert (yield client.resume(CHANNEL, handler=received)) == Recovery(
        CHANNEL, True, None, ("", 0)
    )
    publishing.append(SteadyPublisher((yield connect(server.port)), COUNT))
    for stop in STOPS:
        yield received.until(stop)
        back = state_reached(client, CONNECTED)
        cut(server)
        yield back
    yield publishing[0].done
    yield received.until(COUNT)
    assert failures == []
    assert_every_message_once_in_order(received.messages)
    samples = yield scrape(server.port)
    assert figure(samples, "pubsub_recoveries_total", result="recovered") == len(STOPS)
    assert figure(samples, "pubsub_recoveries_total", result="failed") == 0


@pytest_twisted.inlineCallbacks
def test_twisted_client_is_told_of_a_gap_the_history_cannot_fill(make_server, connect, open_client):
    server = yield make_server(history_channels="chat.*", history_size=5)
    publisher = yield connect(server.port)
    away = []  # set while a cut should miss more than the history keeps

    @defer.inlineCallbacks
    def late_token():
        """No token, once 20 were published while away (the history keeps 5)."""
        if away:
            away.clear()
            for number in range(20):
                publisher.send("PUBLISH", CHANNEL, f"missed {number}")
            yield publisher.drain()

    client = yield open_client(url(server), token=late_token)
    failed: defer.Deferred = defer.Deferred()
    remove = client.on_recovery_failed(failed.callback)
    received = defer.DeferredQueue()
    yield client.resume(CHANNEL, handler=received.put)
    yield publisher.call("PUBLISH", CHANNEL, "0")
    [epoch, offset] = (yield received.get()).position
    assert offset == 1
    away.append(True)
    cut(server)
    assert (yield failed.addTimeout(WAIT, reactor)) == RecoveryFailed(CHANNEL, LOST, (epoch, 21))
    yield publisher.call("PUBLISH", CHANNEL, "live")
    assert (yield received.get()) == Message("message", CHANNEL, "live", None, (epoch, 22))
    # With no callback, a failed recovery is logged: never silent.
    remove()
    warnings = []

    def observe(event):
        if event.get("log_format", "").startswith("recovering"):
            warnings.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        back = state_reached(client, CONNECTED)
        away.append(True)
        cut(server)
        yield back
        yield client.ping()  # behind the RESUME's answer
    finally:
        globalLogPublisher.removeObserver(observe)
    [warning] = warnings
    assert (warning["channel"], warning["reason"]) == (CHANNEL, LOST)
    yield publisher.call("PUBLISH", CHANNEL, "after")
    assert (yield received.get()).data == "after"


@pytest_twisted.inlineCallbacks
def test_twisted_client_resumes_from_a_position_and_without_history(
    make_server, connect, open_client
):
    server = yield make_server(history_channels="chat.*", history_size=COUNT)
    publisher = yield connect(server.port)
    for number in range(1, 6):
        publisher.send("PUBLISH", CHANNEL, str(number))
    *_, [_, _, where, _] = yield publisher.call("HISTORY", CHANNEL, "0")
    epoch = where["epoch"]
    client = yield open_client(url(server))
    received = defer.DeferredQueue()
    recovery = yield client.resume(CHANNEL, handler=received.put, position=(epoch, 3))
    assert recovery == Recovery(CHANNEL, True, None, (epoch, 5))
    # The replay came before the answer.
    assert (yield received.get()) == Message("message", CHANNEL, "4", None, (epoch, 4))
    assert (yield received.get()) == Message("message", CHANNEL, "5", None, (epoch, 5))
    # A channel without history has no position, and says so.
    assert (yield client.resume("plain", handler=received.put)) == Recovery(
        "plain", True, None, None
    )
    assert (yield client.publish("plain", "x")) == 1
    assert (yield received.get()) == Message("message", "plain", "x")


@pytest_twisted.inlineCallbacks
def test_twisted_client_is_told_of_what_its_node_lost_while_cut_off_from_redis(
    redis, make_node, connect, open_client
):
    """The client stays connected; its node's link to Redis does not, while
    more is published than the history keeps: the node fills what it can,
    and the client is told of the rest before the messages after it."""
    proxy = TcpProxy(redis.port)
    yield proxy.start()
    try:
        a = yield make_node(f"redis://127.0.0.1:{redis.port}/", history_size=5)
        b = yield make_node(f"redis://127.0.0.1:{proxy.port}/", history_size=5)
        client = yield open_client(url(b))
        failed: defer.Deferred = defer.Deferred()
        client.on_recovery_failed(failed.callback)
        received = defer.DeferredQueue()
        yield client.resume(CHANNEL, handler=received.put)
        publisher = yield connect(a.port)
        yield publisher.call("PUBLISH", CHANNEL, "before")
        [epoch, offset] = (yield received.get()).position
        assert offset == 1
        proxy.hold()
        proxy.reset()
        backplane = b.resource.health.backplane
        yield wait_for(lambda: defer.succeed(backplane.state), "down", "B's backplane")
        for number in range(20):
            yield publisher.call("PUBLISH", CHANNEL, f"meanwhile {number}")
        proxy.release()
        # Back, B reads the last 5 (offsets 17 to 21); 2 to 16 are gone.
        gap = f"messages 2 to 16 of epoch {epoch} never arrived"
        assert (yield failed.addTimeout(WAIT, reactor)) == RecoveryFailed(CHANNEL, gap, (epoch, 17))
        filled = yield defer.gatherResults([received.get() for _ in range(5)])
        assert [(m.data, m.position) for m in filled] == [
            (f"meanwhile {n}", (epoch, n + 2)) for n in range(15, 20)
        ]
        samples = yield scrape(b.port)
        assert figure(samples, "pubsub_history_missed_total", result="lost") == 15
        assert figure(samples, "pubsub_history_missed_total", result="filled") == 5
    finally:
        yield proxy.stop()


# -- asyncio --------------------------------------------------------------------------------


def on_reactor(function, *args):
    """``function(*args)`` on the reactor, from a worker thread; its result
    (a Deferred's, once it fires)."""
    return threads.blockingCallFromThread(reactor, function, *args)


async def _asyncio_cut_off(address: str, publishing: list, start, cut_now):
    async def late_token():
        """No token, once the publisher has sent five more (when it runs),
        waited for in a thread of its own so that the loop goes on meanwhile."""
        if publishing:
            await asyncio.to_thread(on_reactor, publishing[0].sent_more, 5)

    client = await aio.connect(address, token=late_token, min_delay=0.01, max_delay=0.05)
    failures: list[RecoveryFailed] = []
    client.on_recovery_failed(failures.append)
    stream = client.messages()
    recovery = await client.resume(CHANNEL)
    await asyncio.to_thread(on_reactor, start)
    received = []
    for stop in (*STOPS, COUNT):
        while len(received) < stop:
            received.append(await anext(stream))
        if stop != COUNT:
            await asyncio.to_thread(on_reactor, cut_now)
    await client.close()
    return recovery, received, failures


@pytest_twisted.inlineCallbacks
def test_asyncio_client_cut_off_gets_every_message_once_in_order(make_server, connect):
    server = yield make_server(history_channels="chat.*", history_size=COUNT)
    publisher = yield connect(server.port)
    publishing: list[SteadyPublisher] = []

    def start():
        publishing.append(SteadyPublisher(publisher, COUNT))

    recovery, received, failures = yield in_own_loop(
        _asyncio_cut_off, url(server), publishing, start, lambda: cut(server)
    )
    assert recovery == Recovery(CHANNEL, True, None, ("", 0))
    assert failures == []
    assert_every_message_once_in_order(received)
    samples = yield scrape(server.port)
    assert figure(samples, "pubsub_recoveries_total", result="recovered") == len(STOPS)


async def _asyncio_gap(address: str, publish, miss_many, cut_now):
    away = asyncio.Event()

    async def late_token():
        """No token, once many were published while away."""
        if away.is_set():
            away.clear()
            await asyncio.to_thread(on_reactor, miss_many)

    client = await aio.connect(address, token=late_token, min_delay=0.01, max_delay=0.05)
    failed = asyncio.get_running_loop().create_future()

    async def told(failure):  # a coroutine function runs as a task
        failed.set_result(failure)

    client.on_recovery_failed(told)
    stream = client.messages()
    await client.resume(CHANNEL)
    await asyncio.to_thread(on_reactor, publish, "0")
    first = await anext(stream)
    away.set()
    await asyncio.to_thread(on_reactor, cut_now)
    failure = await failed
    await asyncio.to_thread(on_reactor, publish, "live")
    live = await anext(stream)
    await client.close()
    return first, failure, live


@pytest_twisted.inlineCallbacks
def test_asyncio_client_is_told_of_a_gap_the_history_cannot_fill(make_server, connect):
    server = yield make_server(history_channels="chat.*", history_size=5)
    publisher = yield connect(server.port)

    def publish(text):
        return publisher.call("PUBLISH", CHANNEL, text)

    def miss_many():
        for number in range(20):  # 20 missed, the history keeps 5
            publisher.send("PUBLISH", CHANNEL, f"missed {number}")
        return publisher.drain()

    first, failure, live = yield in_own_loop(
        _asyncio_gap, url(server), publish, miss_many, lambda: cut(server)
    )
    epoch = first.position[0]
    assert first == Message("message", CHANNEL, "0", None, (epoch, 1))
    assert failure == RecoveryFailed(CHANNEL, LOST, (epoch, 21))
    assert live == Message("message", CHANNEL, "live", None, (epoch, 22))
