"""The WebSocket transport: Autobahn protocol and factory around one engine.

Each connection registers with the factory's engine when its WebSocket opens
and unregisters when it closes, however it closes.  Text frames are decoded by
``json_codec`` into commands for the shared command table; results go back as
text frames.  Deliveries are encoded once per publish by :class:`JsonFrames`
(one per factory) into an Autobahn ``PreparedMessage`` and written to every
receiver with ``sendPreparedMessage``.

Bad input costs the sender one error frame; only a message over the size limit
(1009, Autobahn's own check) or an internal fault (1011) closes the connection.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.logger import Logger

from pubsub import json_codec
from pubsub.commands import Error, Limits, Session, execute
from pubsub.config import Settings
from pubsub.engine import Engine

__all__ = ["SUBPROTOCOL", "JsonFrames", "PubSubServerFactory", "PubSubServerProtocol"]

#: The subprotocol a client may ask for; none at all is accepted too.
SUBPROTOCOL = "pubsub.json"

_BINARY_REFUSED = Error(
    "ERR Protocol error: binary frames are not accepted; send each command as a JSON text frame"
)


class JsonFrames:
    """The engine encoder of a factory: JSON text frames, framed once."""

    def __init__(self, factory: WebSocketServerFactory) -> None:
        self._prepare = factory.prepareMessage

    def message(self, channel: bytes, payload: bytes) -> PreparedMessage:
        return self._prepare(json_codec.message_frame(channel, payload))

    def pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> PreparedMessage:
        return self._prepare(json_codec.pmessage_frame(pattern, channel, payload))

    def smessage(self, channel: bytes, payload: bytes) -> PreparedMessage:
        return self._prepare(json_codec.smessage_frame(channel, payload))


_log = Logger()


class PubSubServerProtocol(WebSocketServerProtocol):
    """One client connection: a subscriber of the factory's engine."""

    factory: PubSubServerFactory
    session: Session | None = None

    @property
    def encoder(self) -> JsonFrames:
        return self.factory.frames

    def onConnect(self, request: ConnectionRequest) -> str | None:
        return SUBPROTOCOL if SUBPROTOCOL in request.protocols else None

    def onOpen(self) -> None:
        engine = self.factory.engine
        self.session = Session(engine, engine.register(self), self.factory.limits)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None:
            return
        try:
            if isBinary:
                results: list = [_BINARY_REFUSED]
            else:
                try:
                    args = json_codec.decode_command(payload)
                except json_codec.ProtocolError as error:
                    results = [Error(str(error))]
                else:
                    results = execute(self.session, args)
            for result in results:
                self.sendMessage(json_codec.encode_result(result))
        except Exception:  # noqa: BLE001 - any bug here must cost this client only
            _log.failure("internal fault handling a message from {peer}", peer=self.peer)
            self._fail_connection(
                WebSocketProtocol.CLOSE_STATUS_CODE_INTERNAL_ERROR, "internal error"
            )

    def deliver(self, frame: Any) -> None:
        # Between our close frame and the end of the connection, nothing more
        # may be sent; the engine forgets us in onClose.
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendPreparedMessage(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            self.factory.engine.unregister(self.session.token)
            self.session = None


class PubSubServerFactory(WebSocketServerFactory):
    """Builds connections that share one engine, under one set of limits."""

    protocol = PubSubServerProtocol

    def __init__(
        self,
        engine: Engine | None = None,
        settings: Settings | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(url)
        self.engine = engine if engine is not None else Engine()
        self.settings = settings if settings is not None else Settings()
        self.limits = Limits(
            max_subscriptions=self.settings.max_subscriptions,
            max_name_length=self.settings.max_name_length,
        )
        self.frames = JsonFrames(self)
        self.setProtocolOptions(
            maxMessagePayloadSize=self.settings.max_message_size,
            maxFramePayloadSize=self.settings.max_message_size,
            maxConnections=self.settings.max_connections,
            openHandshakeTimeout=self.settings.open_handshake_timeout,
            # Fail with a close frame that says why (1009, 1011, ...), not a bare drop.
            failByDrop=False,
        )
