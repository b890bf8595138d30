"""The Redis wire protocol: RESP2, and RESP3 after ``HELLO 3``, over TCP.

Any Redis client library, and ``redis-cli``, is a client of the engine here,
and its messages cross to and from WebSocket clients unchanged: payloads are
bytes end to end.  Requests are read by :mod:`pubsub.resp.reader`, with
Redis's limits and error texts (multibulk, as every client library sends,
and inline, what a person types into ``telnet``).  Commands run through the
same table as WebSocket's (:mod:`pubsub.core.commands`), plus the connection
commands only this transport has (:mod:`pubsub.resp.commands`).

Redis's rules hold: in RESP2 a client holding subscriptions may only run
the (P|S)(UN)SUBSCRIBE family, PING, QUIT and RESET; a malformed request gets
``-ERR Protocol error: ...`` and the connection is closed once that is sent.
Output goes through the same :class:`~pubsub.hosting.outbox.Outbox` as
WebSocket's, so the output buffer limits apply; a subscriber past them is disconnected, as
Redis disconnects it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from pubsub.core.commands import (
    Command,
    Confirm,
    Error,
    Pong,
    Reply,
    Result,
    Status,
    Verbatim,
    error_kind,
    refused,
    resolve,
)
from pubsub.core.engine import Encoder, Engine
from pubsub.hosting.outbox import Outbox
from pubsub.hosting.port import HostedClient, Port
from pubsub.operations.config import Settings
from pubsub.policy.auth import Guard
from pubsub.policy.limits import peer_host
from pubsub.policy.middleware import Client, Refused
from pubsub.resp.commands import RESP_COMMANDS, RespSession
from pubsub.resp.reader import ProtocolError, RequestReader

__all__ = ["RespFactory", "RespProtocol", "encode"]


_log = Logger()

# Commands a RESP2 client may run while it holds subscriptions (Redis's list).
_SUBSCRIBED_MODE = frozenset(
    {"ping", "subscribe", "ssubscribe", "unsubscribe", "sunsubscribe", "psubscribe"}
    | {"punsubscribe", "quit", "reset"}
)
#: With tokens in use a RESP2 subscriber may also renew its token, which
#: Redis (whose passwords do not expire) never needs.
_SUBSCRIBED_MODE_WITH_TOKENS = _SUBSCRIBED_MODE | {"auth"}


class _Frames:
    """The message frames of one RESP version, built once per publish."""

    __slots__ = ("_head",)

    def __init__(self, head: bytes) -> None:
        self._head = head  # b"*" (RESP2 array) or b">" (RESP3 push)

    def message(self, channel: bytes, payload: bytes) -> bytes:
        return b"%s3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            self._head,
            len(channel),
            channel,
            len(payload),
            payload,
        )

    def pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> bytes:
        return b"%s4\r\n$8\r\npmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            self._head,
            len(pattern),
            pattern,
            len(channel),
            channel,
            len(payload),
            payload,
        )

    def message_at(self, channel: bytes, payload: bytes, position: Any) -> bytes:
        # RESP clients see exactly Redis's message: no position.
        return self.message(channel, payload)

    def smessage(self, channel: bytes, payload: bytes) -> bytes:
        return b"%s3\r\n$8\r\nsmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            self._head,
            len(channel),
            channel,
            len(payload),
            payload,
        )


RESP2_FRAMES = _Frames(b"*")
RESP3_FRAMES = _Frames(b">")


def encode(value: Any, resp3: bool) -> bytes:
    """One reply value in RESP2 or RESP3."""
    kind = type(value)
    if kind is bytes:
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if kind is int:
        return b":%d\r\n" % value
    if kind is Status:
        return b"+%s\r\n" % value
    if kind is list:
        return b"*%d\r\n%s" % (len(value), b"".join(encode(item, resp3) for item in value))
    if kind is dict:
        body = b"".join(encode(k, resp3) + encode(v, resp3) for k, v in value.items())
        return (b"%%%d\r\n" if resp3 else b"*%d\r\n") % (len(value) * (1 if resp3 else 2)) + body
    if kind is Verbatim:
        if resp3:
            return b"=%d\r\ntxt:%s\r\n" % (len(value) + 4, value)
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if value is None:
        return b"_\r\n" if resp3 else b"$-1\r\n"
    raise TypeError(f"no RESP form for {kind.__name__}")


class RespProtocol(HostedClient, Protocol):
    """One RESP client: parses requests, runs them, writes replies and messages."""

    factory: RespFactory

    def __init__(self) -> None:
        self.session: RespSession | None = None
        self.resp3 = False
        # An Encoder, as the engine's Subscriber declares it: use_resp swaps it.
        self.encoder: Encoder = RESP2_FRAMES
        #: CLIENT SETNAME's name and CLIENT SETINFO's attributes.
        self.name: bytes | None = None
        self.lib_name: bytes | None = None
        self.lib_ver: bytes | None = None
        self._outbox: Outbox | None = None
        self._requests = RequestReader()
        self._closing = False
        #: Set by QUIT: close once this request's replies are sent.
        self.quitting = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._counted_as: str | None = None  # the address max_connections_per_ip counts
        # Read for every request: instance attributes cost less to read than
        # HostedClient's class-level defaults.
        self._client: Client | None = None
        self._waiting: Any = None

    # -- connection life ---------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self._requests = RequestReader(max_request=factory.settings.max_message_size)
        limit = factory.settings.max_connections
        if limit and len(factory.connections) >= limit:
            self._closing = True
            self.transport.write(b"-ERR max number of clients reached\r\n")
            self.transport.loseConnection()
            return
        chain = factory.chain
        if chain is not None and chain.accepts:
            host = peer_host(self.transport.getPeer())
            refusal = chain.accept(host)
            if refusal is not None:
                self._closing = True
                self.transport.write(_error_line(f"{refusal.code or 'ERR'} {refusal}"))
                self.transport.loseConnection()
                return
            self._counted_as = host
        # As Redis and Autobahn do: a reply written right after a push must
        # not wait for the client's delayed ACK (Nagle), ~40 ms each time.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        guard = self._host()
        if factory.middleware is not None and self.session is not None:
            self._admit(Client("resp", self.session.client_id, self._peer(), guard=guard))

    def _new_session(self, client_id: int, guard: Guard | None) -> RespSession:
        factory = self.factory
        return RespSession(factory.engine, client_id, factory.limits, self, guard)

    def _idled(self) -> None:
        # As Redis's timeout: the client is closed without a word.
        self.factory.idle_disconnects += 1
        self.close_after_reply()

    def connectionLost(self, reason: Any = None) -> None:
        if self._counted_as is not None:
            self.factory.chain.close(self._counted_as)  # type: ignore[union-attr]
            self._counted_as = None
        self._closing = True
        self._unhost()
        self.lost.callback(None)

    def close_after_reply(self) -> None:
        """Send what is queued, then close (QUIT, protocol errors, shutdown)."""
        self._closing = True
        self._leave_engine()
        if self._outbox is not None:
            self._outbox.finish()
            self._outbox = None
        self.transport.loseConnection()

    def _open_for_commands(self) -> bool:
        return not self._closing

    def _turn_away(self, refusal: Refused) -> None:
        # A middleware refused the client: it is told why, as Redis tells a
        # client over maxclients, and the connection closes.
        if self._outbox is not None:
            self._outbox.append(_error_line(f"{refusal.code or 'ERR'} {refusal}"))
        self.close_after_reply()

    def _revoke(self, reason: str) -> None:
        # Redis has no way to tell a client why it is cut off; it closes.
        _log.info("disconnecting {peer}: {reason}", peer=self._peer(), reason=reason)
        self.close_after_reply()

    def _slow_consumer(self, reason: str) -> None:
        # Runs inside a publish: it must not raise, nor touch the engine.
        # Redis drops such a client without a word, and so do we.
        self._closing = True
        self._outbox = None
        self.factory.slow_consumers += 1
        _log.info(
            "disconnecting slow subscriber {peer}: {reason}", peer=self._peer(), reason=reason
        )
        self.factory.reactor.callLater(0, self._leave_engine)
        self.transport.abortConnection()

    # -- output ------------------------------------------------------------------------

    def deliver(self, frame: bytes) -> None:
        if self._outbox is not None:
            self._outbox.append(frame)

    def use_resp(self, version: int) -> None:
        """Speak RESP2 or RESP3 from the next reply on (HELLO, RESET)."""
        self.resp3 = version == 3
        self.encoder = RESP3_FRAMES if self.resp3 else RESP2_FRAMES
        if self.session is not None:
            self.factory.engine.set_encoder(self.session.client_id, self.encoder)

    def _encode_result(self, result: Any) -> bytes:
        kind = type(result)
        if kind is Reply:
            return encode(result.value, self.resp3)
        if kind is Confirm:
            name = result.name
            return b"%s3\r\n$%d\r\n%s\r\n%s:%d\r\n" % (
                b">" if self.resp3 else b"*",
                len(result.verb),
                result.verb.encode("ascii"),
                encode(name, self.resp3),
                result.count,
            )
        if kind is Error:
            return _error_line(result.message)
        if kind is Pong:
            if not self.resp3 and self._subscribed():
                return b"*2\r\n$4\r\npong\r\n" + encode(result.payload or b"", False)
            if result.payload is None:
                return b"+PONG\r\n"
            return encode(result.payload, self.resp3)
        raise TypeError(f"unknown result {result!r}")

    # -- input -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._answer(self._receive, data)
        except Exception:  # noqa: BLE001 - any bug here must cost this client only
            _log.failure("internal fault handling a request from {peer}", peer=self._peer())
            self._refuse("ERR internal error")

    def _receive(self, data: bytes) -> None:
        """Run every complete request received, in order, as Redis's
        processInputBuffer; a protocol error is answered, then the end."""
        requests = self._requests
        requests.feed(data)
        guard = self.session.guard if self.session is not None else None
        # While a middleware decides, requests wait here, in the reader.
        while not self._closing and self._waiting is None:
            # Redis's smaller limits for a client that must still authenticate.
            requests.guarded = guard is not None and not guard.authenticated
            try:
                args = requests.gets()
            except ProtocolError as error:
                self._refuse(str(error))
                return
            if args is None:
                return
            self._run(args)

    def _run(self, args: Sequence[bytes]) -> None:
        session = self.session
        if session is None:
            return
        if self._idle is not None:
            self._idle.touch()
        command = resolve(args, RESP_COMMANDS)
        if isinstance(command, Error):
            results: list[Result] = [command]
        elif (refusal := refused(session, command)) is not None:
            results = [refusal]
        elif self._client is not None:  # a middleware chain: admitted
            screened = self._run_screened(command, args)
            if type(screened) is not list:
                self._wait(screened)
                return
            results = screened
        else:
            results = self._run_allowed(session, command, args)
        self._reply(results)

    def _run_allowed(self, session: Any, command: Command, args: Sequence[bytes]) -> list[Result]:
        # After the ACLs (the middlewares), as Redis: a RESP2 subscriber may
        # only run a few commands.
        if (
            not self.resp3
            and command.name.partition("|")[0]
            not in (_SUBSCRIBED_MODE if session.guard is None else _SUBSCRIBED_MODE_WITH_TOKENS)
            and self._subscribed()
        ):
            return [
                Error(
                    f"ERR Can't execute '{command.name}': only (P|S)SUBSCRIBE / "
                    "(P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
                )
            ]
        # resolve answers with a handler's entry, never a container's.
        assert command.handler is not None
        results: list[Result] = command.handler(session, args)
        return results

    def _reply(self, results: list[Result]) -> None:
        outbox = self._outbox
        if outbox is None:
            return  # QUIT has closed it, or the output limits have
        for result in results:
            if type(result) is Error:
                self.factory.errors[error_kind(result.message)] += 1
            outbox.append(self._encode_result(result))
        if self.quitting:
            self.close_after_reply()

    def _drain(self, waiting: Any) -> None:
        # What waited is in the reader: read on from there.
        self._answer(self._receive, b"")
        if self._waiting is None and not self._closing:
            self.transport.resumeProducing()

    def _refuse(self, message: str) -> None:
        """A protocol error: say so and close, as Redis does."""
        self.factory.errors[error_kind(message)] += 1
        if self._outbox is not None:
            self._outbox.append(_error_line(message))
        self.close_after_reply()


def _error_line(message: str) -> bytes:
    """An error reply; as Redis, line breaks inside become spaces (the text
    may quote a client's bytes, kept as they were by surrogateescape)."""
    line = message.encode("utf-8", "surrogateescape")
    return b"-%s\r\n" % line.replace(b"\r", b" ").replace(b"\n", b" ")


class RespFactory(Port, Factory[RespProtocol]):
    """Builds RESP connections that share one engine, under one set of limits."""

    protocol = RespProtocol
    transport_name = "resp"

    def __init__(
        self,
        engine: Engine | None = None,
        settings: Settings | None = None,
        reactor: Any = None,
        middleware: Sequence[Any] = (),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        settings = settings if settings is not None else Settings()
        self._build_port(engine, settings, reactor, middleware)
        self.started = reactor.seconds()

    def close_all(self) -> defer.Deferred[list[tuple[bool, None]]]:
        """Close every connection once what is queued for it is sent."""
        closing: list[defer.Deferred[None]] = []
        for connection in list(self.connections):
            closing.append(connection.lost)
            connection.close_after_reply()
        return defer.DeferredList(closing)
