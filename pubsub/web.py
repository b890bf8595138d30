"""The twisted.web side of the WebSocket port: upgrade, info page, health check.

:class:`PubSubResource` is what both the twistd service and embedders mount:

* a request with ``Upgrade: websocket`` on any path below it (but the reserved
  ones) becomes a pub/sub WebSocket connection;
* ``GET`` without an upgrade at its root shows a short page on how to connect;
* ``/healthz`` answers JSON: status, connections, channels, patterns, shard
  channels and uptime;
* ``/echo``, only when the ``echo_endpoint`` setting is on, echoes every
  WebSocket message under the same protocol options (conformance testing).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IReactorTime
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from pubsub.websocket import EchoServerFactory, PubSubServerFactory

__all__ = ["HealthResource", "PubSubResource"]


#: Paths that never become a pub/sub connection, whether or not they exist yet.
_RESERVED = frozenset((b"healthz", b"echo", b"metrics", b"pubsub.js"))


def _wants_websocket(request: Request) -> bool:
    upgrade = request.getHeader(b"upgrade") or b""
    return b"websocket" in upgrade.lower()


class _WebSocketUpgrade(WebSocketResource):
    """Autobahn's resource, minus the HTTP channel's idle timer.

    The HTTP channel hands its transport over to the WebSocket protocol but
    keeps its own timeout running; left alone it would fire hours later on a
    channel that no longer owns the connection.
    """

    def render(self, request: Request) -> object:
        request.channel.setTimeout(None)
        return super().render(request)


class HealthResource(Resource):
    """``/healthz``: JSON figures for load balancers and people."""

    isLeaf = True

    def __init__(self, factory: PubSubServerFactory, clock: IReactorTime) -> None:
        super().__init__()
        #: Every transport's factory on this engine; their slow consumers add up.
        self.factories: list[Any] = [factory]
        self._engine = factory.engine
        self._clock = clock
        self._started = clock.seconds()

    def render_GET(self, request: Request) -> bytes:
        engine = self._engine
        body = {
            "status": "ok",
            "connections": engine.client_count,
            "channels": engine.channel_count,
            "patterns": engine.numpat(),
            "shard_channels": engine.shard_channel_count,
            "slow_consumers_disconnected": sum(f.slow_consumers for f in self.factories),
            "uptime": round(self._clock.seconds() - self._started, 3),
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8") + b"\n"


class PubSubResource(Resource):
    """The pub/sub endpoint as a twisted.web resource; mount it anywhere."""

    def __init__(self, factory: PubSubServerFactory, clock: IReactorTime | None = None) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.factory = factory
        self._websocket = _WebSocketUpgrade(factory)
        self._page = resources.files("pubsub").joinpath("static/index.html").read_bytes()
        self.health = HealthResource(factory, clock)
        self.putChild(b"healthz", self.health)
        if factory.settings.echo_endpoint:
            self.putChild(b"echo", _WebSocketUpgrade(EchoServerFactory(factory.settings)))

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path in _RESERVED:
            return notFound()
        if _wants_websocket(request):
            return self._websocket
        if path == b"":
            return self
        return notFound()

    def render_GET(self, request: Request) -> object:
        if _wants_websocket(request):
            return self._websocket.render(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self._page

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(self._page))
        return b""
