"""The twisted.web side of the WebSocket port: upgrade, demo page, client, health, metrics.

:class:`PubSubResource` is what both the twistd service and embedders mount:

* a request with ``Upgrade: websocket`` on any path below it (but the reserved
  ones) becomes a pub/sub WebSocket connection;
* ``GET`` without an upgrade at its root shows the browser demo page
  (``pubsub/static/index.html``);
* ``/pubsub.js`` serves the browser client (``pubsub/static/pubsub.js``);
* ``/healthz`` answers JSON: status, connections, channels, patterns, shard
  channels and uptime;
* ``/metrics`` answers the same figures and counters in Prometheus's format;
* ``/echo``, only when the ``echo_endpoint`` setting is on, echoes every
  WebSocket message under the same protocol options (conformance testing).

:class:`FrontFactory` is what the service listens with: it opens WebSocket
upgrades itself or hands them straight to Autobahn, and everything else to a
``Site`` around :class:`PubSubResource`.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any, cast

from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from pubsub import internals
from pubsub.handshake import read_upgrade
from pubsub.hosting import Port
from pubsub.policy import Deadlines, PeerCounter, peer_host
from pubsub.websocket import EchoServerFactory, PubSubServerFactory

__all__ = ["FrontFactory", "HealthResource", "MetricsResource", "PubSubResource", "StaticFile"]


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
        transport = request.channel.transport
        front = internals.protocol_of(transport) if transport is not None else None
        result = super().render(request)
        if isinstance(front, _Front):
            # Autobahn put its protocol where the front was; the front must
            # stay in between to count the connection's end.
            front.take_back(transport)
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


class _Clock(typing.Protocol):
    """What :class:`HealthResource` reads of its clock (an ``IReactorTime``).

    Not ``IReactorTime`` itself: a zope interface declares its methods
    without ``self``, and mypy cannot call them without the zope plugin.
    """

    def seconds(self) -> float: ...


class HealthResource(Resource):
    """``/healthz``: JSON figures for load balancers and people."""

    isLeaf = True

    def __init__(self, factory: PubSubServerFactory, clock: _Clock) -> None:
        super().__init__()
        #: Every transport's factory (port) on this engine; their slow consumers add up.
        self.factories: list[Port] = [factory]
        #: The pub/sub WebSocket port (the first of the factories).
        self.websocket = factory
        #: The WebSocket factories by endpoint: "pubsub", and "echo" when it is on.
        self.endpoints: dict[str, PubSubServerFactory | EchoServerFactory] = {"pubsub": factory}
        self._engine = factory.engine
        self._clock = clock
        self._started = clock.seconds()
        #: The node's RedisBackplane, when the backplane setting is on.
        self.backplane: Any = None

    def uptime(self) -> float:
        """Seconds since this server's resource was made (its start-up)."""
        return float(self._clock.seconds() - self._started)

    def render_GET(self, request: Request) -> bytes:
        engine = self._engine
        body = {
            "status": "ok",
            "connections": engine.client_count,
            "channels": engine.channel_count,
            "patterns": engine.numpat(),
            "shard_channels": engine.shard_channel_count,
            "slow_consumers_disconnected": sum(f.slow_consumers for f in self.factories),
            "uptime": round(self.uptime(), 3),
        }
        if self.backplane is not None:
            body["backplane"] = self.backplane.health()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8") + b"\n"


#: Figures of the engine as a whole: (kind, name, help, how to read it).
_ENGINE_FIGURES: tuple[tuple[Any, str, str, Callable[[Any], float]], ...] = (
    (
        GaugeMetricFamily,
        "pubsub_subscriptions",
        "Channel, pattern and shard channel subscriptions held by all clients",
        lambda engine: engine.subscription_total,
    ),
    (
        GaugeMetricFamily,
        "pubsub_channels",
        "Channels with at least one subscriber",
        lambda engine: engine.channel_count,
    ),
    (
        GaugeMetricFamily,
        "pubsub_patterns",
        "Distinct patterns with at least one subscriber",
        lambda engine: engine.numpat(),
    ),
    (
        GaugeMetricFamily,
        "pubsub_shard_channels",
        "Shard channels with at least one subscriber",
        lambda engine: engine.shard_channel_count,
    ),
    (
        CounterMetricFamily,
        "pubsub_publishes",
        "PUBLISH and SPUBLISH commands, from every transport and the API",
        lambda engine: engine.publishes,
    ),
    (
        CounterMetricFamily,
        "pubsub_deliveries",
        "Messages delivered to subscribers",
        lambda engine: engine.deliveries,
    ),
)


