"""The private names of Autobahn, txaio and Twisted that the server touches: all of them, here.

The server takes a few shortcuts through library internals, for speed (the
front's own opening handshake, the lean frame reader, writing straight to a
socket) or for behaviour no public API offers.  Each goes through this
module and nowhere else; ``tests/unit/test_internals.py`` runs it against
the real classes (a real Autobahn protocol, a real ``tcp.Server`` on a
socket) and fails if a name moves; ``setup.cfg`` bounds autobahn, txaio
and twisted to the major versions tested.

Autobahn, ``autobahn.websocket.protocol.WebSocketProtocol`` and its server side:

- ``__init__``: what a new connection holds (:func:`init_protocol`, which
  leaves out the names in :data:`LAZY`; :func:`init_as_autobahn` is
  Autobahn's own).
- :data:`OPENED`: the attributes ``_connectionMade``, ``processHandshake``
  and ``succeedHandshake`` leave in a connection that has just opened,
  written by :func:`open_as_autobahn` (among them ``_perMessageCompress``
  and ``_wskey``); the names in :data:`LAZY`, ``_transport_details`` and
  ``is_open`` among them, are class attributes of
  ``pubsub.websocket.reader.LeanReader`` that build each connection's own
  object on first use.
- ``_onOpen``: how a TLS connection opens (it records the TLS channel id
  and the peer's certificate): :func:`open_tls`.
- ``_sendAutoPing``, ``_cancelAutoPingTimeoutCall``: the keepalive ping
  scheduled at open (by :func:`open_as_autobahn`), and the pong timer a
  data frame ends: :func:`data_frame_read`.
- ``_fail_connection``: a close with a code, as Autobahn fails a
  connection: :func:`fail`.
- ``_perMessageCompress``: the compression negotiated, if any:
  :func:`compression`.
- ``data``, ``current_frame``, ``inside_message``: whether Autobahn's frame
  reader holds part of a frame or a message: :func:`reader_busy`.
- ``_is_same_origin``, ``_url_to_origin``: Autobahn's own origin check,
  applied as its handshake applies it: :func:`origin_allowed`.
- ``autobahn.util._HAS_CLICK``: whether Autobahn colours the values of its
  debug lines, which it formats whatever the log level:
  :func:`plain_debug_values`.

txaio, through Autobahn's factory:

- ``_batched_timer``: the factory's ``IBatchedTimer``, with which Autobahn
  schedules every ping and handshake timeout: :func:`use_batched_timer`,
  :func:`open_as_autobahn`.

Twisted:

- ``twisted.internet.tcp.Connection``'s ``socket``, ``_tempDataBuffer``,
  ``dataBuffer``, ``offset`` and ``_writeDisconnected``: whether the
  transport holds unsent bytes, for writing straight to the socket:
  :func:`send_now`.
- the ``protocol`` of a TCP transport, and the ``wrappedProtocol`` of the
  ``ProtocolWrapper`` that TLS puts around it: no public API hands a
  connection to another protocol, so the front swaps them, as Autobahn's
  ``WebSocketResource`` does: :func:`protocol_of`, :func:`hand_over`.
- the reactor's ``_exitSignal``, the signal that stopped it, which twistd
  re-raises (a stop by SIGTERM would look like a failure):
  :func:`forget_exit_signal`.

Each has a safe way back.  The fast paths (the front's handshake and the
lean reader) run only while :data:`fast_paths` is true: at start-up
``websocket.check_fast_paths`` opens one connection each way in memory, and
on any difference logs one line and turns them off, so every connection
goes through Autobahn's own handshake and reader.  The direct send falls
back to the transport's ``writeSequence`` whenever a name is missing.
"""

from __future__ import annotations

import socket
from typing import Any

import autobahn.util
import txaio
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import abstract
from twisted.protocols.policies import ProtocolWrapper

_is_same_origin: Any
_url_to_origin: Any
try:
    from autobahn.websocket.protocol import _is_same_origin, _url_to_origin
except ImportError:  # moved: the fast path lets Autobahn judge every Origin
    _is_same_origin = _url_to_origin = None

__all__ = [
    "OPENED",
    "compression",
    "data_frame_read",
    "differences",
    "fail",
    "fast_paths",
    "forget_exit_signal",
    "hand_over",
    "init_as_autobahn",
    "init_protocol",
    "open_as_autobahn",
    "open_tls",
    "origin_allowed",
    "plain_debug_values",
    "protocol_of",
    "reader_busy",
    "send_now",
    "use_batched_timer",
]

