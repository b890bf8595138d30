"""Recovery with real processes: a steady publisher, a subscriber cut off and
let back, and the checks that every message arrived once and in order, or
that the gap was reported.

- :class:`SteadyPublisher`: a real RESP client of a node, publishing
  ``"0"``, ``"1"``, ... on one channel and counting the node's replies;
- :class:`Subscriber`: the Twisted Python client (``pubsub.client.twisted``)
  RESUMEing the channel, with every message, every ``RecoveryFailed`` and
  its state changes as Deferreds;
- :func:`cut_off`: cut the subscriber off (a ``sever`` of the caller's:
  reset the proxy, silence it, ...), wait until it notices, until the
  publisher has had more messages acknowledged while it is away, then let
  it back through the proxy (tests/support/proxy.py), which holds its new
  connections meanwhile;
- :class:`Rig`: the processes, proxies and clients of a test, stopped after it.

Every wait is on an event, a count of messages or of replies, bounded by
:data:`WAIT`; nothing here sleeps. The nodes are addresses (a proxy
forwards to a port), so the same scenarios can run with two nodes on a
backplane, the subscriber coming back to the other node: give
:func:`cut_off` a ``meanwhile`` that calls ``proxy.forward_to``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

from pubsub.client import CONNECTED, DISCONNECTED, Message, RecoveryFailed
from pubsub.client.twisted import connect as twisted_connect
from tests.support.processes import TwistdNode
from tests.support.proxy import TcpProxy
from tests.support.resp3 import RespParser, command

__all__ = [
    "WAIT",
    "Cut",
    "Rig",
    "SteadyPublisher",
    "Subscriber",
    "assert_every_message_once_in_order",
    "cut_off",
]

#: Seconds any one wait may take before it fails the test: a bound on hangs
#: (loaded CI machines included), never a delay.
WAIT = 30.0


def _bounded(d: defer.Deferred, what: str) -> defer.Deferred:
    """``d``, failing with AssertionError naming ``what`` after :data:`WAIT` seconds."""

    def timed_out(failure: Any) -> Any:
        failure.trap(defer.TimeoutError)
        raise AssertionError(f"{what}: not within {WAIT:g} s")

    return d.addTimeout(WAIT, reactor).addErrback(timed_out)


class _Counted:
    """Deferreds that fire once a count reaches what each waits for."""

    def __init__(self) -> None:
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def wait(self, count: int, now: int, what: str) -> defer.Deferred:
        if now >= count:
            return defer.succeed(now)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((count, d))
        return _bounded(d, what)

    def reached(self, now: int) -> None:
        for waiting in [w for w in self._waiting if w[0] <= now]:
            self._waiting.remove(waiting)
            waiting[1].callback(now)

    def fail(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(error)


# -- the publisher -----------------------------------------------------------------------


class _Replies(protocol.Protocol):
    def __init__(self, publisher: SteadyPublisher) -> None:
        self.publisher = publisher
        self.parser = RespParser()
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed(data)
        while (frame := self.parser.gets()) is not None:
            self.publisher._replied(frame.value)

    def connectionLost(self, reason: Any = None) -> None:
        self.publisher._lost()
        self.lost.callback(None)


class _RepliesFactory(protocol.Factory):
    noisy = False

    def __init__(self, publisher: SteadyPublisher) -> None:
        self.publisher = publisher

    def buildProtocol(self, addr: Any) -> _Replies:
        return _Replies(self.publisher)


class SteadyPublisher:
    """Publishes ``"0"``, ``"1"``, ... on ``channel`` over RESP, one every
    ``interval`` seconds, until :meth:`stop`; :attr:`acked` counts the node's
    replies (receiver counts).

    The pace keeps the traffic bounded and steady; no check depends on it,
    since the tests wait for counts of replies. Past ``limit`` messages it
    stops by itself, and whatever waits for more fails: a scenario that
    hangs must not publish forever.
    """

    def __init__(self, channel: str, interval: float = 0.004, limit: int = 4000) -> None:
        self.channel = channel
        self.interval = interval
        self.limit = limit
        self.sent = 0
        self.acked = 0
        self._acks = _Counted()
        self._connection: _Replies | None = None
        self._loop = task.LoopingCall(self._publish_next)
        self._loop.clock = reactor
        self._stopped = False
        self._error: Exception | None = None

    @defer.inlineCallbacks
    def start(self, port: int):
        """Connect to the RESP port ``port`` and start publishing; fires with itself."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
        self._connection = yield endpoint.connect(_RepliesFactory(self))
        self._loop.start(self.interval, now=True)
        return self

    def _publish_next(self) -> None:
        if self.sent >= self.limit:
            self._halt(AssertionError(f"the publisher reached its limit of {self.limit} messages"))
            return
        assert self._connection is not None
        self._connection.transport.write(command("PUBLISH", self.channel, str(self.sent)))
        self.sent += 1

    def _halt(self, error: Exception | None = None) -> None:
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if error is not None and self._error is None:
            self._error = error
            self._acks.fail(error)

    def _replied(self, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            self._halt(AssertionError(f"PUBLISH {self.acked} was answered {value!r}"))
            return
        self.acked += 1
        self._acks.reached(self.acked)

    def _lost(self) -> None:
        if self.acked < self.sent or not self._stopped:
            self._halt(ConnectionError(f"the publisher's connection was lost at {self.acked}"))

    def until_acked(self, count: int) -> defer.Deferred:
        """Fires once ``count`` messages in all have been acknowledged."""
        if self._error is not None:
            return defer.fail(self._error)
        if self._stopped and count > self.sent:
            return defer.fail(AssertionError("the publisher has stopped"))
        return self._acks.wait(count, self.acked, f"{count} publishes acknowledged")

    def acked_more(self, count: int) -> defer.Deferred:
        """Fires once ``count`` more messages than now have been acknowledged."""
        return self.until_acked(self.acked + count)

    @defer.inlineCallbacks
    def stop(self):
        """Stop publishing; fires with how many were published, once the node
        has acknowledged them all."""
        self._halt()
        if self._error is not None:
            raise self._error
        yield self._acks.wait(self.sent, self.acked, f"all {self.sent} publishes acknowledged")
        return self.sent

    def close(self) -> defer.Deferred:
        self._halt()
        if self._connection is None or self._connection.lost.called:
            return defer.succeed(None)
        self._connection.transport.loseConnection()
        return self._connection.lost


# -- the subscriber ----------------------------------------------------------------------


class Subscriber:
    """A ``pubsub.client.twisted`` client that RESUMEd ``channel``: the
    messages in the order they arrived (across reconnects), the
    ``RecoveryFailed`` it was told of, and its state changes."""

    def __init__(self, client: Any, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.messages: list[Message] = []
        self.failures: list[RecoveryFailed] = []
        self._messages = _Counted()
        self._failures = _Counted()
        client.on_recovery_failed(self._failed)

    @classmethod
    @defer.inlineCallbacks
    def connect(cls, url: str, channel: str, **options: Any):
        """Connect to ``url`` (quick to reconnect, unless told otherwise) and
        RESUME ``channel``; fires with the subscriber, whose ``resumed`` is
        the first RESUME's answer."""
        options.setdefault("min_delay", 0.01)
        options.setdefault("max_delay", 0.2)
        options.setdefault("timeout", WAIT)
        client = yield twisted_connect(url, **options)
        subscriber = cls(client, channel)
        subscriber.resumed = yield client.resume(channel, handler=subscriber._received)
        return subscriber

    def _received(self, message: Message) -> None:
        self.messages.append(message)
        self._messages.reached(len(self.messages))

    def _failed(self, failure: RecoveryFailed) -> None:
        self.failures.append(failure)
        self._failures.reached(len(self.failures))

    def until(self, count: int) -> defer.Deferred:
        """Fires once ``count`` messages have arrived in all."""
        return self._messages.wait(count, len(self.messages), f"{count} messages received")

    def failed(self, count: int = 1) -> defer.Deferred:
        """Fires with :attr:`failures` once the client has been told of
        ``count`` failed recoveries in all."""
        d = self._failures.wait(count, len(self.failures), f"{count} recovery failures")
        return d.addCallback(lambda _: list(self.failures))

    def next_state(self, wanted: str) -> defer.Deferred:
        """Fires with the reason once the client next enters state ``wanted``."""
        d: defer.Deferred = defer.Deferred()

        def changed(state: str, reason: str | None) -> None:
            if state == wanted and not d.called:
                remove()
                d.callback(reason)

        remove = self.client.on_state(changed)
        return _bounded(d, f"the subscriber {wanted}")

    def close(self) -> defer.Deferred:
        return self.client.close()


# -- a cut -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """One cut, as it went: ``reason`` is why the client says its connection
    ended, ``received`` how many messages it had then; ``acked_lost`` and
    ``acked_back`` are how many the publisher had had acknowledged when the
    client noticed, and when the proxy let it back."""

    reason: str | None
    received: int
    acked_lost: int
    acked_back: int

    @property
    def missed(self) -> int:
        """Messages the node had taken before the client was let back and the
        client did not have: the history's to bring."""
        return self.acked_back - self.received

    @property
    def published_away(self) -> int:
        """Messages published (and acknowledged) while the client was away."""
        return self.acked_back - self.acked_lost


@defer.inlineCallbacks
def cut_off(
    subscriber: Subscriber,
    publisher: SteadyPublisher,
    proxy: TcpProxy,
    sever: Callable[[], Any],
    away: int,
    *,
    heal: bool = False,
    meanwhile: Callable[[], Any] | None = None,
):
    """Cut ``subscriber`` off with ``sever()``, and let it back once it has
    noticed and the node has acknowledged ``away`` more messages than it
    had received: messages it can only get from the history, since the
    proxy holds its new connections meanwhile (however fast it retries, it
    cannot come back earlier). ``heal`` ends a silence of the proxy first
    (resetting the connections it held), and ``meanwhile`` runs before the
    wait (another node's address for the proxy, say). Fires with the
    :class:`Cut` once the client is connected again, its RESUME sent."""
    proxy.hold()
    lost = subscriber.next_state(DISCONNECTED)
    yield defer.maybeDeferred(sever)
    reason = yield lost
    received, acked = len(subscriber.messages), publisher.acked
    if meanwhile is not None:
        yield defer.maybeDeferred(meanwhile)
    yield publisher.until_acked(max(received + away, acked + 1))
    # Nothing reached the client while it was away: the proxy held it.
    assert len(subscriber.messages) == received, "messages arrived while the client was away"
    back = subscriber.next_state(CONNECTED)
    if heal:
        proxy.heal()
    proxy.release()
    cut = Cut(reason, received, acked, publisher.acked)
    yield back
    return cut


# -- checks ------------------------------------------------------------------------------


def _describe(got: list, wanted: list) -> str:
    """What is wrong with ``got`` as a copy of ``wanted``, briefly."""
    counts = Counter(got)
    missing = [item for item in wanted if item not in counts]
    twice = sorted({item for item, n in counts.items() if n > 1}, key=wanted.index)
    extra = [item for item in counts if item not in set(wanted)]
    first = next((i for i, (a, b) in enumerate(zip(got, wanted, strict=False)) if a != b), None)
    return (
        f"{len(got)} messages, {len(wanted)} wanted; missing {missing[:20]}, "
        f"twice {twice[:20]}, unexpected {extra[:20]}, first difference at {first}"
    )


def assert_every_message_once_in_order(messages: list[Message], total: int) -> None:
    """Messages ``"0"`` to ``str(total - 1)``, each once, in order, at offsets
    1 to ``total`` of one epoch."""
    data = [m.data for m in messages]
    wanted = [str(n) for n in range(total)]
    assert data == wanted, _describe(data, wanted)
    epochs = {m.position[0] for m in messages if m.position is not None}
    assert len(epochs) == 1, epochs
    [epoch] = epochs
    assert [m.position for m in messages] == [(epoch, n) for n in range(1, total + 1)]


# -- the processes of a test -------------------------------------------------------------


class Rig:
    """The nodes, proxies and clients of one test; :meth:`close` ends them
    all, clients first, and fails if a node logged a traceback."""

    def __init__(self, cwd: str) -> None:
        self.cwd = cwd
        self.nodes: list[TwistdNode] = []
        self.proxies: list[TcpProxy] = []
        self.publishers: list[SteadyPublisher] = []
        self.subscribers: list[Subscriber] = []

    @defer.inlineCallbacks
    def node(self, *options: str):
        """A ``twistd pubsub`` node with ``options``, started."""
        node = TwistdNode(*options, cwd=self.cwd)
        self.nodes.append(node)
        yield node.start()
        return node

    @defer.inlineCallbacks
    def proxy(self, port: int):
        """A proxy to 127.0.0.1:``port``, started."""
        proxy = TcpProxy(port)
        self.proxies.append(proxy)
        yield proxy.start()
        return proxy

    def publisher(self, resp_port: int, channel: str, **options: Any) -> defer.Deferred:
        """A :class:`SteadyPublisher` publishing to the node's RESP port."""
        publisher = SteadyPublisher(channel, **options)
        self.publishers.append(publisher)
        return publisher.start(resp_port)

    def subscriber(self, url: str, channel: str, **options: Any) -> defer.Deferred:
        """A :class:`Subscriber` of ``url``, having RESUMEd ``channel``."""
        d = Subscriber.connect(url, channel, **options)
        return d.addCallback(lambda subscriber: self.subscribers.append(subscriber) or subscriber)

    @defer.inlineCallbacks
    def close(self):
        errors = []
        steps = [lambda s=s: _bounded(s.close(), "closing a subscriber") for s in self.subscribers]
        steps += [lambda p=p: _bounded(p.close(), "closing a publisher") for p in self.publishers]
        steps += [lambda p=p: p.stop() for p in self.proxies]
        steps += [lambda n=n: n.stop() for n in self.nodes]
        for step in steps:
            try:
                yield step()
            except Exception as error:  # noqa: BLE001 - every step runs; the first error is raised
                errors.append(error)
        tracebacks = [node.output for node in self.nodes if "Traceback" in node.output]
        assert not tracebacks, "\n----\n".join(tracebacks)
        if errors:
            raise errors[0]
