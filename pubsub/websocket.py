"""The WebSocket transport: Autobahn protocols and factories around one engine.

Each pub/sub connection registers with the factory's engine when its WebSocket
opens and unregisters when it closes, however it closes.  Text frames are
decoded by ``json_codec`` into commands for the shared command table; results
go back as text frames.

Deliveries are framed once per publish, not once per receiver: the engine asks
each receiver's *encoder* for a frame once per publish and hands the same
object to every receiver that shares the encoder.  Connections without
compression share the factory's plain encoder (one text frame's bytes).
With permessage-deflate the server always negotiates
``server_no_context_takeover``, so a message compresses the same way for every
connection that agreed on the same window size and memory level: each such
group has its own encoder, which deflates once and writes the same bytes to
all of the group.  Either way a delivery is the same bytes appended to each
receiver's outbox.

The echo factory exists for conformance testing: it shares every protocol
option with the pub/sub factory (limits, compression), so what the Autobahn
TestSuite checks is what production runs.

Bad input costs the sender one error frame; only a message over the size limit
(1009, Autobahn's own check, which also bounds inflated size) or an internal
fault (1011) closes the connection.
"""

from __future__ import annotations

import codecs
import re
import struct
import types
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import txaio
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.compress import (
    PerMessageDeflate,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, ISSLTransport
from twisted.logger import Logger

from pubsub import internals, json_codec
from pubsub.auth import AuthError, Guard
from pubsub.commands import Error, error_kind, execute
from pubsub.config import Settings
from pubsub.engine import Engine
from pubsub.handshake import Upgrade, accept_response
from pubsub.hosting import HostedClient, Port
from pubsub.policy import BatchedTimer, OriginPolicy
from pubsub.vocabulary import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY,
    CLOSE_TOKEN,
    REASON_INTERNAL_ERROR,
    REASON_SHUTDOWN,
)

__all__ = [
    "SUBPROTOCOL",
    "EchoServerFactory",
    "EchoServerProtocol",
    "JsonFrames",
    "PubSubServerFactory",
    "PubSubServerProtocol",
]

#: The subprotocol a client may ask for; none at all is accepted too.
SUBPROTOCOL = "pubsub.json"

_BINARY_REFUSED = Error(
    "ERR Protocol error: binary frames are not accepted; send each command as a JSON text frame"
)

_log = Logger()

#: Turns a JSON text into the bytes of the frame that carries it.
Framer = Callable[[bytes], bytes]


class JsonFrames:
    """An engine encoder: each delivery as JSON, turned into a frame by ``framer``."""

    def __init__(self, framer: Framer) -> None:
        self._frame = framer

    def message(self, channel: bytes, payload: bytes) -> bytes:
        return self._frame(json_codec.message_frame(channel, payload))

    def pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> bytes:
        return self._frame(json_codec.pmessage_frame(pattern, channel, payload))

    def smessage(self, channel: bytes, payload: bytes) -> bytes:
        return self._frame(json_codec.smessage_frame(channel, payload))


def text_frame(payload: bytes) -> bytes:
    """A whole, uncompressed server text frame."""
    return _frame_header(0x81, len(payload)) + payload


def _frame_header(first: int, size: int) -> bytes:
    """An unmasked (server) frame header: FIN/RSV/opcode byte, then the length."""
    if size <= 125:
        return struct.pack("!BB", first, size)
    if size <= 0xFFFF:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


