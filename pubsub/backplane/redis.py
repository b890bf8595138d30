"""The bridge between this node's engine and a real Redis: scale-out over Redis Pub/Sub.

What a node does, in Redis's own terms:

* It subscribes in Redis to exactly the channels, patterns and shard channels
  its own clients hold: the engine tells the bridge (a
  :class:`pubsub.core.engine.Relay`) when a name gets its first local subscriber
  or loses its last, and the bridge sends (P|S)SUBSCRIBE or
  (P|S)UNSUBSCRIBE.  Redis traffic follows interest, not every message.
* Every local publish is delivered to local subscribers at once by the
  engine (the count in the reply is node-local, as in Redis Cluster) and is
  also published to Redis, in an envelope that names this node.  Every node
  drops the messages it sent itself when Redis hands them back, and
  delivers the others: each subscriber gets each publish exactly once.  One
  node writes to Redis over one connection, so a publisher's messages keep
  their order.
* A ``message`` from Redis goes to the local subscribers of that channel
  only, a ``pmessage`` to those of that one pattern only, an ``smessage``
  to the shard channel's: a node holding ``a`` and ``a*`` gets both for
  one publish and each reaches the subscribers the local publish would have.
* When Redis goes away, local delivery goes on; a publish while the
  backplane is not connected still reaches local subscribers, and
  :meth:`RedisBackplane.refusal` gives the error the client is answered
  with (``BACKPLANE <url> is down: ...``).  So does a publish while Redis
  reads so slowly that ``buffer_limit`` bytes wait for it ("is behind").  Both connections reconnect with
  jittered exponential backoff; the subscriber connection resubscribes
  everything in batches and is "ready" once Redis answered a PING sent
  after them.
* A link can also go silent: a half-open TCP connection after a network
  partition, a NAT or firewall that forgot it, a paused VM.  No RST, no FIN:
  writes are accepted by the kernel and go nowhere, and nothing would ever
  say so.  So both connections are health-checked: a PING every
  ``ping_interval`` seconds, and the connection is closed (and the node is
  "down" until it reconnects) when a PING or a publish has waited more than
  ``timeout`` seconds for its reply.  TCP keepalive is on as a second line.

A ``rediss://`` URL puts both connections in TLS (Redis's ``tls-port``),
with the host name checked against Redis's certificate, and optionally a
client certificate for ``tls-auth-clients``.  A TLS failure shows only after
TCP has connected, and a TLS 1.3 server refuses a client certificate only
after the client thinks the handshake is done, so a connection that is lost
before Redis answered anything counts as a failed attempt for the backoff,
and a TLS failure is logged once per streak, with OpenSSL's reason.

Redis channel names carry ``prefix`` so several deployments can share one
Redis; in patterns the prefix is escaped, so its own ``*?[]\\`` are literal.

The client is this module's own: two RESP2 connections (a subscriber in
subscribed mode, a publisher for PUBLISH/SPUBLISH), replies parsed by
hiredis, Redis's own C reply parser.  docs/architecture.md says why not
txredisapi.
"""

from __future__ import annotations

import os
import random
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as TypingProtocol
from urllib.parse import unquote, urlsplit

import hiredis
from OpenSSL.SSL import Error as SSLError
from service_identity import VerificationError
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pubsub.core.engine import Engine, Kind
from pubsub.core.history import Position

__all__ = ["STATES", "BackplaneDown", "RedisBackplane", "RedisTarget", "backoff", "parse_url"]

_log = Logger()

#: What /healthz and /metrics report: before the first connection, connected,
#: and down (lost, reconnecting).
STATES = ("connecting", "connected", "down")

#: Names per (P|S)SUBSCRIBE when resubscribing after a reconnect: small
#: enough that Redis answers each promptly, big enough to be few commands.
RESUBSCRIBE_BATCH = 500

_SUBSCRIBE: dict[str, bytes] = {kind: kind.subscribe.upper().encode() for kind in Kind}
_UNSUBSCRIBE: dict[str, bytes] = {kind: kind.unsubscribe.upper().encode() for kind in Kind}
_PUBLISH: dict[str, bytes] = {
    Kind.CHANNEL: b"*3\r\n$7\r\nPUBLISH\r\n",
    Kind.SHARD: b"*3\r\n$8\r\nSPUBLISH\r\n",
}

#: Bytes of the node id that starts every envelope; a space follows it.
NODE_ID_SIZE = 16

#: TCP keepalive where the platform lets us tune it: probe after 10 s idle,
#: every 5 s, give up after 3 unanswered: a dead peer is noticed by the
#: kernel within about 25 s instead of the default two hours.  The PINGs
#: notice sooner; this also covers a health check that is turned off.
KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))

