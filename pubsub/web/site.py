"""The WebSocket port's twisted.web side: upgrade, demo page, client, health, metrics.

:class:`PubSubResource` is what both the twistd service and embedders mount:

* a request with ``Upgrade: websocket`` on any path below it (but the reserved
  ones) becomes a pub/sub WebSocket connection;
* ``GET`` without an upgrade at its root shows the browser demo page
  (``pubsub/static/index.html``);
* ``/pubsub.js`` serves the browser client (``pubsub/static/pubsub.js``);
* ``/healthz`` and ``/metrics`` report on the node
  (:mod:`pubsub.operations.metrics`);
* ``/echo``, only when the ``echo_endpoint`` setting is on, echoes every
  WebSocket message under the same protocol options (conformance testing).

The service listens with :class:`~pubsub.web.front.FrontFactory` around a
``Site`` of this resource, which sends upgrades past twisted.web.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import cast

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from pubsub import internals
from pubsub.operations.metrics import HealthResource, MetricsResource
from pubsub.websocket.protocol import EchoServerFactory, PubSubServerFactory

__all__ = ["RESERVED", "PubSubResource", "StaticFile"]


#: Paths that never become a pub/sub connection, whether or not they exist yet.
RESERVED = frozenset((b"healthz", b"echo", b"metrics", b"pubsub.js"))


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
        transport = request.channel.transport
        # The front door's protocol (pubsub.web.front), when the connection
        # came through one: it has take_back.
        front = internals.protocol_of(transport) if transport is not None else None
        take_back = getattr(front, "take_back", None)
        result = super().render(request)
        if take_back is not None:
            # Autobahn put its protocol where the front was; the front must
            # stay in between to count the connection's end.
            take_back(transport)
        return result


class StaticFile(Resource):
    """A file of ``pubsub/static``, read once at start-up, with an ETag.

    Browsers revalidate with ``If-None-Match`` and get a bodiless 304 while
    the file is unchanged, so a new release is picked up at once and an
    unchanged file costs no body.
    """

    isLeaf = True

    def __init__(self, name: str, content_type: bytes, cache_control: bytes) -> None:
        super().__init__()
        self.body = resources.files("pubsub").joinpath("static", name).read_bytes()
        self.etag = b'"%s"' % hashlib.sha256(self.body).hexdigest()[:32].encode("ascii")
        self._content_type = content_type
        self._cache_control = cache_control

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self._content_type)
        request.setHeader(b"cache-control", self._cache_control)
        if request.setETag(self.etag) is http.CACHED:
            return b""
        if request.method == b"HEAD":
            # twisted.web would drop a body itself, but log a warning for it.
            request.setHeader(b"content-length", b"%d" % len(self.body))
            return b""
        return self.body

    render_HEAD = render_GET


class PubSubResource(Resource):
    """The pub/sub endpoint as a twisted.web resource; mount it anywhere."""

    def __init__(self, factory: PubSubServerFactory, clock: IReactorTime | None = None) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.factory = factory
        self._websocket = _WebSocketUpgrade(factory)
        # "no-cache": browsers revalidate (a 304 while the file is the same),
        # so after an upgrade the page and the client never come from two releases.
        self._page = StaticFile("index.html", b"text/html; charset=utf-8", b"no-cache")
        # Each child provides IResource (@implementer), which mypy cannot see
        # without the zope plugin: hence the casts.
        script = StaticFile("pubsub.js", b"text/javascript; charset=utf-8", b"no-cache")
        self.putChild(b"pubsub.js", cast(IResource, script))
        self.health = HealthResource(factory, clock)
        self.putChild(b"healthz", cast(IResource, self.health))
        self.putChild(b"metrics", cast(IResource, MetricsResource(self.health)))
        #: The /echo endpoint's factory, when the echo_endpoint setting is on.
        self.echo_factory: EchoServerFactory | None = None
        if factory.settings.echo_endpoint:
            self.echo_factory = EchoServerFactory(factory.settings)
            self.health.endpoints["echo"] = self.echo_factory
            self.putChild(b"echo", cast(IResource, _WebSocketUpgrade(self.echo_factory)))

    # Both classes provide IResource, as notFound()'s result does; they are
    # named because mypy cannot see that without the zope plugin (and a
    # cast would cost a call per request).
    def getChild(self, path: bytes, request: Request) -> IResource | Resource | WebSocketResource:
        if path in RESERVED:
            return notFound()
        if _wants_websocket(request):
            return self._websocket
        if path == b"":
            return self
        return notFound()

    def render_GET(self, request: Request) -> object:
        if _wants_websocket(request):
            return self._websocket.render(request)
        return self._page.render_GET(request)

    def render_HEAD(self, request: Request) -> bytes:
        return self._page.render_HEAD(request)
