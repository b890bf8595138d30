"""The Python client on Twisted: Deferreds over Autobahn's WebSocket client.

A thin host around :class:`pubsub.client._core.ClientCore`: it opens
connections (``ws://`` or ``wss://``, through Twisted endpoints), sends the
frames the core returns, feeds it what arrives, and fires Deferreds from the
core's events. When a connection drops it reconnects with jittered exponential
backoff, and the core subscribes again to everything held; a channel
subscribed with :meth:`PubSubClient.resume` is RESUMEd from the last message
received, so that what was published meanwhile arrives, or the callbacks of
:meth:`PubSubClient.on_recovery_failed` are told it cannot. Commands given
while there is no connection fail at once with :class:`ConnectionError`.
When the server closes over the token (4001) and the token is a fixed string,
the client stops instead: state closed, and every call fails with
:class:`pubsub.client.TokenRefused` naming the server's reason.

Usage::

    client = yield connect("ws://127.0.0.1:9000/")
    yield client.subscribe("news", handler=lambda m: print(m.channel, m.data))
    receivers = yield client.publish("news", "hello")
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from pubsub.client._core import (
    CHANNEL,
    CLOSED,
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    PATTERN,
    SHARD,
    Backoff,
    ClientCore,
    Event,
    Handler,
    Message,
    Name,
    Position,
    ProtocolViolation,
    Recovery,
    RecoveryCallback,
    RecoveryFailed,
    Rejected,
    Request,
    Resolved,
    StateCallback,
    keepalive,
    numsub,
    parse_url,
    url_with_token,
)

__all__ = ["PubSubClient", "connect"]

_log = Logger()

#: A token, or a function returning one (or a Deferred or awaitable of one).
TokenSource = str | Callable[[], Any] | None


def connect(
    url: str = "ws://127.0.0.1:9000/",
    token: TokenSource = None,
    *,
    reconnect: bool = True,
    min_delay: float = 0.5,
    max_delay: float = 30.0,
    timeout: float = 10.0,
    tls: Any = None,
    reactor: Any = None,
    ping_interval: float = 20.0,
    ping_timeout: float = 20.0,
) -> defer.Deferred[PubSubClient]:
    """Open a client; fires with it once connected, or fails with ConnectionError.

    The first connection is not retried: a wrong URL fails fast. After that,
    a lost connection is retried (unless ``reconnect=False``) with delays
    between ``min_delay`` and ``max_delay`` seconds. ``token`` is called
    again on every (re)connect when it is a function; a fixed string that the
    server refuses or lets expire stops the client (:class:`TokenRefused`). ``tls`` is a client TLS
    options object (``twisted.internet.ssl.optionsForClientTLS``) for
    ``wss://``; by default the platform's trust roots check the host name.
    Every ``ping_interval`` seconds the client pings the server, and drops
    the connection (and reconnects) when nothing comes back within
    ``ping_timeout`` seconds: that is how a link gone silent is noticed.
    0 turns either off; a bad value raises ValueError at once.
    """
    client = PubSubClient(
        url,
        token,
        reconnect,
        min_delay,
        max_delay,
        timeout,
        tls,
        reactor,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
    return client._open().addCallback(lambda _: client)


class _Connection(WebSocketClientProtocol):
    """One WebSocket; hands everything to its client."""

    factory: _Factory

    @property
    def client(self) -> PubSubClient:
        return self.factory.client

    def __init__(self) -> None:
        super().__init__()
        self.opened: defer.Deferred[None] = defer.Deferred()

    def onOpen(self) -> None:
        self.client._on_open(self)
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.client._on_frame(self, payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.client._on_close(self, code, reason)


class _Factory(WebSocketClientFactory):
    """Autobahn's factory, with the client its connections report to."""

    client: PubSubClient


