"""The front door of the WebSocket port: each connection goes to Autobahn or twisted.web.

:class:`FrontFactory` is what the service listens with.  It reads a
request's head, opens the plain WebSocket upgrades nearly every client sends
itself (:mod:`pubsub.websocket.reader`), hands any other upgrade straight to
Autobahn, and everything else to a ``Site`` around
:class:`~pubsub.web.site.PubSubResource`.  It also asks the pub/sub port's
middlewares about each connection's address before a byte is read
(``on_accept``: ``max_connections_per_ip``, say), and bounds how long a
request's head may take.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site

from pubsub import internals
from pubsub.hosting.timers import Deadlines
from pubsub.policy.limits import peer_host
from pubsub.policy.middleware import Chain
from pubsub.web.site import RESERVED, PubSubResource
from pubsub.websocket.handshake import read_upgrade

__all__ = ["FrontFactory"]


class _Front(Protocol):
    """Reads a request's head, then gives the connection to Autobahn or twisted.web.

    A WebSocket upgrade on a pub/sub path (or /echo) goes straight to the
    Autobahn protocol: twisted.web would parse it first, build a Request,
    walk the resources and serialize the head again for Autobahn, about a
    third of what opening a connection costs. The plain request nearly
    every client sends (:func:`~pubsub.websocket.handshake.read_upgrade`) is opened
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
        # When the port's middlewares let it in by its address (on_accept),
        # that address; the front then stays between the transport and the
        # protocol it chose (``_inner``), to tell them when it ends.
        self._counted_as = counted_as
        self._inner: Any = None

    def connectionMade(self) -> None:
        if self._front.heads is not None:
            self._front.heads.add(self)

    def connectionLost(self, reason: Any = None) -> None:
        self._head_read()
        if self._counted_as is not None:
            self._front.chain.close(self._counted_as)  # type: ignore[union-attr]
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


class _Refused(Protocol):
    """A connection a middleware refused by its address (over
    ``max_connections_per_ip``, say): answered 503 with the reason before any
    of its request is read, so a flood from one address costs one write each."""

    transport: Any  # as _Front's

    def __init__(self, reason: str) -> None:
        body = reason.encode("utf-8") + b"\n"
        self._answer = (
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )

    def connectionMade(self) -> None:
        self.transport.write(self._answer)
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
        #: The pub/sub port's middlewares, when some screen addresses (else None).
        chain: Chain | None = self.resource.factory.chain
        self.chain = chain if chain is not None and chain.accepts else None
        #: Connections still sending their request's head, cut off after the
        #: site's timeout (``open_handshake_timeout``).
        self.heads: Deadlines | None = None
        timeout = getattr(site, "timeOut", None)
        if timeout:
            self.heads = Deadlines(clock, timeout, _abort)

    def buildProtocol(self, addr: Any) -> Protocol:
        if self.chain is None:
            return _Front(self)
        host = peer_host(addr)
        refusal = self.chain.accept(host)
        if refusal is not None:
            return _Refused(str(refusal))
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
        if first in RESERVED:
            return None
        return self.resource.factory
