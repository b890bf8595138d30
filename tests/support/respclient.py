"""A Twisted RESP2/RESP3 test client, for redis-server and this server alike.

The RESP counterpart of :mod:`tests.support.wsclient`: :meth:`RespClient.call`
sends a command and collects every frame up to a PING marker, so a test sees
exactly what that command produced.  Frames are :class:`~tests.support.resp3.Frame`
objects (typed value and exact bytes) from the suite's one RESP parser.  It runs
inside the reactor, so it can talk to the in-process server, which a blocking
client would deadlock.
"""

from __future__ import annotations

import itertools

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from tests.support.resp3 import Frame, RespError, RespParser, command

_markers = itertools.count(1)
_LOST = object()  # queued when the connection closes, so no read waits forever


class RespClient(Protocol):
    #: Seconds a read may wait for a frame before the test fails.
    timeout = 10.0

    def __init__(self) -> None:
        self.parser = RespParser()
        self.frames: defer.DeferredQueue = defer.DeferredQueue()
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed(data)
        while (frame := self.parser.gets()) is not None:
            self.frames.put(frame)

    def connectionLost(self, reason=None) -> None:
        self.frames.put(_LOST)
        self.closed.callback(None)

    def close(self) -> defer.Deferred:
        self.transport.loseConnection()
        return self.closed

    def send(self, *args: str | bytes) -> None:
        """Send one command, str arguments as UTF-8."""
        self.transport.write(
            command(*(arg.encode("utf-8") if isinstance(arg, str) else arg for arg in args))
        )

    @defer.inlineCallbacks
    def next_frame(self):
        frame = yield self.frames.get().addTimeout(self.timeout, reactor)
        if frame is _LOST:
            self.frames.put(_LOST)
            raise ConnectionError("the server closed the connection")
        return frame

    def call(self, *args: str | bytes) -> defer.Deferred:
        """Send a command; fires with the frames it produced (up to a PING marker)."""
        self.send(*args)
        return self.drain()

    @defer.inlineCallbacks
    def drain(self):
        """Every frame received and not yet read, up to a fresh PING marker.

        The marker comes back as a bulk string, or in RESP2 while subscribed
        as ``["pong", marker]``."""
        marker = b"#resp-sync-%d" % next(_markers)
        self.send(b"PING", marker)
        frames: list[Frame] = []
        while True:
            frame = yield self.next_frame()
            if frame.value == marker or frame.value == [b"pong", marker]:
                return frames
            frames.append(frame)


@defer.inlineCallbacks
def connect(port: int, protocol: int = 2):
    """Open a RESP connection to 127.0.0.1:port, switched to RESP3 by
    ``HELLO 3`` when ``protocol`` is 3; fires with the RespClient."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    client = yield endpoint.connect(Factory.forProtocol(RespClient))
    if protocol == 3:
        client.send(b"HELLO", b"3")
        hello = yield client.next_frame()
        if isinstance(hello.value, RespError):
            raise hello.value
    return client