def _policy_figures(factories: list[Port], websocket: PubSubServerFactory) -> Iterator[Any]:
    """The counters of :mod:`pubsub.policy`'s limits, per transport, and the
    WebSocket endpoint's own (``websocket``)."""
    counters: tuple[tuple[str, str, Callable[[Any], float]], ...] = (
        (
            "pubsub_connections_refused_per_ip",
            "Connections refused at max_connections_per_ip",
            lambda f: f.peers.refused,
        ),
        (
            "pubsub_publishes_rate_limited",
            "Publishes refused by the publish_rate limit, not delivered",
            lambda f: f.publish_limit.refused,
        ),
        (
            "pubsub_idle_disconnects",
            "Clients closed by idle_timeout",
            lambda f: f.idle_disconnects,
        ),
    )
    for name, doc, value in counters:
        family = CounterMetricFamily(name, doc, labels=["transport"])
        for factory in factories:
            family.add_metric([factory.transport_name], value(factory))
        yield family
    yield CounterMetricFamily(
        "pubsub_ping_timeouts",
        "WebSocket clients dropped for not answering a ping within ping_timeout",
        value=websocket.ping_timeouts,
    )
    yield CounterMetricFamily(
        "pubsub_origin_refusals",
        "WebSocket handshakes closed with 1008 because allowed_origins refuses their Origin",
        value=websocket.origin_refusals,
    )


class _Figures:
    """A prometheus_client collector that reads the server's own counters at
    scrape time, so counting costs the hot paths nothing but an addition."""

    def __init__(self, health: HealthResource) -> None:
        self._factories = health.factories
        self._uptime = health.uptime
        self._health = health

    def collect(self) -> Iterator[Any]:
        factories = self._factories
        engine = self._health.websocket.engine  # every port shares it

        def per_transport(kind: Any, name: str, doc: str, value: Callable[[Any], float]) -> Any:
            family = kind(name, doc, labels=["transport"])
            for factory in factories:
                family.add_metric([factory.transport_name], value(factory))
            return family

        yield per_transport(
            GaugeMetricFamily,
            "pubsub_connections",
            "Open pub/sub connections",
            lambda f: len(f.connections),
        )
        for kind, name, doc, value in _ENGINE_FIGURES:
            yield kind(name, doc, value=value(engine))
        yield per_transport(
            CounterMetricFamily,
            "pubsub_bytes_out",
            "Bytes of frames and replies handed to the network",
            lambda f: f.flusher.bytes_out,
        )
        errors = CounterMetricFamily(
            "pubsub_errors", "Error replies sent, by kind", labels=["transport", "kind"]
        )
        for factory in factories:
            for kind, count in sorted(factory.errors.items()):
                errors.add_metric([factory.transport_name, kind], count)
        yield errors
        yield per_transport(
            CounterMetricFamily,
            "pubsub_auth_failures",
            "Tokens refused: bad, expired, or not allowing what a client holds",
            lambda f: f.authenticator.failures if f.authenticator is not None else 0,
        )
        yield per_transport(
            CounterMetricFamily,
            "pubsub_slow_consumer_disconnects",
            "Subscribers cut off by the output buffer limits",
            lambda f: f.slow_consumers,
        )
        yield from _policy_figures(factories, self._health.websocket)
        lean = CounterMetricFamily(
            "pubsub_websocket_fast_path",
            "WebSocket connections opened by the server's own handshake (step=opened), "
            "and with frames read by its own frame reader (step=read), not Autobahn's",
            labels=["endpoint", "step"],
        )
        for endpoint, websocket in self._health.endpoints.items():
            lean.add_metric([endpoint, "opened"], websocket.lean_opens)
            lean.add_metric([endpoint, "read"], websocket.lean_reads)
        yield lean
        yield GaugeMetricFamily(
            "pubsub_uptime_seconds",
            "Seconds since start-up",
            value=self._uptime(),
        )
        if self._health.backplane is not None:
            yield from _backplane_figures(self._health.backplane)