#: Whether the front's own handshake and the lean reader may run; the
#: start-up self-check turns them off when Autobahn changed under them.
fast_paths = True

#: What Autobahn's ``_connectionMade`` and ``succeedHandshake`` leave in a
#: connection that has just opened, but for the objects each needs of its own.
OPENED: dict[str, Any] = {
    "_perMessageCompress": None,
    "trackedTimings": None,
    "state": WebSocketProtocol.STATE_OPEN,
    "send_state": WebSocketProtocol.SEND_STATE_GROUND,
    "data": b"",
    "triggered": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False,
    "failedByMe": False,
    "droppedByMe": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasServerConnectionDropTimeout": False,
    "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "autoPingTimeoutCall": None,
    "autoPingPending": None,
    "autoPingPendingCall": None,
    "autoPingPendingSeq": 0,
    "autoPingPendingSent": None,
    "websocket_version": 13,
    "inside_message": False,
    "current_frame": None,
}

#: Built on first use by the fast path (``websocket._OnFirstUse``), up front
#: by Autobahn: what each holds, by name.
LAZY = ("utf8validator", "trafficStats", "_transport_details", "is_open")


def init_protocol(protocol: Any) -> None:
    """What Autobahn's ``WebSocketProtocol.__init__`` leaves in a new
    connection, but for the names in :data:`LAZY` (its ``is_open`` future
    and its placeholder ``_transport_details``, which the fast path builds
    only if someone reads them)."""
    # txaio binds its API (create_future, ...) at run time, to the framework
    # in use, so its py.typed module declares none of it.
    protocol.is_closed = txaio.create_future()  # type: ignore[attr-defined]
    protocol.set_valid_events(["message"])


def init_as_autobahn(protocol: Any) -> None:
    """Autobahn's own ``__init__``, for a connection with nothing left lazy."""
    WebSocketProtocol.__init__(protocol)


def open_as_autobahn(protocol: Any, key: str, handshake: dict[str, Any], factory: Any) -> None:
    """Leave ``protocol`` as Autobahn's handshake leaves a connection it opened
    with Sec-WebSocket-Key ``key``, its first keepalive ping scheduled on
    ``factory``'s timer; ``handshake`` holds the request's figures
    (``http_*``, ``websocket_*``) and the per-connection objects."""
    state = protocol.__dict__
    state.update(OPENED)
    state.update(handshake)
    state["_wskey"] = key
    if protocol.autoPingInterval:
        protocol.autoPingPendingCall = factory._batched_timer.call_later(
            protocol.autoPingInterval, protocol._sendAutoPing
        )


def open_tls(protocol: Any) -> None:
    """Open a TLS connection as Autobahn does (records its channel id and peer certificate)."""
    protocol._onOpen()


def data_frame_read(protocol: Any) -> None:
    """What Autobahn does for every data frame it reads, while a pong is
    awaited (``autoPingTimeoutCall`` is set): a client that is sending is
    alive, whatever became of the pong."""
    if protocol.autoPingRestartOnAnyTraffic:
        protocol._cancelAutoPingTimeoutCall()


def fail(protocol: Any, code: int, reason: str) -> None:
    """Fail the connection with close ``code`` and ``reason``, as Autobahn does."""
    protocol._fail_connection(code, reason)


def compression(protocol: Any) -> Any:
    """The permessage-deflate state negotiated, or None."""
    return protocol._perMessageCompress


def reader_busy(protocol: Any) -> bool:
    """Whether Autobahn's frame reader holds part of a frame or a message, or
    inflates them (permessage-deflate): then every byte is Autobahn's."""
    return bool(
        protocol.data
        or protocol.current_frame is not None
        or protocol.inside_message
        or protocol._perMessageCompress is not None
    )


def origin_allowed(origin: str, factory: Any, patterns: Any) -> bool:
    """Whether Autobahn's own handshake would let ``origin`` in (False when
    that cannot be told here: Autobahn then judges it)."""
    if _url_to_origin is None or _is_same_origin is None:
        return False
    try:
        parts = _url_to_origin(origin)
    except ValueError:
        return False
    if parts == "null" and factory.allowNullOrigin:
        return True
    scheme = "https" if factory.isSecure else "http"
    return bool(_is_same_origin(parts, scheme, factory.externalPort or factory.port, patterns))


