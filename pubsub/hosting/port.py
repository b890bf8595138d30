"""What both transports share: a port built once from the settings, and the
life of each client it hosts.

A *port* is a transport's factory (WebSocket's, RESP's). :class:`Port` builds
from :class:`~pubsub.operations.config.Settings`, once, what every connection of the port
uses: the engine, the output limits and the flusher that writes each
reactor turn, the command limits, the token checker, the per-address and
publish-rate policies, and the figures /healthz and /metrics read.

A *hosted client* is one connection of a port. :class:`HostedClient` opens
it (an outbox under the output limits, a :class:`~pubsub.policy.auth.Guard` when
tokens are in use, a session registered with the engine, the idle timer) and
ends it (the same, undone) the same way on both transports. Each transport
adds only what its wire needs: when to open (WebSocket: once the handshake is
done; RESP: at once), how a refusal, a slow subscriber or an idle client is
told, and its own commands.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from pubsub.core.commands import Limits, Session
from pubsub.core.engine import Encoder, Engine
from pubsub.hosting.outbox import Flusher, OutboxProducer, OutputLimits
from pubsub.operations.config import Settings
from pubsub.policy.auth import Authenticator, Guard
from pubsub.policy.limits import IdleTimer, PeerCounter, PublishLimit

__all__ = ["HostedClient", "Port"]


class Port:
    """A transport's factory: what its connections share, and what it counts."""

    #: This transport's label in the metrics ("websocket", "resp").
    transport_name: str
    engine: Engine
    settings: Settings
    reactor: Any

    def _build_port(self, engine: Engine | None, settings: Settings, reactor: Any) -> None:
        self.engine = engine if engine is not None else Engine()
        self.settings = settings
        self.reactor = reactor
        self.flusher = Flusher(reactor)
        self.output_limits = OutputLimits.from_settings(settings)
        self.limits = Limits.from_settings(settings)
        #: Checks tokens when authentication is configured, else None.
        self.authenticator = Authenticator.from_settings(settings)
        #: Connections per address on this port.
        self.peers = PeerCounter(settings.max_connections_per_ip)
        self.publish_limit = PublishLimit.from_settings(settings, reactor)
        #: Open connections.
        self.connections: set[Any] = set()
        #: Connections cut off by the output buffer limits since start-up.
        self.slow_consumers = 0
        #: Connections closed by idle_timeout since start-up.
        self.idle_disconnects = 0
        #: Error replies sent since start-up, by error_kind.
        self.errors: Counter[str] = Counter()


class HostedClient(OutboxProducer):
    """One connection of a :class:`Port`: a client of the port's engine."""

    factory: Port
    session: Session | None = None
    _guard: Guard | None = None
    _idle: IdleTimer | None = None

    def _host(self) -> Guard | None:
        """Open this connection as a client of the engine; its Guard, when
        tokens are in use (the transport tells it what the client sent)."""
        factory = self.factory
        self._start_outbox(factory, self._slow_consumer)
        if factory.authenticator is not None:
            self._guard = Guard(factory.authenticator, factory.reactor, self._revoke)
        self.session = self._new_session(factory.engine.register(self), self._guard)
        factory.connections.add(self)
        idle_timeout = factory.settings.idle_timeout
        if idle_timeout:
            self._idle = IdleTimer(factory.reactor, idle_timeout, self._subscribed, self._idled)
        return self._guard

    def _new_session(self, client_id: int, guard: Guard | None) -> Session:
        factory = self.factory
        return Session(
            factory.engine, client_id, factory.limits, guard, factory.publish_limit.bucket()
        )

    def _unhost(self) -> None:
        """The connection ended: undo :meth:`_host` (each step at most once)."""
        if self._guard is not None:
            self._guard.close()
        if self._idle is not None:
            self._idle.cancel()
        self._drop_outbox()
        self.factory.connections.discard(self)
        self._leave_engine()

    def _leave_engine(self) -> None:
        if self.session is not None:
            self.factory.engine.unregister(self.session.client_id)
            self.session = None

    def _subscribed(self) -> bool:
        session = self.session
        return session is not None and session.engine.subscription_count(session.client_id) > 0

    # Each transport's own: what the engine calls it with (a Subscriber's),
    # and how it is told of a breach of the output limits (inside a publish:
    # it must not raise nor touch the engine), of the Guard ending the
    # client's authentication, and of idle_timeout passing.
    encoder: Encoder
    deliver: Callable[[Any], None]
    _slow_consumer: Callable[[str], None]
    _revoke: Callable[[str], None]
    _idled: Callable[[], None]
