"""What both transports share: a port built once from the settings, and the
life of each client it hosts.

A *port* is a transport's factory (WebSocket's, RESP's). :class:`Port` builds
from :class:`~pubsub.operations.config.Settings`, once, what every connection of the port
uses: the engine, the output limits and the flusher that writes each
reactor turn, the command limits, the token checker, the chain of
middlewares (the built-in policies the settings turn on, then the
application's), and the figures /healthz and /metrics read.

A *hosted client* is one connection of a port. :class:`HostedClient` opens
it (an outbox under the output limits, a :class:`~pubsub.policy.auth.Guard` when
tokens are in use, a session registered with the engine, the idle timer) and
ends it (the same, undone) the same way on both transports. Each transport
adds only what its wire needs: when to open (WebSocket: once the handshake is
done; RESP: at once), how a refusal, a slow subscriber or an idle client is
told, and its own commands.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pubsub.core.commands import Command, Error, Limits, Result, Session, refused, resolve
from pubsub.core.engine import Encoder, Engine
from pubsub.core.history import History
from pubsub.hosting.outbox import Flusher, OutboxProducer, OutputLimits
from pubsub.operations.config import Settings
from pubsub.policy.auth import Authenticator, Guard, Tokens
from pubsub.policy.limits import IdleTimer, PeerCounter, PublishLimit
from pubsub.policy.middleware import Chain, Client, Refused

__all__ = ["HostedClient", "HostedSession", "Port"]

_log = Logger()


def _fault(failure: Any) -> None:
    _log.failure("internal fault after a middleware answered", failure)


class HostedSession(Session):
    """A hosted client's session: the command layer's, plus its connection,
    for the commands a transport has of its own (RESP's HELLO, the JSON
    protocol's RESUME)."""

    __slots__ = ("connection",)

    def __init__(
        self,
        engine: Engine,
        client_id: int,
        limits: Limits,
        connection: Any,
        guard: Guard | None = None,
    ) -> None:
        super().__init__(engine, client_id, limits, guard)
        self.connection = connection


class Port:
    """A transport's factory: what its connections share, and what it counts."""

    #: This transport's label in the metrics ("websocket", "resp").
    transport_name: str
    engine: Engine
    settings: Settings
    reactor: Any

    def _build_port(
        self,
        engine: Engine | None,
        settings: Settings,
        reactor: Any,
        middleware: Sequence[Any] = (),
        on_connect: Sequence[Any] = (),
    ) -> None:
        """``on_connect``: the transport's own policies, asked first when a
        client connects (WebSocket's origins)."""
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
        globs = settings.history_globs()
        # The first port of the engine makes its history; with a backplane
        # the nodes share one in Redis, which the backplane makes.
        if globs and self.engine.history is None and not settings.backplane.strip():
            self.engine.history = History(
                globs,
                settings.history_size,
                settings.history_ttl,
                settings.history_max_bytes,
                settings.history_max_channels,
                reactor.seconds,
            )
        # The built-in policies the settings turn on, as middlewares, in
        # the order Redis would check them, before the application's.
        builtins = [
            *([self.peers] if self.peers.limit else []),
            *on_connect,
            *([Tokens(settings.open_handshake_timeout)] if self.authenticator else []),
            *([self.publish_limit] if self.publish_limit.rate else []),
        ]
        #: Every middleware of the port (pubsub.policy.middleware), or None
        #: without any: its counters, and what asks about addresses.
        self.chain = Chain.build([*builtins, *middleware], reactor, settings.middleware_timeout)
        #: The chain when it has a say in what clients do (any hook but
        #: on_accept and on_close), else None: what each command tests.
        self.middleware = self.chain if self.chain is not None and self.chain.hosts else None
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
    #: What the port's middlewares know of this client, once it is admitted.
    _client: Client | None = None
    #: While a middleware decides: what arrived meanwhile, to handle in order.
    _waiting: deque[tuple[Callable[[Any], None], Any]] | None = None

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

    def _unhost(self) -> None:
        """The connection ended: undo :meth:`_host` (each step at most once)."""
        chain = self.factory.middleware
        if chain is not None and self._client is not None:
            client, self._client = self._client, None
            chain.disconnect(client)
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

    def _peer(self) -> str:
        """The client's address, ``host:port``."""
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    # -- middlewares: admission, commands screened, order kept while they decide ----------

    def _admit(self, client: Client) -> None:
        """Ask the port's middlewares whether ``client`` (hosted) may stay."""
        self._client = client
        verdict = self.factory.middleware.connect(client)  # type: ignore[union-attr]
        if type(verdict) is defer.Deferred:  # the chain's own: see Chain.screen
            self._wait(verdict.addCallback(self._admitted))
        else:
            self._admitted(verdict)

    def _admitted(self, verdict: Refused | None) -> list[Result]:
        if verdict is not None and self.session is not None:
            self._client = None  # never admitted: nothing to observe at its end
            self._turn_away(verdict)
        return []

    def _screened(self, args: Sequence[bytes], table: Mapping[str, Command]) -> Any:
        """:func:`~pubsub.core.commands.execute`, with the middlewares asked
        where Redis checks its ACLs: the results, or a Deferred of them."""
        command = resolve(args, table)
        if isinstance(command, Error):
            return [command]
        refusal = refused(self.session, command)
        if refusal is not None:
            return [refusal]
        return self._run_screened(command, args)

    def _run_screened(self, command: Command, args: Sequence[bytes]) -> Any:
        """Run a resolved, allowed ``command`` once the middlewares agree."""
        chain, client = self.factory.middleware, self._client
        assert chain is not None and client is not None  # only called when admitted
        verdict = chain.screen(client, command.name, args)
        if type(verdict) is defer.Deferred:  # the chain's own: see Chain.screen
            return verdict.addCallback(self._run_verdict, command, args)
        return self._run_verdict(verdict, command, args)

    def _run_verdict(self, verdict: Any, command: Command, args: Sequence[bytes]) -> list[Result]:
        if type(verdict) is Error:
            return [verdict]
        session = self.session
        if session is None:
            return []  # closed while a middleware decided
        return self._run_allowed(session, command, args if verdict is None else verdict)

    def _run_allowed(
        self, session: Session, command: Command, args: Sequence[bytes]
    ) -> list[Result]:
        """Run a command the middlewares allowed (RESP checks its
        subscribed mode here first, after the ACLs as Redis)."""
        assert command.handler is not None  # resolve gives a handler's entry
        results: list[Result] = command.handler(session, args)
        return results

    def _wait(self, answer: defer.Deferred[list[Result]]) -> None:
        """Read nothing more, and keep what was read, until ``answer``."""
        self._waiting = deque()
        self.transport.pauseProducing()
        answer.addCallback(self._answered)
        answer.addErrback(_fault)

    def _answered(self, results: list[Result]) -> None:
        waiting, self._waiting = self._waiting, None
        if self.session is None or not self._open_for_commands():
            # It ended, or began to end (turned away, say), meanwhile: what
            # it sends now is its side of the close, and must be read.
            self.transport.resumeProducing()
            return
        self._reply(results)
        self._drain(waiting or deque())

    def _drain(self, waiting: deque[tuple[Callable[[Any], None], Any]]) -> None:
        """Handle what waited, in order, until a middleware makes it wait again."""
        while waiting:
            handle, item = waiting.popleft()
            handle(item)
            if self._waiting is not None:
                self._waiting.extend(waiting)
                return
        self.transport.resumeProducing()

    # Each transport's own: its session (a HostedSession of its own kind),
    # what the engine calls it with (a Subscriber's), and how it is told of
    # a breach of the output limits (inside a publish: it must not raise nor
    # touch the engine), of the Guard ending the client's authentication,
    # and of idle_timeout passing.
    _new_session: Callable[[int, Guard | None], Session]
    encoder: Encoder
    deliver: Callable[[Any], None]
    _slow_consumer: Callable[[str], None]
    _revoke: Callable[[str], None]
    _idled: Callable[[], None]
    # How results are sent, whether commands are still run (not once the
    # connection has begun to close), and how a client the middlewares
    # refuse is told.
    _reply: Callable[[list[Result]], None]
    _open_for_commands: Callable[[], bool]
    _turn_away: Callable[[Refused], None]
    transport: Any
