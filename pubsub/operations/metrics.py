"""What a node reports about itself: ``/healthz`` and ``/metrics``.

:class:`HealthResource` answers JSON for load balancers and people: status,
connections, channels, patterns, shard channels, slow consumers cut off and
uptime, and the backplane's state when there is one.
:class:`MetricsResource` answers the same figures and every counter in
Prometheus's text format, read at scrape time from each port's typed
figures (:class:`~pubsub.hosting.port.Port`), the engine and the backplane,
so counting costs the hot paths nothing but an addition.  Both are mounted
by :class:`~pubsub.web.site.PubSubResource`.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.web.resource import Resource
from twisted.web.server import Request

from pubsub.core.history import History, SharedHistory
from pubsub.hosting.port import Port
from pubsub.websocket.protocol import EchoServerFactory, PubSubServerFactory

__all__ = ["HealthResource", "MetricsResource"]


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
    """The counters of :mod:`pubsub.policy.limits`'s limits, per transport, and the
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
        (
            "pubsub_middleware_refusals",
            "Connections, clients and commands a middleware refused, built-in policies included",
            lambda f: f.chain.refusals if f.chain is not None else 0,
        ),
        (
            "pubsub_middleware_failures",
            "Middleware answers that failed or came too late: the command or client was refused",
            lambda f: f.chain.failures if f.chain is not None else 0,
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
        value=websocket.origins.refused,
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
        if engine.history is not None:
            yield from _history_figures(engine.history)


def _history_figures(history: History | SharedHistory) -> Iterator[Any]:
    """What the history of history_channels holds (this node's own; a shared
    one is in Redis, which says), and what became of recoveries."""
    if not history.shared:
        yield from _stored_figures(history)
    recoveries = CounterMetricFamily(
        "pubsub_recoveries", "RESUMEs from a position, by result", labels=["result"]
    )
    recoveries.add_metric(["recovered"], history.recoveries)
    recoveries.add_metric(["failed"], history.failed_recoveries)
    yield recoveries
    if history.shared:
        missed = CounterMetricFamily(
            "pubsub_history_missed",
            "Messages of kept channels this node missed from the backplane, by whether "
            "the history filled them in",
            labels=["result"],
        )
        missed.add_metric(["filled"], history.missed_filled)
        missed.add_metric(["lost"], history.missed_lost)
        yield missed


def _stored_figures(history: History) -> Iterator[Any]:
    yield GaugeMetricFamily(
        "pubsub_history_messages",
        "Messages kept in channels' history",
        value=history.stored_messages,
    )
    yield GaugeMetricFamily(
        "pubsub_history_bytes",
        "Bytes the history holds, as history_max_bytes counts them",
        value=history.stored_bytes,
    )
    yield GaugeMetricFamily(
        "pubsub_history_channels",
        "Channels with a history (their messages, or only their position)",
        value=history.stream_count,
    )
    yield CounterMetricFamily(
        "pubsub_history_evicted",
        "Messages dropped from the history early to stay within history_max_bytes",
        value=history.evicted,
    )


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
            "Publishes that may not have reached other nodes: answered with an error, never "
            "answered, or redirected by a Redis Cluster (MOVED, ASK) and not sent again"
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
