"""The WebSocket transport: the pub/sub and echo protocols and their factories.

Each pub/sub connection is a :class:`~pubsub.hosting.port.HostedClient` of
its factory's engine from the moment its WebSocket opens until it closes,
however it closes.  Text frames are decoded by :mod:`.json_codec` into
commands for the shared command table; results go back as text frames,
and deliveries as frames built once per publish (:mod:`.framing`).  Both
protocols read through :class:`~pubsub.websocket.reader.LeanReader`.

The echo factory exists for conformance testing: it shares every protocol
option with the pub/sub factory (limits, compression), so what the Autobahn
TestSuite checks is what production runs.

Bad input costs the sender one error frame; only a message over the size limit
(1009, Autobahn's own check, which also bounds inflated size) or an internal
fault (1011) closes the connection.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import (
    PerMessageDeflate,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

from pubsub import internals
from pubsub.core.commands import Error, Result, error_kind, execute
from pubsub.core.engine import Engine
from pubsub.core.history import Position
from pubsub.core.vocabulary import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY,
    CLOSE_TOKEN,
    REASON_INTERNAL_ERROR,
    REASON_SHUTDOWN,
)
from pubsub.hosting.held import Held
from pubsub.hosting.port import HostedClient, Port
from pubsub.hosting.timers import BatchedTimer
from pubsub.operations.config import Settings
from pubsub.policy.auth import Guard
from pubsub.policy.limits import OriginPolicy
from pubsub.policy.middleware import Client, Refused
from pubsub.websocket import json_codec
from pubsub.websocket.commands import WS_COMMANDS, WsSession
from pubsub.websocket.framing import (
    DeflateAccept,
    JsonFrames,
    close_reason,
    deflating_framer,
    text_frame,
)
from pubsub.websocket.reader import LeanReader

__all__ = [
    "SUBPROTOCOL",
    "EchoServerFactory",
    "EchoServerProtocol",
    "PubSubServerFactory",
    "PubSubServerProtocol",
    "check_fast_paths",
]

#: The subprotocol a client may ask for; none at all is accepted too.
SUBPROTOCOL = "pubsub.json"

_BINARY_REFUSED = Error(
    "ERR Protocol error: binary frames are not accepted; send each command as a JSON text frame"
)

_log = Logger()


class _ConfiguredFactory(WebSocketServerFactory):
    """A server factory with every protocol option taken from the settings."""

    def __init__(
        self, settings: Settings | None = None, url: str | None = None, reactor: Any = None
    ) -> None:
        if not _checked:
            check_fast_paths()
        super().__init__(url, reactor=reactor)
        # Pings and handshake timeouts, on this factory's clock.
        internals.use_batched_timer(self, BatchedTimer(self.reactor))
        #: Connections opened by the front's own handshake, not Autobahn's,
        #: and connections with a frame read by the lean path, not Autobahn's
        #: reader, since start-up (the conformance run checks both).
        self.lean_opens = 0
        self.lean_reads = 0
        self.settings = settings if settings is not None else Settings()
        options: dict[str, Any] = {
            "maxMessagePayloadSize": self.settings.max_message_size,
            "maxFramePayloadSize": self.settings.max_message_size,
            "maxConnections": self.settings.max_connections,
            "openHandshakeTimeout": self.settings.open_handshake_timeout,
            # Keepalive: proxies see traffic on quiet connections, dead peers go.
            "autoPingInterval": self.settings.ping_interval,
            "autoPingTimeout": self.settings.ping_timeout,
            # Fail with a close frame that says why (1009, 1011, ...), not a bare drop.
            "failByDrop": False,
        }
        if self.settings.compression:
            options["perMessageCompressionAccept"] = self._accept_deflate
        self.setProtocolOptions(**options)

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        super().setProtocolOptions(*args, **kwargs)
        # Autobahn copies each of its protocol options from the factory into
        # every connection's __dict__, and pretty-prints them all for a debug
        # line nobody sees: work and memory per connection for values that
        # are the same in all of them.
        # A protocol class of this factory's own holds them as class
        # attributes instead, which Autobahn reads the same way and which
        # cost nothing per connection.
        base = type(self).protocol
        options = {name: _class_value(getattr(self, name)) for name in base.CONFIG_ATTRS}
        # type() makes a subclass of base, which mypy can only call a type.
        self.protocol = cast(
            "type[WebSocketServerProtocol]",
            type(
                base.__name__,
                (base,),
                {**options, "CONFIG_ATTRS": (), "__module__": base.__module__},
            ),
        )

    @staticmethod
    def _accept_deflate(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return DeflateAccept(
                    offer,
                    # Our side compresses every message on its own, so one
                    # compressed frame serves every connection of a group.
                    no_context_takeover=True,
                    # Ask the client to do the same where it can: the server
                    # then keeps no inflate history between messages.
                    request_no_context_takeover=offer.accept_no_context_takeover,
                )
        return None

    def should_compress(self, size: int) -> bool:
        """Whether a message of ``size`` bytes is worth compressing."""
        return size >= self.settings.compression_min_size


def _class_value(value: Any) -> Any:
    """``value`` as a class attribute that reads back unchanged from an instance."""
    return staticmethod(value) if isinstance(value, types.FunctionType) else value


class PubSubServerProtocol(HostedClient, LeanReader):
    """One client connection: a subscriber of the factory's engine.

    It is also the streaming producer of its transport: once the transport
    holds 64 KiB it cannot send, frames wait in the connection's outbox, under
    the output buffer limits (see ``pubsub.hosting.outbox``).
    """

    factory: PubSubServerFactory
    encoder: JsonFrames
    _compression: PerMessageDeflate | None = None  # permessage-deflate negotiated (once open)

    def onConnect(self, request: ConnectionRequest) -> str | None:
        if not request.protocols:
            return None
        if SUBPROTOCOL in request.protocols:
            return SUBPROTOCOL
        # Accepting without choosing one of the offered subprotocols makes
        # browsers fail the connection with no reason given; say why instead.
        raise ConnectionDeny(
            ConnectionDeny.BAD_REQUEST,
            f"unsupported subprotocol: offer {SUBPROTOCOL} or none",
        )

    def onOpen(self) -> None:
        try:
            self._open()
        except Exception:  # noqa: BLE001 - Autobahn would swallow it and leave the client hanging
            _log.failure("internal fault opening a connection from {peer}", peer=self.peer)
            internals.fail(self, CLOSE_INTERNAL_ERROR, REASON_INTERNAL_ERROR)

    def _open(self) -> None:
        # Only Autobahn's own handshake negotiates compression.
        compression = internals.compression(self) if self._autobahn_read else None
        self._compression = compression
        self._waiting = None  # the instance's own: _handle reads it per message
        self.encoder = self.factory.encoder_for(compression)
        guard = self._host()
        # The policies (the origin, the handshake's token) and the
        # application's middlewares decide whether the client stays.
        if self.factory.middleware is not None and self.session is not None:
            self._admit(
                Client(
                    "websocket",
                    self.session.client_id,
                    self._peer(),
                    self.http_request_path,
                    self.http_request_params,
                    self.http_headers,
                    guard,
                )
            )

    def _new_session(self, client_id: int, guard: Guard | None) -> WsSession:
        factory = self.factory
        return WsSession(factory.engine, client_id, factory.limits, self, guard)

    def hold(self) -> Held:
        """Hold this client's deliveries until :meth:`release` (see
        :mod:`pubsub.hosting.held`)."""
        assert self.session is not None  # only a command's handler holds
        held = Held(self.encoder, self.factory.output_limits.hard, self._slow_consumer)
        self.factory.engine.set_subscriber(self.session.client_id, held)
        return held

    def release(
        self, held: Held, channel: bytes, top: Position | None, results: list[Result]
    ) -> list[Result]:
        """Deliver to this client again: send ``results``, then what was
        held but ``channel``'s messages at or below ``top``.  Returns what
        is left to answer (nothing), for the command's Deferred."""
        session = self.session
        if session is None:
            return []  # gone meanwhile
        self.factory.engine.set_subscriber(session.client_id, self)
        if self._open_for_commands():
            self._reply(results)
            for frame in held.after(channel, top):
                self.deliver(frame)
        return []

    def use_positions(self) -> None:
        """From now on, messages of channels with a history carry their position."""
        if not self.encoder.positions and self.session is not None:
            self.encoder = self.factory.encoder_for(self._compression, positions=True)
            self.factory.engine.set_encoder(self.session.client_id, self.encoder)

    def _revoke(self, reason: str) -> None:
        """Authentication ended or failed: close with the token's code and say why."""
        self._close_for_policy(reason, CLOSE_TOKEN)
        self._leave_engine()

    def _open_for_commands(self) -> bool:
        return bool(self.state == WebSocketProtocol.STATE_OPEN)

    def _turn_away(self, refusal: Refused) -> None:
        """A middleware refused this client: close with its code (1008
        unless it gave one) and say why."""
        self._close_for_policy(str(refusal), refusal.close_code)
        self._leave_engine()

    def _idled(self) -> None:
        self.factory.idle_disconnects += 1
        seconds = self.factory.settings.idle_timeout
        self._close_for_policy(f"idle for {seconds:g} s (idle_timeout)")

    def _close_for_policy(self, reason: str, code: int = CLOSE_POLICY) -> None:
        # A close handshake (sendClose takes only application codes, not
        # 1008), without the warning line per connection that failing it
        # would log: the metrics count these.
        self.sendCloseFrame(code=code, reasonUtf8=close_reason(reason).encode("utf-8"))

    def onPing(self, payload: bytes) -> None:
        # A client's own keepalive is activity, as Redis counts its PING;
        # the pongs answering our pings are not, or nobody would ever idle.
        if self._idle is not None:
            self._idle.touch()
        super().onPing(payload)

    def onAutoPingTimeout(self) -> None:
        self.factory.ping_timeouts += 1
        super().onAutoPingTimeout()

    def dataReceived(self, data: bytes) -> None:
        self._answer(super().dataReceived, data)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._binary(payload)
        else:
            self._handle(payload)

    def _binary(self, payload: bytes) -> None:
        if self.session is not None and self.state == WebSocketProtocol.STATE_OPEN:
            if self._waiting is not None:
                self._waiting.append((self._binary, payload))
                return
            if self._idle is not None:
                self._idle.touch()
            self._reply([_BINARY_REFUSED])

    def _on_text(self, text: str) -> None:
        self._handle(text)

    def _handle(self, text: bytes | str) -> None:
        """One text message: a command, answered with its results."""
        if self.session is None or self.state != WebSocketProtocol.STATE_OPEN:
            # Once our close frame is out nothing more may be sent (RFC 6455,
            # 5.5.1), so nothing more is run, as Redis reads nothing more from
            # a client it is closing.
            return
        if self._waiting is not None:
            # A middleware is deciding, or a recovery is read: this waits its turn.
            self._waiting.append((self._handle, text))
            return
        if self._idle is not None:
            self._idle.touch()
        try:
            try:
                args = json_codec.decode_command(text)
            except json_codec.ProtocolError as error:
                results: Any = [Error(str(error))]
            else:
                if self.factory.middleware is None:
                    results = execute(self.session, args, WS_COMMANDS)
                else:
                    results = self._screened(args, WS_COMMANDS)
                if type(results) is not list:  # answered later (middlewares, recovery)
                    self._wait(results)
                    return
            self._reply(results)
        except Exception:  # noqa: BLE001 - any bug here must cost this client only
            _log.failure("internal fault handling a message from {peer}", peer=self.peer)
            internals.fail(self, CLOSE_INTERNAL_ERROR, REASON_INTERNAL_ERROR)

    def _reply(self, results: list[Any]) -> None:
        compressing = self._compression is not None
        for result in results:
            if type(result) is Error:
                self.factory.errors[error_kind(result.message)] += 1
            data = json_codec.encode_result(result)
            if compressing:
                self.sendMessage(data, doNotCompress=not self.factory.should_compress(len(data)))
            else:  # framed here: what sendMessage would send, without its bookkeeping
                self.sendData(text_frame(data))

    def deliver(self, frame: bytes) -> None:
        # Between our close frame and the end of the connection nothing more
        # may be sent; the engine forgets us in onClose.
        if self.state == WebSocketProtocol.STATE_OPEN:
            self._outbox.append(frame)  # type: ignore[union-attr]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Everything sent once open (replies, pongs, close frames) goes
        # through the outbox: behind waiting deliveries, so a client sees
        # frames in order, and written with them once per reactor turn.
        outbox = self._outbox
        if outbox is not None and not sync and not chopsize:
            outbox.append(data)
        else:
            super().sendData(data, sync, chopsize)

    def dropConnection(self, abort: bool = False) -> None:
        # What the outbox holds (a close frame, say) goes out before the end.
        if self._outbox is not None and not abort:
            self._outbox.flush()
        super().dropConnection(abort)

    def _slow_consumer(self, reason: str) -> None:
        # Runs inside a publish: it must not raise, nor touch the engine. The
        # close frame goes out behind what the transport already holds; if
        # the peer never reads it, Autobahn's close handshake timeout drops
        # the connection. The engine forgets this subscriber at the end of
        # the turn, as Redis frees such a client before its next poll, so
        # later publishes no longer count it.
        self._outbox = None
        self.factory.slow_consumers += 1
        internals.fail(self, CLOSE_POLICY, reason)
        self.factory.reactor.callLater(0, self._leave_engine)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._unhost()


