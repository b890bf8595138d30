"""Recovery over real sockets: a steady publisher, subscribers cut off and back.

Every message arrives exactly once and in order across the cuts, whichever
side cuts; when the history no longer holds what was missed, the client is
told, never left with a silent gap.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from pubsub.core.history import MESSAGE_OVERHEAD
from tests.integration.test_metrics import figure, scrape

CHANNEL = "chat.room"
COUNT = 300


class Reader:
    """A subscriber that keeps the last position it saw and resumes from it."""

    def __init__(self, connect, port: int) -> None:
        self._connect = connect
        self._port = port
        self.payloads: list[str] = []
        self.failures: list[list] = []
        self.position: dict | None = None
        self.client = None
        #: Messages that came in RESUME's answers: missed, then recovered.
        self.replayed = 0

    @defer.inlineCallbacks
    def join(self):
        """Connect and RESUME (from the last position, once there is one);
        fires once the answer, missed messages included, is read."""
        self.client = yield self._connect(self._port)
        if self.position is None:
            self.client.send("RESUME", CHANNEL)
        else:
            where = self.position
            self.client.send("RESUME", CHANNEL, where["epoch"], str(where["offset"]))
        while (kind := (yield self._read())) not in ("position", "recovery_failed"):
            self.replayed += kind == "message"

    @defer.inlineCallbacks
    def read_until(self, count: int):
        """Read this connection's frames until ``count`` payloads in all."""
        while len(self.payloads) < count:
            yield self._read()

    @defer.inlineCallbacks
    def _read(self):
        frame = yield self.client.next_frame()
        kind = frame[0]
        if kind == "message":
            self.payloads.append(frame[2])
            self.position = frame[3]
        elif kind == "position":
            self.position = frame[2]
        elif kind == "recovery_failed":
            self.failures.append(frame)
            self.position = frame[2]
        return kind

    def cut(self) -> defer.Deferred:
        """Drop the connection as a failing network would: no close frame."""
        client, self.client = self.client, None
        client.dropConnection(abort=True)
        return client.closed


class SteadyPublisher:
    """Publishes ``count`` numbered messages, one every 2 ms."""

    def __init__(self, client, count: int) -> None:
        self.sent = 0
        self._client = client
        self._count = count
        self._waiting: list[tuple[int, defer.Deferred]] = []
        self._loop = task.LoopingCall(self._publish_next)
        self._loop.clock = reactor
        self.done = self._loop.start(0.002)

    def _publish_next(self) -> None:
        if self.sent == self._count:
            self._loop.stop()
            return
        self._client.send("PUBLISH", CHANNEL, str(self.sent))
        self.sent += 1
        for waiting in [w for w in self._waiting if w[0] <= self.sent]:
            self._waiting.remove(waiting)
            waiting[1].callback(None)

    def sent_more(self, count: int) -> defer.Deferred:
        """Fires once ``count`` more messages are sent (at once if it is done)."""
        wanted = min(self.sent + count, self._count)
        if self.sent >= wanted:
            return defer.succeed(None)
        waiting: defer.Deferred = defer.Deferred()
        self._waiting.append((wanted, waiting))
        return waiting


@pytest.mark.parametrize("side", ["client", "server"])
@pytest_twisted.inlineCallbacks
def test_a_subscriber_cut_off_and_back_gets_every_message_once_in_order(make_server, connect, side):
    server = yield make_server(history_channels="chat.*", history_size=COUNT)
    reader = Reader(connect, server.port)
    yield reader.join()
    publisher = SteadyPublisher((yield connect(server.port)), COUNT)
    for stop in (40, 110, 200):
        yield reader.read_until(stop)
        if side == "client":
            yield reader.cut()
        else:  # a proxy restarting, a balancer's timeout: the server's side drops it
            [connection] = [c for c in server.factory.connections if c._subscribed()]
            closed = reader.client.closed
            connection.transport.abortConnection()
            yield closed
        yield publisher.sent_more(5)  # missed while away
        yield reader.join()
    yield publisher.done
    yield reader.read_until(COUNT)
    assert reader.failures == []
    assert reader.payloads == [str(n) for n in range(COUNT)]
    assert reader.replayed > 0  # the cuts did miss messages


@pytest_twisted.inlineCallbacks
def test_a_gap_the_history_cannot_fill_is_reported_not_silent(make_server, connect):
    server = yield make_server(history_channels="chat.*", history_size=5)
    reader = Reader(connect, server.port)
    yield reader.join()
    publisher = yield connect(server.port)
    yield publisher.call("PUBLISH", CHANNEL, "0")
    yield reader.read_until(1)
    yield reader.cut()
    for number in range(1, 21):  # 20 missed, the history keeps 5
        publisher.send("PUBLISH", CHANNEL, str(number))
    yield publisher.drain()
    yield reader.join()
    yield publisher.call("PUBLISH", CHANNEL, "21")
    yield reader.read_until(2)
    [[kind, channel, position, reason]] = reader.failures
    assert (kind, channel, position["offset"]) == ("recovery_failed", CHANNEL, 21)
    assert reason == "messages after the position are no longer kept"
    assert reader.payloads == ["0", "21"]  # the live ones go on
    samples = yield scrape(server.port)
    assert figure(samples, "pubsub_recoveries_total", result="failed") == 1
    assert figure(samples, "pubsub_recoveries_total", result="recovered") == 0
    assert figure(samples, "pubsub_history_messages") == 5
    assert figure(samples, "pubsub_history_channels") == 1
    assert (
        figure(samples, "pubsub_history_bytes")
        == sum(len(str(n)) for n in range(17, 22)) + 5 * MESSAGE_OVERHEAD
    )
    assert figure(samples, "pubsub_history_evicted_total") == 0