#: The methods of Autobahn's server protocol called here.
METHODS = ("_onOpen", "_sendAutoPing", "_cancelAutoPingTimeoutCall", "_fail_connection")


def differences(fast: Any, autobahns: Any) -> list[str]:
    """How a connection the fast path opened differs from one Autobahn's
    handshake opened from the same request: attributes only one of them has,
    plain values that differ, objects of different types (each connection
    has its own timers, futures and transport).  Empty when they agree."""
    mine, theirs = vars(fast), vars(autobahns)
    found = [f"Autobahn sets {name}" for name in sorted(set(theirs) - set(mine) - set(LAZY))]
    found += [f"Autobahn does not set {name}" for name in sorted(set(mine) - set(theirs))]
    found += [f"Autobahn has no {name}" for name in METHODS if not hasattr(autobahns, name)]
    for name, value in theirs.items():
        ours = getattr(fast, name, None) if name in LAZY else mine.get(name, value)
        if value is None or isinstance(value, str | bytes | int | float | list | dict):
            if ours != value:
                found.append(f"{name} is {value!r}, not {ours!r}")
        elif type(ours) is not type(value):
            found.append(f"{name} is a {type(value).__name__}, not a {type(ours).__name__}")
    return found


def plain_debug_values() -> None:
    """Have Autobahn format its debug lines' values as plain text.

    Autobahn builds the arguments of each ``log.debug`` call, a line per
    frame read and per connection event, even when debug is off; with click
    installed (as it often is) each value goes through ``click.style``,
    several calls per frame Autobahn reads (every frame of a compressed
    connection, pongs, fragments). Colour in debug lines nobody shows is
    not worth that. Without the name, nothing changes.
    """
    if hasattr(autobahn.util, "_HAS_CLICK"):
        autobahn.util._HAS_CLICK = False


def use_batched_timer(factory: Any, timer: Any) -> None:
    """Have Autobahn schedule the factory's pings and timeouts with ``timer``."""
    factory._batched_timer = timer


# The names the direct send reads on a TCP transport exist in this Twisted:
# FileDescriptor's class defaults for the buffer; tcp.Connection sets the rest.
_DIRECT_SEND = all(
    hasattr(abstract.FileDescriptor, name)
    for name in ("dataBuffer", "offset", "_writeDisconnected")
)


def send_now(transport: Any, frames: list[bytes]) -> None:
    """``transport.writeSequence(frames)``, sending at once when it can.

    Twisted's TCP transport buffers every write, registers for writability
    (an ``epoll_ctl``) and sends on the next poll, two system calls and a
    wake-up per connection. When its buffer is empty, as it is for a reader
    that keeps up, the bytes go straight to the socket as Redis sends them;
    whatever the socket does not take is handed to the transport as usual, so
    flow control and error handling stay Twisted's. Any other transport (TLS,
    tests, one still sending) just gets ``writeSequence``.

    Only the transport's own attributes are read: a wrapper such as TLS passes
    attribute lookups through to the TCP transport under it, whose socket
    must never see unencrypted bytes.
    """
    own = vars(transport)
    sock: socket.socket | None = own.get("socket")
    if (
        sock is None
        or not _DIRECT_SEND
        or own.get("_tempDataBuffer", True)
        # A connection that never had to buffer still has Twisted's class
        # defaults (b"" and 0) for these two.
        or len(own.get("dataBuffer", b"")) > own.get("offset", 0)
        or not transport.connected
        or transport.disconnecting
        or getattr(transport, "_writeDisconnected", False)
    ):
        transport.writeSequence(frames)
        return
    data = frames[0] if len(frames) == 1 else b"".join(frames)
    try:
        sent = sock.send(data)
    except OSError:  # EAGAIN, or a broken connection Twisted will notice and report
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])


def protocol_of(transport: Any) -> Any:
    """The protocol ``transport`` delivers to (TLS wraps it)."""
    if isinstance(transport, ProtocolWrapper):
        return transport.wrappedProtocol
    return getattr(transport, "protocol", None)


def hand_over(transport: Any, protocol: Any) -> None:
    """Have ``transport`` deliver to ``protocol`` from now on."""
    if isinstance(transport, ProtocolWrapper):  # TLS wraps the protocol
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol


def forget_exit_signal(reactor: Any, *signals: int) -> None:
    """If one of ``signals`` stopped the reactor, forget it, so that twistd
    exits 0 rather than re-raising it."""
    if getattr(reactor, "_exitSignal", None) in signals:
        reactor._exitSignal = None