class PubSubServerFactory(Port, _ConfiguredFactory):
    """Builds connections that share one engine, under one set of limits."""

    # Twisted types a factory's protocol as one whose factory is a Factory[Self],
    # which no protocol of Autobahn's unparameterised factory can declare.
    protocol = PubSubServerProtocol  # type: ignore[assignment]
    #: This transport's label in the metrics.
    transport_name = "websocket"

    def __init__(
        self,
        engine: Engine | None = None,
        settings: Settings | None = None,
        url: str | None = None,
        reactor: Any = None,
        middleware: Sequence[Any] = (),
    ) -> None:
        super().__init__(settings, url, reactor)
        #: The allowed_origins setting; refuses clients when it lists any.
        self.origins = OriginPolicy(self.settings.allowed_origins)
        # The front door asks the chain about each connection's address.
        self._build_port(
            engine,
            self.settings,
            self.reactor,
            middleware,
            on_connect=[] if self.origins.allow_all else [self.origins],
        )
        #: Connections dropped for a missing pong since start-up.
        self.ping_timeouts = 0
        self.frames = JsonFrames(text_frame)
        self._encoders: dict[tuple[int, int, bool], JsonFrames] = {}

    def encoder_for(
        self, compression: PerMessageDeflate | None, positions: bool = False
    ) -> JsonFrames:
        """The encoder shared by every connection that negotiated
        ``compression`` and asked for ``positions`` or not."""
        if compression is None and not positions:
            return self.frames
        group = (
            (0, 0)
            if compression is None
            else (
                compression.server_max_window_bits,
                compression.mem_level,
            )
        )
        key = (*group, positions)
        encoder = self._encoders.get(key)
        if encoder is None:
            framer = (
                text_frame
                if compression is None
                else deflating_framer(*group, self.settings.compression_min_size)
            )
            encoder = self._encoders[key] = JsonFrames(framer, positions)
        return encoder

    def close_all(self, reason: str = REASON_SHUTDOWN) -> defer.Deferred[list[tuple[bool, Any]]]:
        """Close every connection with 1001; fires when all have closed.

        A peer that does not answer is dropped by Autobahn's close handshake
        timeout, so this does not wait on anyone for long.
        """
        # Autobahn's is_closed futures (each fires with its connection).
        closing: list[defer.Deferred[Any]] = []
        for connection in list(self.connections):
            connection.sendCloseFrame(
                code=CLOSE_GOING_AWAY,
                reasonUtf8=reason.encode("utf-8"),
            )
            closing.append(connection.is_closed)
        return defer.DeferredList(closing)


