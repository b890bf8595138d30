"""A Twisted WebSocket test client that speaks the JSON protocol.

Frames arrive in a DeferredQueue; :meth:`FrameClient.call` sends a command and
collects every frame up to a PING marker, so a test sees exactly what that
command produced (frames for one client keep the order of its commands).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

_markers = itertools.count(1)


class FrameClient(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.frames: defer.DeferredQueue = defer.DeferredQueue()
        self.opened: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.close_info: tuple | None = None

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frames.put(payload if isBinary else json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_info = (wasClean, code, reason)
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        self.closed.callback(self.close_info)

    def send(self, *args: Any) -> None:
        """Send one command: its name and arguments as a JSON array."""
        self.sendMessage(json.dumps(list(args)).encode("utf-8"))

    def next_frame(self) -> defer.Deferred:
        return self.frames.get()

    def call(self, *args: Any) -> defer.Deferred:
        """Send a command; fires with the frames it produced (up to a PING marker)."""
        self.send(*args)
        return self.drain()

    @defer.inlineCallbacks
    def drain(self):
        """Every frame received and not yet read, up to a fresh PING marker."""
        marker = f"#sync-{next(_markers)}"
        self.send("PING", marker)
        frames = []
        while True:
            frame = yield self.next_frame()
            if frame == ["pong", marker]:
                return frames
            frames.append(frame)


def connect(
    port: int,
    path: str = "/",
    protocols: list[str] | None = None,
    tls: Any = None,
    **options: Any,
) -> defer.Deferred:
    """Open a WebSocket to 127.0.0.1:port (``wss`` when ``tls`` is a client TLS
    options object); fires with the open FrameClient."""
    scheme = "wss" if tls is not None else "ws"
    factory = WebSocketClientFactory(
        f"{scheme}://127.0.0.1:{port}{path}", protocols=protocols or []
    )
    factory.protocol = FrameClient
    if options:
        factory.setProtocolOptions(**options)
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    return endpoint.connect(factory).addCallback(lambda client: client.opened)