#: The backplane's counters: (name, help, attribute).
_BACKPLANE_COUNTERS = (
    ("pubsub_backplane_sent", "Publishes sent to the backplane for other nodes", "sent"),
    (
        "pubsub_backplane_received",
        "Messages from other nodes (message, pmessage, smessage) delivered here",
        "received",
    ),
    (
        "pubsub_backplane_failed",
        "Publishes answered with the BACKPLANE error: delivered on this node only",
        "failed",
    ),
    ("pubsub_backplane_reconnects", "Times the backplane came back after being down", "reconnects"),
    (
        "pubsub_backplane_timeouts",
        "Backplane connections closed because Redis did not answer in time",
        "timeouts",
    ),
    (
        "pubsub_backplane_lost",
        (
            "Publishes a Redis Cluster redirected (MOVED, ASK) that could not be sent "
            "again: not delivered to other nodes"
        ),
        "lost",
    ),
    (
        "pubsub_backplane_redirected",
        "Publishes a Redis Cluster redirected (MOVED, ASK), sent again where it said",
        "redirected",
    ),
    (
        "pubsub_backplane_dropped",
        (
            "Subscriptions a Redis Cluster dropped when their slot moved (a failover): "
            "messages to them are missed until the node renews them on the new owner"
        ),
        "dropped",
    ),
)


def _backplane_figures(backplane: Any) -> Iterator[Any]:
    state = GaugeMetricFamily(
        "pubsub_backplane_state", "1 for the backplane's current state", labels=["state"]
    )
    for name in ("connecting", "connected", "down"):
        state.add_metric([name], 1 if backplane.state == name else 0)
    yield state
    for name, doc, attribute in _BACKPLANE_COUNTERS:
        yield CounterMetricFamily(name, doc, value=getattr(backplane, attribute))


# The text format generate_latest writes; every Prometheus version reads it.
_TEXT_FORMAT = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsResource(Resource):
    """``/metrics``: the server's figures in Prometheus's text format."""

    isLeaf = True

    def __init__(self, health: HealthResource) -> None:
        super().__init__()
        # The same factories and start time as /healthz.
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Figures(health))

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _TEXT_FORMAT)
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self._registry)


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
        return self._page.render_GET(request)

    def render_HEAD(self, request: Request) -> bytes:
        return self._page.render_HEAD(request)


class _Front(Protocol):
    """Reads a request's head, then gives the connection to Autobahn or twisted.web.

    A WebSocket upgrade on a pub/sub path (or /echo) goes straight to the
    Autobahn protocol: twisted.web would parse it first, build a Request,
    walk the resources and serialize the head again for Autobahn, about a
    third of what opening a connection costs. The plain request nearly
    every client sends (:func:`~pubsub.handshake.read_upgrade`) is opened
    here, without Autobahn's handshake either; any other upgrade is handed
    to Autobahn, which parses the head itself. Everything else, and anything
    unusual, goes to twisted.web's channel with every byte received, where
    :class:`PubSubResource` serves it as it would anyway.
    """

    #: Twisted declares it an ``ITransport``, a zope interface whose methods
    #: mypy cannot call without the zope plugin; and transports change hands.
    transport: Any

    def __init__(self, front: FrontFactory, counted_as: str | None = None) -> None:
        self._front = front
        # The head so far, when it took more than one read (a bytearray then).
        self._head: bytes | bytearray = b""
        # With max_connections_per_ip, the address this connection counts
        # against; the front then stays between the transport and the
        # protocol it chose (``_inner``), to see the connection end.
        self._counted_as = counted_as
        self._inner: Any = None

    def connectionMade(self) -> None:
        if self._front.heads is not None:
            self._front.heads.add(self)

    def connectionLost(self, reason: Any = None) -> None:
        self._head_read()
        if self._counted_as is not None:
            self._front.peers.release(self._counted_as)
            self._counted_as = None
        if self._inner is not None:
            self._inner.connectionLost(reason)

    def take_back(self, transport: Any) -> None:
        """Sit between ``transport`` and the protocol someone else gave it."""
        protocol = internals.protocol_of(transport)
        if protocol is self:
            return
        self._inner = protocol
        internals.hand_over(transport, self)

    def _head_read(self) -> None:
        if self._front.heads is not None:
            self._front.heads.discard(self)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        searched = len(self._head)
        received: bytes | bytearray
        if searched:
            self._head += data
            received = self._head
        else:
            received = data  # the whole head in one read, as nearly always
        # A head trickled in is searched once, not again from its start.
        end = received.find(b"\r\n\r\n", max(searched - 3, 0))
        if end < 0 and len(received) <= _HEAD_MAX:
            if not searched:
                self._head = bytearray(data)
            return
        self._head_read()
        received = bytes(received)
        head = received[:end]
        upgrade = read_upgrade(head) if end >= 0 else None
        if upgrade is not None:
            factory = self._front.factory_for(upgrade.path.encode("latin-1"))
        else:
            factory = self._front.route(head) if end >= 0 else None
        if factory is None:
            factory = self._front.site
        protocol = factory.buildProtocol(self.transport.getPeer())
        if protocol is None:
            self.transport.loseConnection()
            return
        transport = self.transport
        if self._counted_as is not None:
            self._inner = protocol
        else:
            internals.hand_over(transport, protocol)
        if factory is not self._front.site:
            # The common request is opened here, without Autobahn's handshake.
            if upgrade is not None and protocol.open_upgrade(
                transport, upgrade, received[: end + 4]
            ):
                if len(received) > end + 4:
                    protocol.dataReceived(received[end + 4 :])
                return
            # The whole head is here and this front timed its arrival;
            # Autobahn answers it at once, so its own timer would only be
            # set and cancelled.
            protocol.openHandshakeTimeout = 0
        protocol.makeConnection(transport)
        protocol.dataReceived(received)