#: Slack when comparing a marker's age with the timeout: LoopingCall ticks
#: land on exact multiples of the interval, and float sums of those may come
#: out a hair short of the timeout they equal.
_CLOCK_SLACK = 1e-3


class BackplaneDown(Exception):
    """Redis could not answer a request: the backplane is not connected, the
    connection was lost before the reply, or Redis answered with an error."""


@dataclass(frozen=True)
class RedisTarget:
    """Where the backplane's Redis is, from ``redis[s]://[user[:password]@]host[:port][/db]``.

    ``tls`` is true for ``rediss://``: the connections speak TLS.
    """

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @property
    def display(self) -> str:
        """The URL without the password: what logs, errors and /healthz show."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}{host}:{self.port}/"


def parse_url(url: str) -> RedisTarget:
    """The target of a ``redis://`` or ``rediss://`` (TLS) URL; ValueError says
    what is wrong with it.  The port is 6379 unless the URL gives one, for TLS too
    (Redis has no standard TLS port).

    The database number is accepted and ignored: Pub/Sub is not per database.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"backplane URL must start with redis://, got {url!r} (rediss:// for TLS)")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"backplane URL has a bad port: {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"backplane URL has no host: {url!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return RedisTarget(parts.hostname, port, username, password, parts.scheme == "rediss")


def backoff(
    max_delay: float, initial: float = 0.1, jitter: Callable[[], float] = random.random
) -> Callable[[int], float]:
    """A ClientService retry policy: doubling from ``initial`` up to ``max_delay``
    seconds, each delay scaled by 0.5..1.0 so nodes that lost Redis together
    do not all come back in the same instant."""

    def policy(failed_attempts: int) -> float:
        # float: typeshed gives int ** int as Any (a negative power is a float).
        delay: float = min(max_delay, initial * 2 ** min(max(failed_attempts - 1, 0), 32))
        return delay * (0.5 + jitter() / 2)

    return policy


def new_node_id() -> bytes:
    """A random id for this node, which starts its envelopes."""
    return os.urandom(NODE_ID_SIZE // 2).hex().encode()


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*args: bytes) -> bytes:
    """One RESP multibulk command."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(arg) for arg in args)


def escape_glob(text: bytes) -> bytes:
    """``text`` as a glob pattern that matches exactly ``text``."""
    out = bytearray()
    for byte in text:
        if byte in b"*?[]\\":
            out.append(0x5C)
        out.append(byte)
    return bytes(out)


class _Producer(TypingProtocol):
    """A streaming producer, as a transport's flow control sees it."""

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


class _Transport(TypingProtocol):
    """What the connections use of their transport (TCP or TLS).

    Twisted declares ``Protocol.transport`` an ``ITransport``: a zope
    Interface, whose methods mypy reads without ``self`` (every call looks
    like one argument too many), and which names neither ``abortConnection``
    (ITCPTransport's) nor the producer methods (IConsumer's)."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: _Producer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


class _Connection(Protocol):
    """One RESP2 connection to Redis; every reply goes to the bridge.

    The health check counts, rather than timestamps, what it waits for, so a
    publish costs one integer increment: ``requests`` are the commands sent
    that Redis answers with one reply each, ``replies`` the replies to them
    received so far.  On the publisher that is every command (AUTH, PUBLISH,
    SPUBLISH, PING); on the subscriber only PINGs and their pongs, since a
    (P|S)SUBSCRIBE is confirmed once per name.  Each tick of ``ping_interval``
    sends a PING and leaves a marker (time, requests so far); a marker is
    covered once that many replies have come.  The oldest marker not covered
    yet is how long Redis has kept us waiting.
    """

    #: Set by makeConnection before connectionMade; the bridge only knows
    #: connections from then on.
    transport: _Transport  # type: ignore[assignment]  # Twisted's ITransport: see _Transport

    def __init__(self, bridge: RedisBackplane, role: str) -> None:
        self.bridge = bridge
        self.role = role  # "subscriber" or "publisher"
        self._reader = hiredis.Reader()
        #: Error replies on this connection; only the first is logged, since
        #: a refusing Redis (NOAUTH, ...) answers every publish with one.
        self.errors = 0
        #: Bytes written since the transport asked us to pause (its buffer
        #: is full: Redis reads slower than we publish); None while it flows.
        self.backlog: int | None = None
        self.requests = 0
        self.replies = 0
        #: Whether Redis sent anything at all: a connection lost before that
        #: (TLS refused, Redis closing at once) is a failed attempt.
        self.answered = False
        self._markers: deque[tuple[float, int]] = deque()
        self._ticker: LoopingCall | None = None
        #: Deferreds waiting for the reply to one request: (its number in
        #: ``requests``, the Deferred), oldest first (see RedisBackplane.call).
        self.calls: deque[tuple[int, defer.Deferred[Any]]] = deque()
        #: The publisher's requests that are not publishes (PINGs, reads,
        #: loading the scripts), by number, oldest first, kept until
        #: answered: every other reply answers a publish.
        self.others: deque[int] = deque()

    def connectionMade(self) -> None:
        # Publishes are small writes that should leave at once; Nagle would
        # hold each behind the previous one's ACK.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        self._keepalive()
        if self.role == "publisher":
            self.transport.registerProducer(self, True)
        target = self.bridge.target
        if target.password is not None:
            auth = [target.username.encode()] if target.username else []
            self.send(b"AUTH", *auth, target.password.encode())
        if self.bridge.timeout > 0:
            self._ticker = LoopingCall.withCount(self._tick)
            self._ticker.clock = self.bridge.clock
            self._ticker.start(self.bridge.ping_interval, now=False)
        self.bridge.connection_made(self)

    def _keepalive(self) -> None:
        """Let the kernel probe an idle link, and sooner than its default 2 hours."""
        set_keepalive = getattr(self.transport, "setTcpKeepAlive", None)
        if set_keepalive is None:
            return  # not TCP (a test's transport, a UNIX socket)
        set_keepalive(True)
        handle = _socket_of(self.transport)
        if handle is None:
            return
        for name, value in KEEPALIVE:
            if hasattr(socket, name):
                try:
                    handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
                except OSError:
                    pass  # the platform refuses this knob: keepalive stays on anyway

    def _tick(self, ticks: int = 1) -> None:
        """Give up on a Redis that has kept a reply waiting too long; else PING it.

        ``ticks`` > 1 means intervals went by without a tick: this process
        itself was stalled (busy, paused), and the replies may be waiting
        unread in the socket, since the reactor runs due timers before it
        reads.  No verdict on Redis then, only on the next tick."""
        now = self.bridge.clock.seconds()
        markers = self._markers
        replies = self.replies
        while markers and markers[0][1] <= replies:
            markers.popleft()
        if ticks == 1 and markers and now - markers[0][0] >= self.bridge.timeout - _CLOCK_SLACK:
            self._give_up(now - markers[0][0])
            return
        self.ping()
        markers.append((now, self.requests))

    def fire_calls(self, reply: Any) -> None:
        """Fire the calls the replies so far have answered (``reply`` the last)."""
        calls = self.calls
        while calls and calls[0][0] <= self.replies:
            waiting = calls.popleft()[1]
            if isinstance(reply, hiredis.ReplyError):
                waiting.errback(BackplaneDown(f"{self.bridge.url} answered: {reply}"))
            else:
                waiting.callback(reply)

    def _give_up(self, waited: float) -> None:
        self._stop_ticking()
        self.bridge.timed_out(self, waited)
        # No goodbye: the link is silent, a FIN would only wait in a buffer.
        self.transport.abortConnection()

    def _stop_ticking(self) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None

    def ping(self) -> None:
        if self.role == "subscriber":
            self.requests += 1  # the publisher counts every command in send
        self.send(b"PING")

    def dataReceived(self, data: bytes) -> None:
        self.answered = True  # past TCP and TLS: Redis itself has spoken
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                self.bridge.reply_received(self, reply)
        except hiredis.ProtocolError as error:
            _log.error("backplane: bad reply from Redis: {error}", error=error)
            self.close()

    def close(self) -> None:
        """Close the connection cleanly.  The publisher first stops being the
        transport's producer: a TLS transport sends its close_notify only once
        no producer is registered, and until then the connection stays open."""
        if self.role == "publisher":
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_ticking()
        calls, self.calls = self.calls, deque()
        for _, waiting in calls:
            waiting.errback(BackplaneDown(f"lost the connection to {self.bridge.url}"))
        failure = _tls_failure(reason)
        if failure is not None:
            self.bridge.tls_failed(self, failure)
        self.bridge.connection_lost(self)

    def send(self, *args: bytes) -> None:
        """Send one command that is not a publish (those go by
        :meth:`RedisBackplane._write`)."""
        if self.role == "publisher":
            self.requests += 1
            others = self.others
            while others and others[0] <= self.replies:
                others.popleft()
            others.append(self.requests)
        self.transport.write(command(*args))

    def answered_publish(self) -> bool:
        """Whether the publisher's last reply answered a publish (not a
        request of :attr:`others`, nor one never sent)."""
        others, replies = self.others, self.replies
        while others and others[0] < replies:
            others.popleft()
        return replies <= self.requests and not (others and others[0] == replies)

    def unanswered_publishes(self) -> int:
        """The publishes sent on the publisher that Redis has not answered."""
        replies = self.replies
        return max(0, self.requests - replies - sum(1 for n in self.others if n > replies))

    # The publisher is the transport's producer, only to hear when its
    # buffer fills and drains again; publishes are pushed by clients.
    def pauseProducing(self) -> None:
        if self.backlog is None:
            self.backlog = 0

    def resumeProducing(self) -> None:
        self.backlog = None

    def stopProducing(self) -> None:
        self.backlog = None


def _socket_of(transport: Any) -> Any:
    """The socket under ``transport``, or None (a test's transport).

    A TLS transport's handle is its OpenSSL connection, with no socket of its
    own (memory BIO): the socket is the wrapped TCP transport's."""
    while transport is not None:
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
    return None


def _tls_failure(reason: Any) -> str | None:
    """Why TLS failed, in OpenSSL's words, when ``reason`` is a TLS failure.

    ``certificate verify failed``: we do not trust Redis's certificate;
    ``tlsv13 alert certificate required`` or ``... unknown ca``: Redis does
    not accept ours (or none); a host name mismatch comes from
    service_identity, through Twisted's hostname check.
    """
    if not isinstance(reason, Failure):
        return None
    error = reason.value
    if isinstance(error, SSLError):
        details = error.args[0] if error.args else None
        if isinstance(details, list) and details:
            return "; ".join(str(item[-1]) for item in details if item)
        return str(error) or type(error).__name__
    if isinstance(error, VerificationError):
        mismatches = ", ".join(str(e) for e in getattr(error, "errors", ()))
        return f"Redis's certificate is not for this host ({mismatches or error})"
    return None


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, bridge: RedisBackplane, role: str) -> None:
        self.bridge = bridge
        self.role = role

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.bridge, self.role)