class EchoServerProtocol(LeanReader):
    """Sends every message back as it came: the conformance suite's target."""

    factory: EchoServerFactory

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Autobahn still delivers messages once our close frame is out, and
        # refuses to send then: nothing is echoed.
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendMessage(
                payload, isBinary, doNotCompress=not self.factory.should_compress(len(payload))
            )

    def _on_text(self, text: str) -> None:
        self.onMessage(text.encode("utf-8"), False)


class EchoServerFactory(_ConfiguredFactory):
    """The echo endpoint, under exactly the pub/sub endpoint's protocol options."""

    # Twisted types a factory's protocol as one whose factory is a Factory[Self],
    # which no protocol of Autobahn's unparameterised factory can declare.
    protocol = EchoServerProtocol  # type: ignore[assignment]


_checked = False


def check_fast_paths() -> list[str]:
    """Open a connection through the front's own handshake and one through
    Autobahn's, in memory, from the same request, and compare them (once per
    process, when the first factory is made).

    On any difference (Autobahn changed what an open connection holds, or
    renamed what the fast paths call) one line is logged and the fast paths
    are turned off: every connection then opens and reads through
    Autobahn's own code, slower and correct.  The differences, empty when
    none.
    """
    global _checked
    _checked = True
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from pubsub.websocket.handshake import read_upgrade

    head = (
        b"GET /?a=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: pubsub.json\r\n\r\n"
    )
    # The casts: mypy does not see zope's @implementer, and Twisted's factory
    # returns what its protocol attribute is declared to build (see
    # PubSubServerFactory.protocol).
    address = cast(IAddress, IPv4Address("TCP", "127.0.0.1", 1))
    try:
        factory = PubSubServerFactory(Engine(), Settings(), reactor=Clock())
        fast = cast(PubSubServerProtocol, factory.buildProtocol(address))
        upgrade = read_upgrade(head[:-4])
        if upgrade is None or not fast.open_upgrade(StringTransport(), upgrade, head):
            found = ["the front's handshake did not open a plain request"]
        else:
            autobahns = cast(PubSubServerProtocol, factory.buildProtocol(address))
            internals.init_as_autobahn(autobahns)
            autobahns.makeConnection(StringTransport())
            autobahns.dataReceived(head)
            del autobahns._autobahn_read  # the lean reader's own notes, not Autobahn's
            del fast._lean_opened
            found = internals.differences(fast, autobahns)
    except Exception as error:  # noqa: BLE001 - any failure here means: use Autobahn's paths
        found = [f"{type(error).__name__}: {error}"]
    if found:
        internals.fast_paths = False
        _log.warn(
            "Autobahn differs from what the fast WebSocket paths expect ({differences}); "
            "every connection opens and reads through Autobahn's own code",
            differences="; ".join(found[:5]),
        )
    return found