#: Past this many bytes without the end of the head, twisted.web decides.
_HEAD_MAX = 16 * 1024

_TOO_MANY_BODY = b"too many connections from your address\n"
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_TOO_MANY_BODY), _TOO_MANY_BODY)
)


class _TooMany(Protocol):
    """A connection over ``max_connections_per_ip``: refused before any of its
    request is read, so a flood from one address costs one write each."""

    transport: Any  # as _Front's

    def connectionMade(self) -> None:
        self.transport.write(_TOO_MANY)
        self.transport.loseConnection()


def _abort(front: _Front) -> None:
    front.transport.abortConnection()


class FrontFactory(Factory):
    """The factory to listen with for ``site``, whose resource is a
    :class:`PubSubResource` at the root: upgrades skip twisted.web."""

    noisy = False

    def __init__(self, site: Site, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.site = site
        self.clock = clock
        self.resource: PubSubResource = site.resource
        #: Connections per address: the pub/sub factory's count, for its metrics.
        self.peers: PeerCounter = self.resource.factory.peers
        #: Connections still sending their request's head, cut off after the
        #: site's timeout (``open_handshake_timeout``).
        self.heads: Deadlines | None = None
        timeout = getattr(site, "timeOut", None)
        if timeout:
            self.heads = Deadlines(clock, timeout, _abort)

    def buildProtocol(self, addr: Any) -> Protocol:
        if not self.peers.limit:
            return _Front(self)
        host = peer_host(addr)
        if not self.peers.acquire(host):
            return _TooMany()
        return _Front(self, host)

    def logPrefix(self) -> str:
        # The port logs "Site starting on 9000", as it did without this front.
        return type(self.site).__name__

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def route(self, head: bytes) -> Any:
        """The WebSocket factory for a request head, or None for twisted.web."""
        line, _, fields = head.partition(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3 or parts[0] != b"GET" or not parts[1].startswith(b"/"):
            return None
        path = parts[1].split(b"?", 1)[0]
        wanted = False
        for field in fields.split(b"\r\n"):
            name, _, value = field.partition(b":")
            if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
                wanted = True
        if not wanted:
            return None
        return self.factory_for(path)

    def factory_for(self, path: bytes) -> Any:
        """The WebSocket factory for an upgrade to ``path`` (no query), or
        None for twisted.web."""
        if b"%" in path:
            return None  # twisted.web unquotes before it routes
        first = path[1:].split(b"/", 1)[0]
        if first == b"echo":
            return self.resource.echo_factory
        if first in _RESERVED:
            return None
        return self.resource.factory
