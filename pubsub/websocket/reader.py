"""The lean reader: opens plain handshakes and reads plain text frames itself.

Autobahn's handshake and frame machine are general; what clients send
nearly always is one plain upgrade request, then unfragmented, masked text
frames.  :class:`LeanReader` opens the first (``open_upgrade``, handed the
request by the front door) and reads the others (``dataReceived``) at a
fraction of Autobahn's cost, leaving the connection as Autobahn would leave
it.  Anything else goes to Autobahn's own code from that frame on, so its
checks and close codes apply unchanged.  The private names of Autobahn this
relies on are behind :mod:`pubsub.internals`; the start-up self-check
(``protocol.check_fast_paths``) turns this path off on any difference.
"""

from __future__ import annotations

import codecs
import re
from collections import deque
from collections.abc import Callable
from typing import Any

import txaio
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from autobahn.websocket.types import ConnectionRequest
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet.interfaces import ISSLTransport

from pubsub import internals
from pubsub.websocket.handshake import Upgrade, accept_response

__all__ = ["LeanReader"]


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


class _OnFirstUse:
    """A class attribute that gives each instance its own ``make(instance)`` when first read.

    Autobahn's ``connectionMade`` sets the attribute itself; connections
    opened by :meth:`LeanReader.open_upgrade` build it only if Autobahn's
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


def _is_open(protocol: LeanReader) -> Any:
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


class LeanReader(WebSocketServerProtocol):
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