class RedisBackplane(Service):
    """This node's side of the backplane; the engine's :class:`~pubsub.core.engine.Relay`.

    ``endpoint`` is where to connect (default: the URL's host and port, in TLS
    for ``rediss://``: see :meth:`build_endpoint`).  For ``rediss://``,
    ``trust_root`` is what signs Redis's certificate (an IOpenSSLTrustRoot;
    None: the system's trust store) and ``client_certificate`` a
    PrivateCertificate to show Redis (None: none).
    ``buffer_limit`` bounds the publishes queued past the transport's own
    buffer when Redis reads slower than this node publishes; past it a
    publish is refused as "behind".
    ``ping_interval`` and ``timeout`` are the health check: a PING every
    ``ping_interval`` seconds on each connection, closed when a reply has
    been waited for ``timeout`` seconds (0: no check).
    Counters for /metrics: ``sent`` (publishes sent to Redis), ``received``
    (delivered from another node), ``failed`` (publishes answered with the
    backplane error), ``reconnects``, ``timeouts`` (connections closed
    because Redis did not answer in time), ``lost`` (publishes Redis
    answered with an error, or not at all before the connection was lost:
    they may not have reached the other nodes); with one Redis always 0,
    for a Redis Cluster: ``redirected`` (publishes sent again where a
    redirect said) and ``dropped`` (subscriptions dropped by a failover).
    """

    redirected = 0
    dropped = 0

    def __init__(
        self,
        engine: Engine,
        url: str | RedisTarget,
        prefix: bytes = b"pubsub:",
        clock: Any = None,
        max_delay: float = 5.0,
        node_id: bytes | None = None,
        endpoint: Any = None,
        buffer_limit: int = 8 * 1024 * 1024,
        ping_interval: float = 1.0,
        timeout: float = 3.0,
        trust_root: Any = None,
        client_certificate: Any = None,
        interest: dict[str, set[bytes]] | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.engine = engine
        self.target = url if isinstance(url, RedisTarget) else parse_url(url)
        if not self.target.tls and (trust_root is not None or client_certificate is not None):
            raise ValueError("TLS settings need a rediss:// URL (TLS), not redis://")
        #: The TLS client options (host name checked) for rediss://, else None.
        self.tls: Any = None
        if self.target.tls:
            self.tls = optionsForClientTLS(
                self.target.host,
                trustRoot=trust_root if trust_root is not None else platformTrust(),
                clientCertificate=client_certificate,
            )
        self._tls_failure: str | None = None  # the one logged in this failure streak
        self.url = self.target.display
        self.prefix = prefix
        self._pattern_prefix = escape_glob(prefix)
        #: How each kind of name travels: the (un)subscribing commands, the
        #: publishing command's head, and the prefix of its name in Redis.
        self._subscribing = dict(_SUBSCRIBE)
        self._unsubscribing = dict(_UNSUBSCRIBE)
        self._publishing = dict(_PUBLISH)
        # By kind: a Kind, or a word of a subclass of its own (the cluster's census).
        self._wire_prefix: dict[str, bytes] = {
            Kind.CHANNEL: prefix,
            Kind.PATTERN: self._pattern_prefix,
            Kind.SHARD: prefix,
        }
        self.clock = clock
        self.max_delay = max_delay
        self.node_id = node_id if node_id is not None else new_node_id()
        if len(self.node_id) != NODE_ID_SIZE:
            raise ValueError(f"node id must be {NODE_ID_SIZE} bytes")
        self._envelope_head = self.node_id + b" "
        #: Names this node's clients hold, by kind: what Redis must know.  A
        #: Redis Cluster's shard link is given its share, and is not the relay.
        if interest is None:
            interest = {
                Kind.CHANNEL: set(engine.channels()),
                Kind.PATTERN: set(engine.patterns()),
                Kind.SHARD: set(engine.shard_channels()),
            }
            engine.relay = self
        self.interest = interest
        self._subscriber: _Connection | None = None
        self._publisher: _Connection | None = None
        self._subscriber_ready = False
        self.state = "connecting"
        self.since = clock.seconds()
        self._endpoint = endpoint
        #: Bytes of publishes queued for a Redis that does not keep up (0: no limit).
        self.buffer_limit = buffer_limit
        self.ping_interval = ping_interval
        self.timeout = timeout
        self._refused: str | None = None  # why the last publish went no further
        self.sent = 0
        self.received = 0
        self.failed = 0
        self.reconnects = 0
        self.timeouts = 0
        self.lost = 0
        #: Connections in a row, per role, lost before Redis said anything.
        self._unanswered = {"subscriber": 0, "publisher": 0}
        self._services: list[ClientService] = []
        #: Commands the publisher connection sends first, each time it
        #: connects (the history's SCRIPT LOADs), and again on NOSCRIPT.
        self.preamble: list[tuple[bytes, ...]] = []
        #: Where a positioned message goes (channel, payload, position): to
        #: the engine, or through the history, which fills gaps first; and
        #: whom to tell when the backplane is connected again after being
        #: down (the history, which looks for messages missed meanwhile).
        self.positioned: Callable[[bytes, bytes, Position], int] = engine.deliver_message_at
        self.came_back: Callable[[], None] | None = None

    # -- the service: two connections that come back -------------------------

    def startService(self) -> None:
        super().startService()
        _log.info("backplane: connecting to {url}", url=self.url)
        endpoint = self._endpoint
        if endpoint is None:
            from twisted.internet import reactor

            endpoint = self.build_endpoint(reactor)
        for role in ("subscriber", "publisher"):
            service = ClientService(
                endpoint,
                # An IProtocolFactory by zope's @implementer, which mypy cannot see.
                cast(IProtocolFactory, _ConnectionFactory(self, role)),
                retryPolicy=self._retry_policy(role),
                clock=self.clock,
            )
            service.startService()
            self._services.append(service)

    def build_endpoint(self, reactor: Any) -> Any:
        """TCP to the URL's host and port; for ``rediss://``, TLS over it."""
        # An IStreamClientEndpoint by zope's @implementer, which mypy cannot see.
        endpoint = cast(
            IStreamClientEndpoint,
            HostnameEndpoint(reactor, self.target.host, self.target.port, timeout=5),
        )
        if self.tls is not None:
            endpoint = wrapClientTLS(self.tls, endpoint)
        return endpoint

    def _retry_policy(self, role: str) -> Callable[[int], float]:
        """The backoff, counting connections lost before Redis answered as
        failed attempts: ClientService counts only failed connects, and
        starts again at the first step after each TCP connection, so a Redis
        that refuses our TLS would otherwise be retried every 0.1 s."""
        policy = backoff(self.max_delay)
        return lambda failed_attempts: policy(max(failed_attempts, self._unanswered[role]))

    def stopService(self) -> defer.Deferred[list[tuple[bool, None]]]:
        super().stopService()  # as in startService
        if self._publisher is not None:
            # ClientService closes it with loseConnection, which under TLS
            # waits for the producer to go (see _Connection.close).
            self._publisher.transport.unregisterProducer()
        services, self._services = self._services, []
        return defer.DeferredList([service.stopService() for service in services])

    # -- what the connections report -----------------------------------------

    def connection_made(self, connection: _Connection) -> None:
        if connection.role == "publisher":
            self._publisher = connection
            for args in self.preamble:
                connection.send(*args)
        else:
            self._subscriber = connection
            self._subscriber_ready = False
            self._resubscribe(connection)
        self._update_state()

    def connection_lost(self, connection: _Connection) -> None:
        if connection.answered:
            self._unanswered[connection.role] = 0
        else:
            self._unanswered[connection.role] += 1
        if connection.role == "publisher":
            self._lose_unanswered(connection)
        self._forget(connection)

    def _lose_unanswered(self, connection: _Connection) -> None:
        """The publisher ``connection`` is lost: count its publishes Redis
        had not answered, which it may have taken or not."""
        unanswered = connection.unanswered_publishes()
        if unanswered:
            self.lose("no answer before the connection was lost", unanswered)

    def lose(self, why: str, count: int = 1) -> None:
        """Count ``count`` publishes lost, for ``why``; the first is logged."""
        if self.lost == 0:
            warn_lost(self.url, why)
        self.lost += count

    def tls_failed(self, connection: _Connection, reason: str) -> None:
        """TLS with Redis failed: logged once per streak of failures (both
        connections, every retry), and again only if the reason changes."""
        if reason == self._tls_failure:
            return
        self._tls_failure = reason
        _log.error(
            "backplane: TLS with {url} failed ({role}): {reason}; retrying "
            "(not logged again until connected or the reason changes)",
            url=self.url,
            role=connection.role,
            reason=reason,
        )

    def _forget(self, connection: _Connection, quiet: bool = False) -> None:
        if connection is self._publisher:
            self._publisher = None
        elif connection is self._subscriber:
            self._subscriber = None
            self._subscriber_ready = False
        else:
            return  # already forgotten (timed out), or never current
        self._update_state(quiet)

    def timed_out(self, connection: _Connection, waited: float) -> None:
        """``connection`` waited ``waited`` seconds for Redis: it is as good as
        lost, now, though its transport reports the loss only later."""
        self.timeouts += 1
        _log.warn(
            "backplane: {url} did not answer the {role} for {waited:.1f} s; "
            "closing the connection and reconnecting",
            url=self.url,
            role=connection.role,
            waited=waited,
        )
        # Down at once, so the next publish is refused rather than written
        # to a dead link; the transport's connectionLost finds it forgotten.
        self._forget(connection, quiet=True)

    def _resubscribe(self, connection: _Connection) -> None:
        """Everything this node needs, in batches, then a PING whose answer
        says Redis has taken all of it."""
        for kind, names in self.interest.items():
            wire = [self._wire_name(kind, name) for name in names]
            for start in range(0, len(wire), RESUBSCRIBE_BATCH):
                connection.send(self._subscribing[kind], *wire[start : start + RESUBSCRIBE_BATCH])
        connection.ping()

    def _update_state(self, quiet: bool = False) -> None:
        up = self._publisher is not None and self._subscriber_ready
        state = "connected" if up else ("down" if self.state != "connecting" else "connecting")
        if state == self.state:
            return
        back = state == "connected" and self.state == "down"
        if back:
            self.reconnects += 1
        self.state = state
        self.since = self.clock.seconds()
        if state == "connected":
            self._tls_failure = None  # a new streak logs again
            _log.info("backplane: connected to {url}", url=self.url)
        elif self.running and not quiet:  # a timeout has said why, in one line
            _log.warn("backplane: lost {url}; reconnecting", url=self.url)
        if back and self.came_back is not None:
            self.came_back()

    def reply_received(self, connection: _Connection, reply: Any) -> None:
        if connection.role != "subscriber":
            connection.replies += 1  # one reply per command, in order
            if connection.calls:
                connection.fire_calls(reply)
            if isinstance(reply, hiredis.ReplyError):
                self._reply_error(connection, reply)
            return  # PUBLISH counts: node-local counts are what clients get
        if isinstance(reply, hiredis.ReplyError):
            if connection.replies < connection.requests:
                # A refusing Redis (NOAUTH) answers the PING with an error:
                # slow or not, it does answer.  Any error may stand for the
                # PING's, at most one reply per PING sent.
                connection.replies += 1
            self._reply_error(connection, reply)
            return
        if connection is not self._subscriber:
            return
        if isinstance(reply, list) and reply:
            push = reply[0]
            if push == b"message" and len(reply) == 3:
                self._deliver(
                    self.engine.deliver_message,
                    reply[2],
                    self._local(reply[1]),
                    at=self.positioned,
                )
            elif push == b"pmessage" and len(reply) == 4:
                pattern = reply[1][len(self._pattern_prefix) :]
                self._deliver(
                    self.engine.deliver_pmessage, reply[3], pattern, self._local(reply[2])
                )
            elif push == b"smessage" and len(reply) == 3:
                self._smessage(reply[1], reply[2])
            elif push == b"pong":
                self._pong(connection)
        elif reply == b"PONG":
            self._pong(connection)

    def _reply_error(self, connection: _Connection, reply: hiredis.ReplyError) -> None:
        if connection.role == "publisher":
            if connection.answered_publish():
                # It reached no node (NOSCRIPT, OOM, NOPERM, ...): counted
                # here, and the first error of the connection logged below.
                self.lose(f"answered {reply}")
            if str(reply).startswith("NOSCRIPT"):
                # Redis lost its scripts (SCRIPT FLUSH, a restart behind a
                # proxy): load them again, and the next commands work.
                for args in self.preamble:
                    connection.send(*args)
        connection.errors += 1
        if connection.errors == 1:
            _log.error(
                "backplane: Redis at {url} answered the {role}: {error} "
                "(further errors on this connection are not logged)",
                url=self.url,
                role=connection.role,
                error=str(reply),
            )

    def _pong(self, connection: _Connection) -> None:
        if connection.replies < connection.requests:  # see the error case above
            connection.replies += 1
            if connection.calls:
                connection.fire_calls(b"PONG")
        self._ready()

    def _ready(self) -> None:
        if not self._subscriber_ready:
            self._subscriber_ready = True
            self._update_state()

    def _local(self, name: bytes) -> bytes:
        return name[len(self.prefix) :]

    def _smessage(self, channel: bytes, data: bytes) -> None:
        self._deliver(self.engine.deliver_smessage, data, self._local(channel))

    def _deliver(
        self,
        deliver: Callable[..., int],
        data: bytes,
        *names: bytes,
        at: Callable[..., int] | None = None,
    ) -> None:
        """Deliver a message from Redis unless this node sent it itself.

        A message of a channel whose history Redis keeps comes in a
        positioned envelope, ``<node id>@<epoch> <offset> <payload>``, and is
        delivered whoever sent it: no node delivered it before it was in the
        history (see :mod:`pubsub.backplane.history`).  ``at`` delivers it with its
        position (to a channel's subscribers; a pattern's get no position).
        """
        mark = data[NODE_ID_SIZE : NODE_ID_SIZE + 1]
        if mark == b"@":
            self._deliver_positioned(deliver, data, names, at)
            return
        if data[:NODE_ID_SIZE] == self.node_id or mark != b" ":
            return  # our own, already delivered here; or not from a node
        self.received += 1
        deliver(*names, data[NODE_ID_SIZE + 1 :])

    def _deliver_positioned(
        self,
        deliver: Callable[..., int],
        data: bytes,
        names: tuple[bytes, ...],
        at: Callable[..., int] | None,
    ) -> None:
        fields = data[NODE_ID_SIZE + 1 :].split(b" ", 2)
        if len(fields) != 3 or not fields[1].isdigit():
            return  # not from a node
        epoch, offset, payload = fields
        if data[:NODE_ID_SIZE] != self.node_id:
            self.received += 1
        if at is None:
            deliver(*names, payload)
        else:
            at(*names, payload, Position(epoch.decode("ascii", "replace"), int(offset)))

    # -- the engine's Relay ---------------------------------------------------

    def _wire_name(self, kind: str, name: bytes) -> bytes:
        return self._wire_prefix[kind] + name

    def interest_gained(self, kind: str, name: bytes) -> None:
        self.interest[kind].add(name)
        if self._subscriber is not None:
            self._subscriber.send(self._subscribing[kind], self._wire_name(kind, name))

    def interest_lost(self, kind: str, name: bytes) -> None:
        self.interest[kind].discard(name)
        if self._subscriber is not None:
            self._subscriber.send(self._unsubscribing[kind], self._wire_name(kind, name))

    def published(self, kind: str, channel: bytes, payload: bytes) -> None:
        publisher = self._publisher
        if publisher is None or self.state != "connected":
            self.failed += 1
            self._refused = self.state
            return
        channel = self._wire_prefix[kind] + channel
        data = b"%s$%d\r\n%s\r\n$%d\r\n%s%s\r\n" % (
            self._publishing[kind],
            len(channel),
            channel,
            NODE_ID_SIZE + 1 + len(payload),
            self._envelope_head,
            payload,
        )
        self._send_publish(publisher, data)

    def _send_publish(self, publisher: _Connection, data: bytes) -> bool:
        if publisher.backlog is not None:
            # Redis is not keeping up: queue up to the limit, then refuse,
            # so a stalled Redis costs a bounded amount of memory.
            if self.buffer_limit and publisher.backlog + len(data) > self.buffer_limit:
                self.failed += 1
                self._refused = "behind"
                return False
            publisher.backlog += len(data)
        self._refused = None
        self.sent += 1
        self._write(publisher, data)
        return True

    # -- what a history in Redis needs (pubsub.backplane.history) ---------------
    #
    # Each takes the channel: a Redis Cluster's backplane sends each to the
    # shard that carries it; one Redis carries them all.

    def history_names(self, channel: bytes) -> tuple[bytes, bytes, bytes, tuple[bytes, ...]]:
        """Where ``channel``'s history lives and how its messages go out: the
        keys of its stream and of its position, its name in Redis, and the
        commands that publish a message there."""
        prefix = self.prefix
        return (
            prefix + b"history:" + channel,
            prefix + b"history-position:" + channel,
            prefix + channel,
            (b"PUBLISH",),
        )

    def carry(self, channel: bytes, data: bytes) -> bool:
        """Send ``data``, one whole command that publishes on ``channel`` (the
        history's script), under the same rules as a publish: False, with
        the refusal set for :meth:`refusal`, when it was not sent."""
        publisher = self._publisher
        if publisher is None or self.state != "connected":
            self.failed += 1
            self._refused = self.state
            return False
        return self._send_publish(publisher, data)

    def call(self, channel: bytes, *args: bytes) -> defer.Deferred[Any]:
        """Send one command about ``channel`` on the publisher connection: a
        Deferred of its reply, which fails with :class:`BackplaneDown` when
        the backplane is not connected, the connection is lost first, or
        Redis answers an error."""
        publisher = self._publisher
        if publisher is None or self.state != "connected":
            return defer.fail(BackplaneDown(f"{self.url} is {self.state}"))
        publisher.send(*args)
        waiting: defer.Deferred[Any] = defer.Deferred()
        publisher.calls.append((publisher.requests, waiting))
        return waiting

    def barrier(self, channel: bytes) -> defer.Deferred[Any]:
        """A Deferred that fires once Redis has taken every (un)subscription
        sent so far: from then on, whatever is published to this node's
        names (``channel`` among them) reaches it.  Fails with
        :class:`BackplaneDown` as :meth:`call`."""
        subscriber = self._subscriber
        if subscriber is None or self.state != "connected":
            return defer.fail(BackplaneDown(f"{self.url} is {self.state}"))
        subscriber.ping()  # answered after everything sent before it
        waiting: defer.Deferred[Any] = defer.Deferred()
        subscriber.calls.append((subscriber.requests, waiting))
        return waiting

    def _write(self, publisher: _Connection, data: bytes) -> None:
        """Send one publish (a whole command) on the publisher connection."""
        publisher.requests += 1
        publisher.transport.write(data)

    def refusal(self, receivers: int) -> str | None:
        reason = self._refused
        if reason is None:
            return None
        noun = "subscriber" if receivers == 1 else "subscribers"
        return f"BACKPLANE {self.url} is {reason}: delivered to {receivers} local {noun} only"

    # -- figures --------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What /healthz shows of the backplane."""
        return health_of(self)


def warn_lost(url: str, why: str) -> None:
    """Log the first publish a backplane counts in ``lost`` (sent to ``url``)."""
    _log.warn(
        "backplane: a publish to {url} may not have reached the other nodes: {why} "
        "(counted in pubsub_backplane_lost_total; not logged again)",
        url=url,
        why=why,
    )


def health_of(backplane: Any) -> dict[str, Any]:
    """What /healthz shows of any backplane: where, its state since when, this
    node's id and how many names its clients hold."""
    return {
        "url": backplane.url,
        "state": backplane.state,
        "since": round(float(backplane.since), 3),
        "node": backplane.node_id.decode(),
        "channels": len(backplane.interest[Kind.CHANNEL]),
        "patterns": len(backplane.interest[Kind.PATTERN]),
        "shard_channels": len(backplane.interest[Kind.SHARD]),
    }