def close_reason(text: str) -> str:
    """``text`` cut to fit a close frame: at most 123 bytes of UTF-8."""
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR a client frame's payload with its 4-byte mask, as one big integer."""
    size = len(payload)
    key = (mask * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(size, "little")


class _Unfinished:
    """A text frame the lean path has begun and whose payload is still arriving.

    Each read's bytes are unmasked and checked once: the mask is applied
    from the right phase and an incremental decoder carries a character cut
    between reads, so a frame sent a byte at a time costs what it costs
    whole.  The unmasked payload is kept, masked again only if Autobahn must
    take over the frame (bad UTF-8), so Autobahn sees the bytes as sent.
    """

    __slots__ = ("check", "head", "mask", "payload", "size")

    def __init__(self, head: bytes, size: int) -> None:
        self.head = head  # the frame's header, mask included
        self.mask = head[-4:]
        self.size = size
        self.payload = bytearray()
        self.check = codecs.getincrementaldecoder("utf-8")()

    def take(self, data: bytes) -> int:
        """Take what ``data`` has of the payload; how much it took, or -1
        for bytes that cannot be UTF-8 (Autobahn fails the frame at once)."""
        chunk = data[: self.size - len(self.payload)]
        phase = len(self.payload) % 4
        plain = _unmask(chunk, self.mask[phase:] + self.mask[:phase])
        try:
            self.check.decode(plain, len(self.payload) + len(plain) == self.size)
        except UnicodeDecodeError:
            return -1
        self.payload += plain
        return len(chunk)

    def complete(self) -> bool:
        return len(self.payload) == self.size

    def as_sent(self) -> bytes:
        """The frame's bytes so far, as the client sent them."""
        return self.head + _unmask(bytes(self.payload), self.mask)


def deflating_framer(window_bits: int, mem_level: int, min_size: int) -> Framer:
    """Frame for one compression group: deflate payloads of ``min_size`` bytes or
    more, into a frame with RSV1 set; smaller ones go out as plain text frames."""

    def frame(payload: bytes) -> bytes:
        if len(payload) < min_size:
            return text_frame(payload)
        compressor = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window_bits, mem_level
        )
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        # RFC 7692: drop the 00 00 ff ff tail of the sync flush.
        return _frame_header(0xC1, len(data) - 4) + data[:-4]

    return frame


