"""The Python client on asyncio: coroutines over the ``websockets`` library.

A thin host around :class:`pubsub.client._core.ClientCore`, like
``pubsub.client.twisted``: same commands, same reconnect and resubscribe, and
the same stop when the server refuses a fixed token, the same recovery of
resumed channels, and messages either through handlers or as an async
iterator::

    async with await connect("ws://127.0.0.1:9000/") as client:
        await client.subscribe("news")
        async for message in client.messages():
            print(message.channel, message.data)

Why ``websockets`` and not Autobahn's asyncio flavour: Autobahn picks its
event loop once per process (through txaio), and importing ``pubsub`` at all
loads Autobahn's Twisted flavour for the server, after which Autobahn's
asyncio module refuses to load. ``websockets`` has no such switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import ssl as _ssl
from collections.abc import Callable
from typing import Any, Final, Self

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as _ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

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

__all__ = ["MessageStream", "PubSubClient", "connect"]

# The standard library's logging: an asyncio program has no Twisted log observer.
_log = logging.getLogger(__name__)

#: A token, or a function returning one (or an awaitable of one).
TokenSource = str | Callable[[], Any] | None


async def connect(
    url: str = "ws://127.0.0.1:9000/",
    token: TokenSource = None,
    *,
    reconnect: bool = True,
    min_delay: float = 0.5,
    max_delay: float = 30.0,
    timeout: float = 10.0,
    ssl: _ssl.SSLContext | None = None,
    ping_interval: float = 20.0,
    ping_timeout: float = 20.0,
) -> PubSubClient:
    """Open a client once connected; ConnectionError if the first attempt fails.

    As ``pubsub.client.twisted.connect``: the first connection is not retried,
    later losses are (unless ``reconnect=False``), with jittered delays
    between ``min_delay`` and ``max_delay`` seconds; a ``token`` function is
    called on every (re)connect, while a fixed string that the server refuses
    or lets expire stops the client (:class:`TokenRefused`). ``ssl`` is the context for ``wss://``
    (default: the platform's trust roots, host name checked). The keepalive
    is the Twisted host's too: a ping every ``ping_interval`` seconds, and
    the connection dropped (then reconnected) when its pong has not come
    within ``ping_timeout`` seconds; 0 turns either off.
    """
    client = PubSubClient(
        url,
        token,
        reconnect,
        min_delay,
        max_delay,
        timeout,
        ssl,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
    await client._open()
    return client


class _End(enum.Enum):
    """The end of a stream's queue: a sentinel of its own type, which an
    ``is`` test tells apart from the messages."""

    END = enum.auto()


class MessageStream:
    """Every message from the moment it was made; ends when the client closes."""

    _END: Final = _End.END

    def __init__(self, client: PubSubClient) -> None:
        self._client = client
        self._queue: asyncio.Queue[Message | _End] = asyncio.Queue()
        client._streams.append(self)
        if client.state == CLOSED:
            self._queue.put_nowait(self._END)

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if item is self._END:
            self._queue.put_nowait(item)
            self.close()
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """Stop collecting messages."""
        if self in self._client._streams:
            self._client._streams.remove(self)


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
        ssl: _ssl.SSLContext | None,
        *,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
    ) -> None:
        self.url = url
        self._address = parse_url(url)
        self._ping_interval, self._ping_timeout = keepalive(ping_interval, ping_timeout)
        self._token = token
        self._reconnect = reconnect
        self._backoff = Backoff(min_delay, max_delay)
        self._timeout = timeout
        self._ssl = ssl
        self._core = ClientCore()
        self._waiting: dict[Request, asyncio.Future[Any]] = {}
        self._ws: ClientConnection | None = None
        # Requests must reach the core in the order their frames are sent.
        self._send_lock = asyncio.Lock()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._streams: list[MessageStream] = []
        self._state_callbacks: list[StateCallback] = []
        self._recovery_callbacks: list[RecoveryCallback] = []
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self.state = CONNECTING

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- state --------------------------------------------------------------------------

    def on_state(self, callback: StateCallback) -> Callable[[], None]:
        """``callback(state, reason)`` on every change of :attr:`state`; returns a remover."""
        self._state_callbacks.append(callback)
        return lambda: self._state_callbacks.remove(callback)

    def _set_state(self, state: str, reason: str | None = None) -> None:
        self.state = state
        for callback in list(self._state_callbacks):
            try:
                callback(state, reason)
            except Exception:  # noqa: BLE001 - a caller's bug must not stop the client
                _log.exception("state callback failed on %s", state)

    # -- connections --------------------------------------------------------------------

    async def _fetch_token(self) -> str | None:
        token = self._token
        if callable(token):
            token = token()
            if inspect.isawaitable(token):
                token = await token
        return token

    async def _attempt(self) -> ClientConnection:
        self._set_state(CONNECTING)
        token = await self._fetch_token()
        try:
            return await _ws_connect(
                url_with_token(self.url, token),
                subprotocols=[Subprotocol("pubsub.json")],
                open_timeout=self._timeout,
                ssl=(self._ssl or True) if self._address.secure else None,
                # The server bounds message sizes; a delivery is never refused here.
                max_size=None,
                compression=None,
                proxy=None,
                # websockets' None is off, as our 0 is.
                ping_interval=self._ping_interval or None,
                ping_timeout=self._ping_timeout or None,
            )
        except Exception as error:  # refused, DNS, timeout, TLS, HTTP: one message for all
            reason = str(error).strip() or type(error).__name__
            raise ConnectionError(f"cannot connect to {self.url}: {reason}") from error

    async def _open(self) -> None:
        try:
            ws = await self._attempt()
        except ConnectionError as error:
            self._set_state(CLOSED, str(error))
            raise
        await self._opened(ws)
        self._runner = asyncio.get_running_loop().create_task(self._run(ws))

    async def _opened(self, ws: ClientConnection) -> None:
        async with self._send_lock:
            self._backoff.reset()
            for frame in self._core.opened():
                with contextlib.suppress(ConnectionClosed):  # the reader notices
                    await ws.send(frame)
            self._ws = ws
        self._set_state(CONNECTED)

    async def _run(self, ws: ClientConnection) -> None:
        """Read until the connection ends; reconnect while wanted."""
        try:
            while True:
                code, reason = await self._read(ws)
                self._ws = None
                # The state changes before the calls waiting fail, so they see it.
                events = self._core.closed(self.url, code, reason, callable(self._token))
                why = f"{code} {reason}" if reason else f"code {code}"
                if self._core.stopped is not None and not self._closing:
                    # The server refused a token that cannot change: retrying is futile.
                    self._closing = True
                    why = str(self._core.stopped)
                if self._closing or not self._reconnect:
                    self._set_state(CLOSED, why)
                    self._settle(events)
                    return
                self._set_state(DISCONNECTED, why)
                self._settle(events)
                ws = await self._reconnect_with_backoff()
                await self._opened(ws)
        except asyncio.CancelledError:
            self._ws = None
            self._settle(self._core.lost(f"client for {self.url} closed"))
            self._set_state(CLOSED)
        finally:
            for stream in list(self._streams):
                stream._queue.put_nowait(MessageStream._END)

    async def _reconnect_with_backoff(self) -> ClientConnection:
        while True:
            await asyncio.sleep(self._backoff.next())
            try:
                return await self._attempt()
            except ConnectionError as error:
                self._set_state(DISCONNECTED, str(error))

    async def _read(self, ws: ClientConnection) -> tuple[int | None, str]:
        """Feed the core every frame; returns the close code and reason."""
        try:
            async for text in ws:
                if isinstance(text, bytes):
                    raise ProtocolViolation("a binary frame")
                self._settle(self._core.receive(text))
        except ConnectionClosed:
            pass
        except ProtocolViolation as error:
            _log.error("dropping %s: %s", self.url, error)
            await ws.close(1002, "protocol violation")
        return ws.close_code, ws.close_reason or ""

    async def close(self) -> None:
        """Stop reconnecting and close the connection; returns once closed."""
        self._closing = True
        runner = self._runner
        if runner is None or runner.done():
            if self.state != CLOSED:
                self._set_state(CLOSED)
            return
        ws = self._ws
        if ws is not None:
            await ws.close()
        else:
            runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner

    # -- frames -------------------------------------------------------------------------

    def _settle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Message):
                self._dispatch(event)
                continue
            if isinstance(event, RecoveryFailed):
                self._recovery_failed(event)
                continue
            future = self._waiting.pop(event.request, None)
            if future is not None and future.done():
                future = None  # its caller gave up on it (cancelled)
            if isinstance(event, Resolved):
                if future is not None:
                    future.set_result(event.value)
            elif isinstance(event, Rejected):
                if future is not None:
                    future.set_exception(event.error)
                elif event.request.internal:
                    _log.error(
                        "resubscribing to %s was refused: %s", event.request.names, event.error
                    )

    def _dispatch(self, message: Message) -> None:
        for handler in self._core.handlers_for(message):
            try:
                self._run_handler(handler(message))
            except Exception:  # noqa: BLE001 - one bad handler must not starve the others
                _log.exception("message handler failed on %r", message.channel)
        for stream in self._streams:
            stream._queue.put_nowait(message)

    def _recovery_failed(self, event: RecoveryFailed) -> None:
        if not self._recovery_callbacks:
            # Messages were missed: with nobody told, the log must say so.
            _log.warning(
                "recovering %r failed, messages may have been missed: %s",
                event.channel,
                event.reason,
            )
        for callback in list(self._recovery_callbacks):
            try:
                self._run_handler(callback(event))
            except Exception:  # noqa: BLE001 - a caller's bug must not stop the client
                _log.exception("recovery callback failed on %r", event.channel)

    def _run_handler(self, result: object) -> None:
        """What a handler or callback returned: an awaitable runs as a task."""
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_tasks.discard)

    # -- commands -----------------------------------------------------------------------

    async def _call(self, build: Callable[..., tuple[Request, list[str]]], *args: Any) -> Any:
        """Send the frames of ``build(*args)``; the answer, as the server sent
        it (JSON): each command's caller names its type."""
        async with self._send_lock:
            ws = self._ws
            if ws is None:
                raise self._core.refusal() or ConnectionError(
                    f"not connected to {self.url} ({self.state})"
                )
            request, frames = build(*args)
            future = asyncio.get_running_loop().create_future()
            self._waiting[request] = future
            for frame in frames:
                with contextlib.suppress(ConnectionClosed):  # the reader fails the request
                    await ws.send(frame)
        return await future

    def messages(self) -> MessageStream:
        """An async iterator of every message from now on, ending when the
        client closes. It buffers what you have not read yet."""
        return MessageStream(self)

    def on_message(self, handler: Handler) -> Callable[[], None]:
        """``handler(message)`` for every message (a coroutine function runs
        as a task); returns a remover."""
        self._core.add_catch_all(handler)
        return lambda: self._core.remove_catch_all(handler)

    def on_recovery_failed(self, callback: RecoveryCallback) -> Callable[[], None]:
        """``callback(RecoveryFailed)`` whenever a RESUME cannot recover what
        was missed, the client's own on a reconnect included, or a resumed
        channel's live messages skip some (a coroutine function runs as a
        task); returns a remover. Without one, the failure is logged as a
        warning."""
        self._recovery_callbacks.append(callback)
        return lambda: self._recovery_callbacks.remove(callback)

    async def subscribe(self, *channels: str, handler: Handler | None = None) -> int:
        """SUBSCRIBE; returns the count of channels and patterns held after it."""
        held: int = await self._call(self._core.subscribe, CHANNEL, channels, handler)
        return held

    async def resume(
        self, channel: str, handler: Handler | None = None, position: Position | None = None
    ) -> Recovery:
        """RESUME: subscribe to ``channel`` so that a reconnect recovers what
        was missed; returns a :class:`Recovery` once the messages after
        ``position`` (by default the last one received; the first time, none)
        have been handled. A failed recovery also reaches
        :meth:`on_recovery_failed`."""
        recovery: Recovery = await self._call(self._core.resume, channel, handler, position)
        return recovery

    async def psubscribe(self, *patterns: str, handler: Handler | None = None) -> int:
        held: int = await self._call(self._core.subscribe, PATTERN, patterns, handler)
        return held

    async def ssubscribe(self, *channels: str, handler: Handler | None = None) -> int:
        held: int = await self._call(self._core.subscribe, SHARD, channels, handler)
        return held

    async def unsubscribe(self, *channels: str) -> int:
        """UNSUBSCRIBE these channels (none: all); returns the count left."""
        left: int = await self._call(self._core.unsubscribe, CHANNEL, channels)
        return left

    async def punsubscribe(self, *patterns: str) -> int:
        left: int = await self._call(self._core.unsubscribe, PATTERN, patterns)
        return left

    async def sunsubscribe(self, *channels: str) -> int:
        left: int = await self._call(self._core.unsubscribe, SHARD, channels)
        return left

    async def publish(self, channel: str, message: str | bytes) -> int:
        """PUBLISH; returns the receiver count. Bytes travel as base64."""
        receivers: int = await self._call(self._core.publish, channel, message)
        return receivers

    async def spublish(self, channel: str, message: str | bytes) -> int:
        receivers: int = await self._call(self._core.publish, channel, message, True)
        return receivers

    async def pubsub_channels(self, pattern: str | None = None) -> list[Any]:
        # The names are str, or bytes when not UTF-8 (Name); pubsub.client.cli hands
        # them on to pubsub_numsub, which takes str.
        args = ("PUBSUB", "CHANNELS") + ((pattern,) if pattern is not None else ())
        channels: list[Any] = await self._call(self._core.command, *args)
        return channels

    async def pubsub_numsub(self, *channels: str) -> dict[Name, int]:
        """PUBSUB NUMSUB as ``{channel: subscribers}`` in the order asked."""
        return numsub(await self._call(self._core.command, "PUBSUB", "NUMSUB", *channels))

    async def pubsub_numpat(self) -> int:
        patterns: int = await self._call(self._core.command, "PUBSUB", "NUMPAT")
        return patterns

    async def ping(self, text: str | None = None) -> str | bytes:
        """PING; returns the text echoed ("" without one)."""
        echoed: Name = await self._call(self._core.ping, text)
        return echoed

    async def auth(self, token: str) -> None:
        """AUTH with a (new) token; a plain-string token is replaced by it for
        later reconnects."""
        await self._call(self._core.command, "AUTH", token)
        if not callable(self._token):
            self._token = token
