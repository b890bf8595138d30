"""The test suites' one Twisted RESP2/RESP3 client, for redis-server and this server alike.

The RESP counterpart of :mod:`tests.support.wsclient`: :meth:`RespClient.call`
sends a command and collects everything up to a PING marker, so a test sees
exactly what that command produced.  Everything received is parsed by the suite's
one RESP parser (:mod:`tests.support.resp3`) into :class:`~tests.support.resp3.Frame`
objects: :meth:`~RespClient.call`, :meth:`~RespClient.drain` and
:meth:`~RespClient.next_value` hand out their typed values, and
:meth:`~RespClient.call_frames`, :meth:`~RespClient.drain_frames` and
:meth:`~RespClient.next_frame` the whole frames, exact bytes included.

It runs inside the reactor, so it can talk to the in-process server, which a
blocking client would deadlock.  Every read gives up after :attr:`RespClient.timeout`
seconds, so a server that never answers fails the test instead of hanging it.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests.support.resp3 import Frame, RespError, RespParser, command

__all__ = ["CLOSED", "RespClient", "connect"]

#: What a read gets once the connection has closed (and every read after it).
CLOSED: Any = object()

_markers = itertools.count(1)


def _value(frame: Any) -> Any:
    return frame if frame is CLOSED else frame.value


class RespClient(protocol.Protocol):
    """Every frame received goes, parsed, into ``frames`` (then :data:`CLOSED`
    once the connection ends); ``closed`` fires with why it ended
    (ConnectionDone, ConnectionLost, ...), as a value."""

    #: Seconds a read may wait for a frame before it fails with TimeoutError.
    timeout = 10.0

    def __init__(self) -> None:
        self.parser = RespParser()
        self.frames: defer.DeferredQueue = defer.DeferredQueue()
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed(data)
        while (frame := self.parser.gets()) is not None:
            self.frames.put(frame)

    def connectionLost(self, reason: Any = None) -> None:
        self.frames.put(CLOSED)
        self.closed.callback(getattr(reason, "value", reason))

    # -- sending ---------------------------------------------------------------------------

    def send(self, *args: bytes | str | int) -> None:
        """Send one command (str arguments as UTF-8, ints in decimal)."""
        self.transport.write(command(*args))

    def write(self, data: bytes) -> None:
        """Raw bytes, exactly as given."""
        self.transport.write(data)

    def close(self) -> defer.Deferred:
        """Close cleanly; fires as ``closed`` does."""
        self.transport.loseConnection()
        return self.closed

    def abort(self) -> defer.Deferred:
        """Drop the connection at once (no FIN); fires as ``closed`` does."""
        self.transport.abortConnection()
        return self.closed

    # -- receiving -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def next_frame(self, timeout: float | None = None):
        """Fires with the next frame, or :data:`CLOSED` once the connection has
        ended; fails with TimeoutError after ``timeout`` (default :attr:`timeout`)
        seconds without one."""
        frame = yield self.frames.get().addTimeout(
            self.timeout if timeout is None else timeout, reactor
        )
        if frame is CLOSED:
            self.frames.put(CLOSED)  # every later read gets it too
        return frame

    def next_value(self, timeout: float | None = None) -> defer.Deferred:
        """:meth:`next_frame`'s value (or :data:`CLOSED`)."""
        return self.next_frame(timeout).addCallback(_value)

    @defer.inlineCallbacks
    def drain_frames(self):
        """Every frame received and not yet read, up to a fresh PING marker.

        The marker comes back as a bulk string, or in RESP2 while subscribed as
        ``["pong", marker]``.  Fails with ConnectionError if the connection
        closes first."""
        marker = b"#resp-sync-%d" % next(_markers)
        self.send(b"PING", marker)
        frames: list[Frame] = []
        while True:
            frame = yield self.next_frame()
            if frame is CLOSED:
                received = [f.value for f in frames]
                raise ConnectionError(f"connection closed; received before that: {received!r}")
            if frame.value == marker or frame.value == [b"pong", marker]:
                return frames
            frames.append(frame)

    def call_frames(self, *args: bytes | str | int) -> defer.Deferred:
        """Send one command; fires with the frames it produced (up to a PING marker)."""
        self.send(*args)
        return self.drain_frames()

    def drain(self) -> defer.Deferred:
        """:meth:`drain_frames`' values."""
        return self.drain_frames().addCallback(lambda frames: [f.value for f in frames])

    def call(self, *args: bytes | str | int) -> defer.Deferred:
        """Send one command; fires with the values it produced (up to a PING marker)."""
        self.send(*args)
        return self.drain()


class _RespClientFactory(protocol.Factory):
    protocol = RespClient
    noisy = False


@defer.inlineCallbacks
def connect(port: int, protocol_version: int = 2):
    """Open a RespClient to 127.0.0.1:port, switched to RESP3 by ``HELLO 3``
    when ``protocol_version`` is 3; fires with the client.  If the server
    refuses RESP3, the connection is dropped and the error raised."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    client = yield endpoint.connect(_RespClientFactory())
    if protocol_version == 3:
        try:
            [hello] = yield client.call("HELLO", "3")
            if isinstance(hello, RespError):
                raise hello
            if not isinstance(hello, dict) or hello.get(b"proto") != 3:
                raise AssertionError(f"HELLO 3 answered {hello!r}")
        except BaseException:
            client.abort()
            raise
    return client