class _DeflateAccept(PerMessageDeflateOfferAccept):
    """Accepts permessage-deflate and always says ``server_no_context_takeover``.

    Autobahn announces that parameter only when the client asked for it; RFC
    7692 (7.1.1.1) lets the server say it anyway, and saying it lets every
    client drop its inflate history between messages too.
    """

    def get_extension_string(self) -> str:
        extension: str = super().get_extension_string()
        if self.no_context_takeover and not self.offer.request_no_context_takeover:
            name = self.EXTENSION_NAME
            extension = name + "; server_no_context_takeover" + extension[len(name) :]
        return extension


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
                return _DeflateAccept(
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


class _OnFirstUse:
    """A class attribute that gives each instance its own ``make(instance)`` when first read.

    Autobahn's ``connectionMade`` sets the attribute itself; connections
    opened by :meth:`_LeanReader.open_upgrade` build it only if Autobahn's
    frame machine (or someone asking for it) ever needs it, which a client
    of the lean path never makes it do. Until then it costs neither time nor
    memory.
    """

    def __init__(self, make: Callable[[Any], Any]) -> None:
        self._make = make
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__[self._name] = self._make(instance)
        return value


def _is_open(protocol: _LeanReader) -> Any:
    """The future that fires when the connection opens."""
    # txaio binds its API at run time, to the framework in use, so its
    # py.typed module declares none of it.
    if protocol._lean_opened:
        return txaio.create_future_success(None)  # type: ignore[attr-defined]
    return txaio.create_future()  # type: ignore[attr-defined]


def _transport_details(protocol: WebSocketServerProtocol) -> TransportDetails:
    """What Autobahn's ``connectionMade`` records of a connection's transport."""
    # Autobahn's annotation leaves out the None of a connection not yet made,
    # which it takes (peer "unknown").
    details = create_transport_details(
        protocol.transport,  # type: ignore[arg-type]
        protocol.is_server,
    )
    details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
    return details


class _LeanReader(WebSocketServerProtocol):
    """Opens plain handshakes and reads the frames clients send most at a
    fraction of Autobahn's cost.

    Both endpoints use it, so the Autobahn TestSuite, which runs against
    ``/echo``, checks the same opening and reading paths that pub/sub
    clients get.
    """

    # The reads that brought the start of a frame header the lean path waits to complete.
    _partial: tuple[bytes, ...] = ()
    _unfinished: _Unfinished | None = None  # a text frame whose payload is still arriving
    _lean_read = False  # whether the lean path has read a frame of this connection
    # Whether Autobahn's reader has been given bytes (the handshake, a frame
    # the lean path does not take): only then can it hold part of one.
    _autobahn_read = False
    _lean_opened = False  # whether open_upgrade opened this connection
    utf8validator = _OnFirstUse(lambda _: Utf8Validator())
    trafficStats = _OnFirstUse(lambda _: TrafficStats())
    # Its two system calls (the process and thread ids) and its objects, only
    # for whoever reads ``transport_details``.
    _transport_details = _OnFirstUse(_transport_details)
    # Fired at open; Autobahn's handshake reads (so builds) it then.
    is_open = _OnFirstUse(_is_open)
    # The factory's protocol options read here, which Autobahn sets without
    # declaring them (class attributes of the factory's own subclass, see
    # _ConfiguredFactory.setProtocolOptions).
    maxMessagePayloadSize: int
    maxConnections: int
    tcpNoDelay: bool
    trustXForwardedFor: int
    versions: list[int]
    allowedOriginsPatterns: list[re.Pattern[str]]
    # peer2str's text once connected. Autobahn's two bases disagree on it
    # (str | None, and str), which mypy reports for a subclass with two bases
    # of its own (PubSubServerProtocol) unless a class in between declares it.
    peer: str

    def __init__(self) -> None:
        if internals.fast_paths:
            internals.init_protocol(self)
        else:
            internals.init_as_autobahn(self)

    def open_upgrade(self, transport: Any, upgrade: Upgrade, head: bytes) -> bool:
        """Open on ``upgrade``, read from ``head`` (the request's head with the
        blank line that ends it), without Autobahn's handshake machinery.

        The connection is left as Autobahn's ``connectionMade``,
        ``processHandshake`` and ``succeedHandshake`` would leave it, and
        ``onConnect`` and ``onOpen`` are called as they call them. False,
        with nothing sent, when Autobahn must judge the request: an option
        this path does not implement, an origin Autobahn refuses, the
        ``maxConnections`` limit, or ``onConnect`` refusing or answering
        with more than a subprotocol, or the fast paths turned off
        (:func:`check_fast_paths`). The caller then hands the head to
        Autobahn, which calls ``onConnect`` again and answers as it always has.
        """
        factory = self.factory
        if (
            not internals.fast_paths
            or factory.headers
            or factory.externalPort
            or self.trustXForwardedFor
            or self.trackTimings
            or 13 not in self.versions
            or (self.maxConnections > 0 and factory.countConnections >= self.maxConnections)
            or (upgrade.origin and not self._origin_allowed(upgrade.origin))
            or (upgrade.extensions and factory.settings.compression)
        ):
            return False
        self.connected = 1
        self.transport = transport
        self.peer = peer2str(transport)
        request = ConnectionRequest(
            self.peer,
            upgrade.headers,
            upgrade.host,
            upgrade.path,
            upgrade.params,
            13,
            upgrade.origin,
            upgrade.protocols,
            upgrade.extensions,
        )
        try:
            chosen = self.onConnect(request)
        except Exception:  # noqa: BLE001 - Autobahn calls it again, and refuses (400, 500)
            return False
        if chosen is not None and (type(chosen) is not str or chosen not in upgrade.protocols):
            return False
        response = accept_response(upgrade.key, chosen, factory.server)
        try:
            transport.setTcpNoDelay(self.tcpNoDelay)
        except Exception:  # noqa: BLE001, S110 - as Autobahn: not every transport has Nagle
            pass
        internals.open_as_autobahn(
            self,
            upgrade.key,
            {
                "http_request_data": head,
                "http_status_line": upgrade.line,
                "http_headers": upgrade.headers,
                "http_request_uri": upgrade.target,
                "http_request_path": upgrade.path,
                "http_request_params": upgrade.params,
                "http_request_host": upgrade.host,
                "websocket_origin": upgrade.origin,
                "websocket_protocols": upgrade.protocols,
                "websocket_extensions": upgrade.extensions,
                "websocket_protocol_in_use": chosen,
                "websocket_extensions_in_use": [],
                "http_response_data": response.decode("utf-8"),
                "send_queue": deque(),
            },
            factory,
        )
        factory.countConnections += 1
        factory.lean_opens += 1
        internals.send_now(transport, [response])
        if ISSLTransport.providedBy(transport):
            internals.open_tls(self)
        else:
            self.onOpen()
        self._lean_opened = True
        waiting = self.__dict__.get("is_open")  # someone asked for it before now
        if waiting is not None:
            # txaio binds its API at run time, so its py.typed module declares none of it.
            txaio.resolve(waiting, None)  # type: ignore[attr-defined]
        return True

    def _origin_allowed(self, origin: str) -> bool:
        return internals.origin_allowed(origin, self.factory, self.allowedOriginsPatterns)

    def dataReceived(self, data: bytes) -> None:
        # The lean path: while no message is half-read, whole unfragmented
        # masked text frames of up to 64 KiB are taken here, which is what
        # clients send, at a fraction of the cost of Autobahn's general frame
        # machine. Anything else (control frames, fragments, binary, bad
        # UTF-8, sizes or length encodings Autobahn must judge, compression)
        # goes to Autobahn from that frame on, with everything after it.
        # Every byte is looked at once however the frames are split: only a
        # header's few bytes are ever joined with the next read.
        if self._unfinished is not None:
            data = self._go_on(self._unfinished, data)
            if not data:
                return
        held = self._partial
        if held:
            self._partial = ()
            data = b"".join((*held, data))
        if (
            self.state != WebSocketProtocol.STATE_OPEN
            or not internals.fast_paths
            or (self._autobahn_read and internals.reader_busy(self))
        ):
            self._to_autobahn(held, data)
            return
        pos, autobahn = self._take_text_frames(data)
        if autobahn:
            if pos:
                self._to_autobahn((), data[pos:])
            else:
                self._to_autobahn(held, data)
        elif pos < len(data):
            # The start of a header: kept as the reads brought it, for
            # Autobahn if it has to take the frame.
            self._partial = (*held, data[sum(map(len, held)) :]) if pos == 0 else (data[pos:],)

    def _to_autobahn(self, held: tuple[bytes, ...], data: bytes) -> None:
        """Give Autobahn ``data``, which begins with the reads ``held``, split
        as they came: Autobahn's handling of a bad frame depends on where
        the reads ended."""
        self._autobahn_read = True
        if held:
            for chunk in held:
                super().dataReceived(chunk)
            data = data[sum(map(len, held)) :]
        super().dataReceived(data)

    def _go_on(self, frame: _Unfinished, data: bytes) -> bytes:
        """Take ``data`` into the unfinished frame; what follows the frame
        (empty while it is still unfinished, or when Autobahn took over)."""
        # Bytes that cannot be UTF-8, or a connection no longer open (a timer
        # closed it meanwhile): from here on the frame is Autobahn's to judge.
        taken = frame.take(data) if self.state == WebSocketProtocol.STATE_OPEN else -1
        if taken < 0:
            self._unfinished = None
            self._to_autobahn((), frame.as_sent() + data)
            return b""
        if not frame.complete():
            return b""
        self._unfinished = None
        self._text_read(frame.payload.decode("utf-8"))
        return data[taken:]

    def _take_text_frames(self, data: bytes) -> tuple[int, bool]:
        """Handle the leading text frames, keeping one whose payload is still
        arriving; where they end, and whether Autobahn must take what
        follows (else it is the start of a header, or nothing)."""
        limit = self.maxMessagePayloadSize
        pos, end = 0, len(data)
        while pos < end:
            if self.state != WebSocketProtocol.STATE_OPEN:
                return pos, True
            # Each header byte is judged as it comes, as Autobahn judges it.
            if data[pos] != 0x81:  # FIN + text, no RSV
                return pos, True
            if end - pos < 2:
                break
            second = data[pos + 1]
            if second < 0x80 or second == 0xFF:  # unmasked, or a 64-bit length
                return pos, True
            size = second & 0x7F
            start = pos + 6
            if size == 126:
                if end - pos < 4:
                    break
                size = (data[pos + 2] << 8) | data[pos + 3]
                start += 2
                if size < 126:
                    return pos, True  # not the minimal length encoding
            if limit and size > limit:
                return pos, True  # Autobahn closes with 1009
            if end < start:
                break  # the header is not whole yet
            if end < start + size:
                frame = _Unfinished(data[pos:start], size)
                if frame.take(data[start:]) < 0:
                    return pos, True  # Autobahn fails it now, not once it is whole
                self._unfinished = frame
                return end, False
            payload = _unmask(data[start : start + size], data[start - 4 : start])
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                return pos, True  # Autobahn closes with 1007
            pos = start + size
            self._text_read(text)
        return pos, False

    def _text_read(self, text: str) -> None:
        if not self._lean_read:
            self._lean_read = True
            self.factory.lean_reads += 1
        if self.autoPingTimeoutCall:
            internals.data_frame_read(self)
        self._on_text(text)

    def _on_text(self, text: str) -> None:
        """A whole, valid text message taken by the lean path."""
        raise NotImplementedError


class PubSubServerProtocol(HostedClient, _LeanReader):
    """One client connection: a subscriber of the factory's engine.

    It is also the streaming producer of its transport: once the transport
    holds 64 KiB it cannot send, frames wait in the connection's outbox, under
    the output buffer limits (see ``pubsub.flow``).
    """

    factory: PubSubServerFactory
    encoder: JsonFrames
    _refused_origin: str | None = None  # set by onConnect, refused in onOpen
    _token: str | None = None  # the handshake's ?token=, checked once open
    _compressing = False  # permessage-deflate negotiated (set once open)

    def onConnect(self, request: ConnectionRequest) -> str | None:
        # Autobahn gives "" when the header is missing: not a browser.
        if not self.factory.origins.allows(request.origin or None):
            self._refused_origin = request.origin
        tokens = request.params.get("token")
        if tokens:
            self._token = tokens[0]
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
        if self._refused_origin is not None:
            self._refuse_origin(self._refused_origin)
            return
        try:
            self._open()
        except Exception:  # noqa: BLE001 - Autobahn would swallow it and leave the client hanging
            _log.failure("internal fault opening a connection from {peer}", peer=self.peer)
            internals.fail(self, CLOSE_INTERNAL_ERROR, REASON_INTERNAL_ERROR)

    def _open(self) -> None:
        # Only Autobahn's own handshake negotiates compression.
        compression = internals.compression(self) if self._autobahn_read else None
        self._compressing = compression is not None
        self.encoder = self.factory.encoder_for(compression)
        guard = self._host()
        if guard is not None:
            self._check_in(guard)

    def _check_in(self, guard: Guard) -> None:
        """Take the handshake's token, if any; a bad one closes with CLOSE_TOKEN."""
        token, self._token = self._token, None
        if token is not None:
            try:
                guard.login(token)
            except AuthError as error:
                self._revoke(str(error))
                return
        guard.expect_login(self.factory.settings.open_handshake_timeout)

    def _revoke(self, reason: str) -> None:
        """Authentication ended or failed: close with the token's code and say why."""
        self._close_for_policy(reason, CLOSE_TOKEN)
        self._leave_engine()

    def _refuse_origin(self, origin: str) -> None:
        # The handshake was accepted so that a browser sees the code and the
        # reason; an HTTP 403 would reach its script as a bare failure.
        self.factory.origin_refusals += 1
        self._close_for_policy(f"origin not allowed: {origin}")

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
            if self.session is not None and self.state == WebSocketProtocol.STATE_OPEN:
                if self._idle is not None:
                    self._idle.touch()
                self._reply([_BINARY_REFUSED])
        else:
            self._handle(payload)

    def _on_text(self, text: str) -> None:
        self._handle(text)

    def _handle(self, text: bytes | str) -> None:
        """One text message: a command, answered with its results."""
        if self.session is None or self.state != WebSocketProtocol.STATE_OPEN:
            # Once our close frame is out nothing more may be sent (RFC 6455,
            # 5.5.1), so nothing more is run, as Redis reads nothing more from
            # a client it is closing.
            return
        if self._idle is not None:
            self._idle.touch()
        try:
            try:
                args = json_codec.decode_command(text)
            except json_codec.ProtocolError as error:
                results: list[Any] = [Error(str(error))]
            else:
                results = execute(self.session, args)
            self._reply(results)
        except Exception:  # noqa: BLE001 - any bug here must cost this client only
            _log.failure("internal fault handling a message from {peer}", peer=self.peer)
            internals.fail(self, CLOSE_INTERNAL_ERROR, REASON_INTERNAL_ERROR)

    def _reply(self, results: list[Any]) -> None:
        compressing = self._compressing
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
    ) -> None:
        super().__init__(settings, url, reactor)
        # The front door counts connections per address (peers) for this port.
        self._build_port(engine, self.settings, self.reactor)
        self.origins = OriginPolicy(self.settings.allowed_origins)
        #: Handshakes closed with 1008 for their Origin since start-up.
        self.origin_refusals = 0
        #: Connections dropped for a missing pong since start-up.
        self.ping_timeouts = 0
        self.frames = JsonFrames(text_frame)
        self._deflate_groups: dict[tuple[int, int], JsonFrames] = {}

    def encoder_for(self, compression: PerMessageDeflate | None) -> JsonFrames:
        """The encoder shared by every connection that negotiated ``compression``."""
        if compression is None:
            return self.frames
        group = (compression.server_max_window_bits, compression.mem_level)
        encoder = self._deflate_groups.get(group)
        if encoder is None:
            framer = deflating_framer(*group, self.settings.compression_min_size)
            encoder = self._deflate_groups[group] = JsonFrames(framer)
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


class EchoServerProtocol(_LeanReader):
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

    from pubsub.handshake import read_upgrade

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