class PubSubClient:
    """A pub/sub client that stays connected; build it with :func:`connect`."""

    def __init__(
        self,
        url: str,
        token: TokenSource,
        reconnect: bool,
        min_delay: float,
        max_delay: float,
        timeout: float,
        tls: Any,
        reactor: Any,
        *,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.url = url
        self._address = parse_url(url)
        self._ping_interval, self._ping_timeout = keepalive(ping_interval, ping_timeout)
        self._token = token
        self._reconnect = reconnect
        self._backoff = Backoff(min_delay, max_delay)
        self._timeout = timeout
        self._tls = tls
        self._reactor = reactor
        self._core = ClientCore()
        self._waiting: dict[Request, defer.Deferred[Any]] = {}
        self._connection: _Connection | None = None
        self._retry: Any = None
        self._closing = False
        self._closed: list[defer.Deferred[None]] = []
        self._state_callbacks: list[StateCallback] = []
        self._recovery_callbacks: list[RecoveryCallback] = []
        self.state = CONNECTING

    # -- state --------------------------------------------------------------------------

    def on_state(self, callback: StateCallback) -> Callable[[], None]:
        """``callback(state, reason)`` on every change of :attr:`state`
        (connecting, connected, disconnected, closed); returns a remover."""
        self._state_callbacks.append(callback)
        return lambda: self._state_callbacks.remove(callback)

    def _set_state(self, state: str, reason: str | None = None) -> None:
        self.state = state
        for callback in list(self._state_callbacks):
            try:
                callback(state, reason)
            except Exception:  # noqa: BLE001 - a caller's bug must not stop the client
                _log.failure("state callback failed on {state}", state=state)

    # -- connections --------------------------------------------------------------------

    def _open(self) -> defer.Deferred[None]:
        """The first connection: no retry, a clear error."""
        d = self._attempt()

        def failed(failure: Any) -> Any:
            self._set_state(CLOSED, str(failure.value))
            return failure

        return d.addErrback(failed)

    def _fetch_token(self) -> defer.Deferred[Any]:
        token = self._token
        if not callable(token):
            return defer.succeed(token)
        result = token()
        if isinstance(result, defer.Deferred) or inspect.isawaitable(result):
            # ensureDeferred is typed for what it converts, a coroutine or a
            # Deferred; any other awaitable it refuses (NotACoroutineError),
            # which _attempt reports as a ConnectionError.
            return defer.ensureDeferred(result)  # type: ignore[arg-type]
        return defer.succeed(result)

    @defer.inlineCallbacks
    def _attempt(self) -> Any:
        """One connection attempt; fires once open, else fails with ConnectionError."""
        self._set_state(CONNECTING)
        try:
            token = yield self._fetch_token()
            factory = _Factory(
                url_with_token(self.url, token), protocols=["pubsub.json"], reactor=self._reactor
            )
            factory.protocol = _Connection
            factory.setProtocolOptions(
                openHandshakeTimeout=self._timeout,
                autoPingInterval=self._ping_interval,
                autoPingTimeout=self._ping_timeout,
            )
            host, port = self._address.host, self._address.port
            endpoint: Any = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
            if self._address.secure:
                endpoint = wrapClientTLS(self._tls or optionsForClientTLS(host), endpoint)
            factory.client = self
            connection = yield endpoint.connect(factory)
            yield connection.opened
        except ConnectionError:
            raise
        except Exception as error:  # refused, DNS, timeout, TLS: one message for all
            raise ConnectionError(f"cannot connect to {self.url}: {_reason(error)}") from error

    def _on_open(self, connection: _Connection) -> None:
        if self._closing:
            connection.sendClose(1000)
            return
        self._connection = connection
        self._backoff.reset()
        for frame in self._core.opened():
            # Autobahn's, unannotated: as for the factory in _attempt.
            connection.sendMessage(frame.encode("utf-8"))
        self._set_state(CONNECTED)

    def _on_close(self, connection: _Connection, code: int | None, reason: str | None) -> None:
        why = f"{code} {reason}" if reason else f"code {code}"
        if connection is not self._connection:
            if not connection.opened.called:
                connection.opened.errback(ConnectionError(f"cannot connect to {self.url}: {why}"))
            return
        self._connection = None
        # The state changes before the calls waiting fail, so their errbacks see it.
        events = self._core.closed(self.url, code, reason, callable(self._token))
        if self._closing:
            self._set_state(CLOSED, why)
            self._settle(events)
            closed, self._closed = self._closed, []
            for d in closed:
                d.callback(None)
        elif self._core.stopped is not None:
            # The server refused a token that cannot change: retrying is futile.
            self._closing = True
            self._set_state(CLOSED, str(self._core.stopped))
            self._settle(events)
        elif self._reconnect:
            self._set_state(DISCONNECTED, why)
            self._settle(events)
            self._schedule_retry()
        else:
            self._set_state(CLOSED, why)
            self._settle(events)

    def _schedule_retry(self) -> None:
        self._retry = self._reactor.callLater(self._backoff.next(), self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None

        def failed(failure: Any) -> None:
            if self._closing:
                self._set_state(CLOSED)
            else:
                self._set_state(DISCONNECTED, str(failure.value))
                self._schedule_retry()

        self._attempt().addErrback(failed)

    def close(self) -> defer.Deferred[None]:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self._closing = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._connection is None:
            if self.state != CLOSED:
                self._set_state(CLOSED)
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed.append(d)
        self._connection.sendClose(1000)
        return d

    # -- frames -------------------------------------------------------------------------

    def _on_frame(self, connection: _Connection, payload: bytes, binary: bool) -> None:
        try:
            if binary:
                raise ProtocolViolation("a binary frame")
            events = self._core.receive(payload)
        except ProtocolViolation as error:
            _log.error("dropping {url}: {error}", url=self.url, error=str(error))
            connection.dropConnection(abort=True)
            return
        self._settle(events)

    def _settle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Message):
                self._dispatch(event)
                continue
            if isinstance(event, RecoveryFailed):
                self._recovery_failed(event)
                continue
            d = self._waiting.pop(event.request, None)
            if isinstance(event, Resolved):
                if d is not None:
                    d.callback(event.value)
            elif isinstance(event, Rejected):
                if d is not None:
                    d.errback(event.error)
                elif event.request.internal:
                    _log.error(
                        "resubscribing to {names} was refused: {error}",
                        names=event.request.names,
                        error=str(event.error),
                    )

    def _dispatch(self, message: Message) -> None:
        for handler in self._core.handlers_for(message):
            try:
                handler(message)
            except Exception:  # noqa: BLE001 - one bad handler must not starve the others
                _log.failure("message handler failed on {channel!r}", channel=message.channel)

    def _recovery_failed(self, event: RecoveryFailed) -> None:
        if not self._recovery_callbacks:
            # Messages were missed: with nobody told, the log must say so.
            _log.warn(
                "recovering {channel!r} failed, messages may have been missed: {reason}",
                channel=event.channel,
                reason=event.reason,
            )
        for callback in list(self._recovery_callbacks):
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a caller's bug must not stop the client
                _log.failure("recovery callback failed on {channel!r}", channel=event.channel)

    # -- commands -----------------------------------------------------------------------

    def _call(
        self, build: Callable[..., tuple[Request, list[str]]], *args: Any
    ) -> defer.Deferred[Any]:
        connection = self._connection
        if connection is None:
            error: ConnectionError | None = self._core.refusal()
            if error is None:
                error = ConnectionError(f"not connected to {self.url} ({self.state})")
            return defer.fail(error)
        try:
            request, frames = build(*args)
        except (ValueError, TypeError) as error:
            return defer.fail(error)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting[request] = d
        for frame in frames:
            connection.sendMessage(frame.encode("utf-8"))  # _attempt
        return d

    def on_message(self, handler: Handler) -> Callable[[], None]:
        """``handler(message)`` for every message; returns a remover."""
        self._core.add_catch_all(handler)
        return lambda: self._core.remove_catch_all(handler)

    def on_recovery_failed(self, callback: RecoveryCallback) -> Callable[[], None]:
        """``callback(RecoveryFailed)`` whenever a RESUME cannot recover what
        was missed, the client's own on a reconnect included, or a resumed
        channel's live messages skip some (before the next); returns a
        remover. Without one, the failure is logged as a warning."""
        self._recovery_callbacks.append(callback)
        return lambda: self._recovery_callbacks.remove(callback)

    def subscribe(self, *channels: str, handler: Handler | None = None) -> defer.Deferred[int]:
        """SUBSCRIBE; fires with the count of channels and patterns held after it."""
        return self._call(self._core.subscribe, CHANNEL, channels, handler)

    def resume(
        self, channel: str, handler: Handler | None = None, position: Position | None = None
    ) -> defer.Deferred[Recovery]:
        """RESUME: subscribe to ``channel`` so that a reconnect recovers what
        was missed; fires with a :class:`Recovery` once the messages after
        ``position`` (by default the last one received; the first time, none)
        have been handled. A failed recovery also reaches
        :meth:`on_recovery_failed`."""
        return self._call(self._core.resume, channel, handler, position)

    def psubscribe(self, *patterns: str, handler: Handler | None = None) -> defer.Deferred[int]:
        return self._call(self._core.subscribe, PATTERN, patterns, handler)

    def ssubscribe(self, *channels: str, handler: Handler | None = None) -> defer.Deferred[int]:
        return self._call(self._core.subscribe, SHARD, channels, handler)

    def unsubscribe(self, *channels: str) -> defer.Deferred[int]:
        """UNSUBSCRIBE these channels (none: all); fires with the count left."""
        return self._call(self._core.unsubscribe, CHANNEL, channels)

    def punsubscribe(self, *patterns: str) -> defer.Deferred[int]:
        return self._call(self._core.unsubscribe, PATTERN, patterns)

    def sunsubscribe(self, *channels: str) -> defer.Deferred[int]:
        return self._call(self._core.unsubscribe, SHARD, channels)

    def publish(self, channel: str, message: str | bytes) -> defer.Deferred[int]:
        """PUBLISH; fires with the receiver count. Bytes travel as base64."""
        return self._call(self._core.publish, channel, message)

    def spublish(self, channel: str, message: str | bytes) -> defer.Deferred[int]:
        return self._call(self._core.publish, channel, message, True)

    def pubsub_channels(self, pattern: str | None = None) -> defer.Deferred[list[Name]]:
        args = ("PUBSUB", "CHANNELS") + ((pattern,) if pattern is not None else ())
        return self._call(self._core.command, *args)

    def pubsub_numsub(self, *channels: str) -> defer.Deferred[dict[Name, int]]:
        """PUBSUB NUMSUB; fires with ``{channel: subscribers}`` in the order asked."""
        return self._call(self._core.command, "PUBSUB", "NUMSUB", *channels).addCallback(numsub)

    def pubsub_numpat(self) -> defer.Deferred[int]:
        return self._call(self._core.command, "PUBSUB", "NUMPAT")

    def ping(self, text: str | None = None) -> defer.Deferred[str | bytes]:
        """PING; fires with the text echoed ("" without one)."""
        return self._call(self._core.ping, text)

    def auth(self, token: str) -> defer.Deferred[None]:
        """AUTH with a (new) token. When the client's token is a plain string,
        the accepted one is used on later reconnects too."""

        def accepted(_: Any) -> None:
            if not callable(self._token):
                self._token = token

        return self._call(self._core.command, "AUTH", token).addCallback(accepted)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text or type(error).__name__
