"""The client's sans-I/O core: commands to frames, frames to replies and messages.

Both hosts (``pubsub.client.twisted`` and ``pubsub.client.asyncio``) own a
:class:`ClientCore` and do only I/O around it: they send the text frames it
returns, feed it every text frame received, and turn the :class:`Resolved` and
:class:`Rejected` events it returns into their own Deferreds or futures.

What lives here:

- matching answers to requests in order (a SUBSCRIBE of n channels is answered
  by n confirmation frames; an UNSUBSCRIBE of everything, whose answer has no
  known length, is followed by a PING whose pong closes it);
- ``["error", text]`` as :class:`ReplyError` carrying the Redis-style code;
- payloads: ``{"base64": ...}`` arrives as bytes, bytes are published as base64;
- the subscriptions held (confirmed and not given up), replayed on reconnect;
- recovery (docs/protocol.md, Recovery): the last position of each channel
  subscribed with RESUME, from which a new connection RESUMEs it, so that
  what was published meanwhile arrives, or :class:`RecoveryFailed` says it
  cannot;
- message handlers per channel, pattern and shard channel, and catch-alls;
- the reconnect backoff and the connection URL with its token;
- telling a close over the token (code 4001, ``CLOSE_TOKEN``; from an older
  server, 1008 with one of its token reasons) from any other, and stopping
  for good when the token is a fixed string that the server will only
  refuse again.

Nothing here imports Twisted, asyncio or a WebSocket library, and nothing here
does I/O or keeps time.
"""

from __future__ import annotations

import base64
import json
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pubsub.core.vocabulary import CLOSE_POLICY, CLOSE_TOKEN, Kind

__all__ = [
    "CHANNEL",
    "CLOSED",
    "CONNECTED",
    "CONNECTING",
    "DISCONNECTED",
    "NO_HISTORY",
    "NO_POSITION",
    "PATTERN",
    "SHARD",
    "Address",
    "Backoff",
    "ClientCore",
    "Handler",
    "Message",
    "Name",
    "Position",
    "ProtocolViolation",
    "Recovery",
    "RecoveryCallback",
    "RecoveryFailed",
    "Rejected",
    "ReplyError",
    "Request",
    "Resolved",
    "StateCallback",
    "Target",
    "TokenRefused",
    "is_token_close",
    "keepalive",
    "never_arrived",
    "numsub",
    "parse_url",
    "url_with_token",
]

#: A channel name or payload as received: text when UTF-8, else bytes.
Name = str | bytes

#: Where a message stands in its channel's history: ``(epoch, offset)``.
Position = tuple[str, int]

#: Why a channel resumed on a new connection cannot be recovered when it kept
#: no history on the last one (the server's own words for that case).
NO_HISTORY = "the channel keeps no history"
#: Why, when the last connection was lost between RESUME's confirmation and
#: the position that closes its answer: there is nothing to resume from.
NO_POSITION = "the connection was lost before the channel's position arrived"


def never_arrived(epoch: str, first: int, last: int) -> str:
    """Why, when a resumed channel's live messages skip the offsets ``first``
    to ``last``: the server could not deliver them (docs/protocol.md,
    Recovery across nodes). pubsub.js words it the same."""
    which = f"message {first}" if first == last else f"messages {first} to {last}"
    return f"{which} of epoch {epoch} never arrived"


#: A client's states: opening a connection, open, lost and about to retry, finished.
CONNECTING, CONNECTED, DISCONNECTED, CLOSED = "connecting", "connected", "disconnected", "closed"

#: The three kinds of subscription (each a ``str``: "channel", "pattern", "shard").
CHANNEL, PATTERN, SHARD = Kind.CHANNEL, Kind.PATTERN, Kind.SHARD

_SUBSCRIBE: dict[str, str] = {kind: kind.subscribe.upper() for kind in Kind}
_UNSUBSCRIBE: dict[str, str] = {kind: kind.unsubscribe.upper() for kind in Kind}
_PUSH_KIND = {kind.message: kind for kind in Kind}
#: The frames that close RESUME's answer, after its confirmation and replay.
_RECOVERY_ANSWERS = ("position", "recovery_failed")


class ReplyError(Exception):
    """The server refused a command: ``code`` is the Redis-style code
    (``ERR``, ``NOPERM``, ``NOAUTH``, ``WRONGPASS``, ...), ``str()`` the whole text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.code = text.split(" ", 1)[0]


class ProtocolViolation(Exception):
    """A server frame that breaks docs/protocol.md; the connection cannot be trusted."""


class TokenRefused(ConnectionError):
    """The server closed the connection over the client's token (bad, expired,
    or never given in time) and the token cannot be renewed, as it is a fixed
    string: the client has stopped. ``reason`` is the server's close reason,
    ``code`` its close code (``CLOSE_TOKEN``, or 1008 from an older server)."""

    def __init__(self, url: str, reason: str, code: int = CLOSE_TOKEN) -> None:
        super().__init__(
            f"{url} closed the connection: {reason} ({code}); the token is fixed, "
            "so the client will not reconnect with it"
        )
        self.url = url
        self.reason = reason
        self.code = code


#: How an older server's token close reasons begin: before ``CLOSE_TOKEN`` it
#: closed over a token with 1008, which other policy closes (a full output
#: buffer) use too, and only the reason told them apart.
TOKEN_CLOSE_REASONS = (
    "authentication required",  # no AUTH within open_handshake_timeout
    "token expired",  # exp passed without a renewing AUTH
    "token does not allow ",  # a renewing token dropped a held channel
    "token has expired",  # the handshake's token was already past exp
    "token signed with ",  # wrong algorithm for the configured keys
    "invalid token",  # signature, audience, issuer, missing claims, not a JWT
    "claim ",  # a claim of the wrong type
    "no token can be checked",  # the server has no key
)


def is_token_close(code: int | None, reason: str | None) -> bool:
    """Whether a close frame is the server refusing the connection's token."""
    if code == CLOSE_TOKEN:
        return True
    # None of TOKEN_CLOSE_REASONS is empty: an empty reason is no token close.
    return code == CLOSE_POLICY and reason is not None and reason.startswith(TOKEN_CLOSE_REASONS)


@dataclass(frozen=True)
class Message:
    """One delivery. ``type`` is "message", "pmessage" (``pattern`` is set) or
    "smessage"; ``data`` is ``str`` when the payload is UTF-8, else ``bytes``.
    ``position`` is the message's ``(epoch, offset)`` in its channel's history,
    which the server adds to the ``message`` frames of channels with a history
    once the connection has used RESUME; else None."""

    type: str
    channel: Name
    data: Name
    pattern: Name | None = None
    position: Position | None = None

    @property
    def kind(self) -> str:
        """``type``, by its earlier name."""
        return self.type


@dataclass(eq=False)
class Request:
    """A command waiting for its answer. ``internal`` ones (resubscriptions)
    have no caller waiting."""

    command: str
    answer: str  # the frame type that answers it: "reply", "pong" or a confirmation
    expected: int | None  # confirmations still due; None: until the closing pong
    kind: str | None = None
    names: tuple[str, ...] = ()
    internal: bool = False
    values: list[Any] = field(default_factory=list)
    error: ReplyError | None = None
    #: For a RESUME sent on a new connection without a position: why what
    #: was published while the client was away cannot be recovered, reported
    #: as :class:`RecoveryFailed` once the answer is in.
    unrecoverable: str | None = None


@dataclass(frozen=True)
class Recovery:
    """The answer to RESUME. ``recovered``: the server sent every message
    published after the position given (none given: nothing was missed), and
    ``reason`` is None; else ``reason`` is the server's, no message was
    replayed, and only live ones follow. ``position`` is the channel's
    ``(epoch, offset)`` after the answer, None when it keeps no history (so a
    later reconnect cannot recover it)."""

    channel: str
    recovered: bool
    reason: str | None
    position: Position | None


@dataclass(frozen=True)
class RecoveryFailed:
    """A RESUME could not recover what was missed on ``channel``, for ``reason``;
    the channel is subscribed all the same, at ``position`` (None: no history).
    It comes from any RESUME, the client's own on a new connection included,
    and before a resumed channel's live message that comes after a gap (the
    reason :func:`never_arrived`, the position the message's), so that a gap
    is never silent: the application reloads its state another way."""

    channel: str
    reason: str
    position: Position | None


@dataclass(frozen=True)
class Resolved:
    request: Request
    value: Any


@dataclass(frozen=True)
class Rejected:
    request: Request
    error: Exception


Event = Resolved | Rejected | Message | RecoveryFailed
Handler = Callable[[Message], object]
RecoveryCallback = Callable[[RecoveryFailed], object]
#: ``callback(state, reason)``; reason says why a connection ended, else None.
StateCallback = Callable[[str, "str | None"], object]
#: A handler's key: (kind, name).
Target = tuple[str, str]


def _name(value: Any) -> str:
    """A channel or pattern as the protocol takes it: text (bytes must be UTF-8)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"channel names and patterns must be UTF-8 over WebSocket: {value!r}"
            ) from None
    if isinstance(value, str):
        return value
    raise TypeError(f"a channel name or pattern is str or bytes, not {type(value).__name__}")


def _payload(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"a message is str or bytes, not {type(value).__name__}")


def _received(value: Any) -> Name:
    """A wire string or ``{"base64": ...}`` object as str or bytes."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("base64"), str):
        return base64.b64decode(value["base64"])
    raise ProtocolViolation(f"expected a string or a base64 object, got {value!r}")


def _position(value: Any) -> Position | None:
    """A wire position, ``{"epoch": str, "offset": int}`` or null, as a tuple or None."""
    if value is None:
        return None
    if isinstance(value, dict) and value.keys() == {"epoch", "offset"}:
        epoch, offset = value["epoch"], value["offset"]
        # bool is an int to Python, not to JSON: true is no offset.
        if isinstance(epoch, str) and type(offset) is int and offset >= 0:
            return epoch, offset
    raise ProtocolViolation(f"a malformed position: {value!r}")


def encode(*args: Any) -> str:
    """One command as the text of one frame."""
    return json.dumps(list(args), ensure_ascii=False, separators=(",", ":"))


class ClientCore:
    """One client's protocol state, across every connection it makes."""

    def __init__(self) -> None:
        self.connected = False
        #: Set when the client has stopped for good over its token; every
        #: later command fails with a copy (see :meth:`refusal`).
        self.stopped: TokenRefused | None = None
        #: Subscriptions held, per kind, in the order they were confirmed.
        self.held: dict[str, dict[str, None]] = {CHANNEL: {}, PATTERN: {}, SHARD: {}}
        #: The held channels subscribed with RESUME, in the order it was
        #: confirmed: a new connection RESUMEs each from its last position.
        self.resumed: dict[str, None] = {}
        #: The last position known of each resumed channel, from RESUME's
        #: answer and from the messages since; None when the channel keeps
        #: no history, absent until its first RESUME's answer is in.
        self.positions: dict[str, Position | None] = {}
        self._pending: deque[Request] = deque()
        self._handlers: dict[Target, Handler] = {}
        self._catch_all: list[Handler] = []

    # -- connection ---------------------------------------------------------------------

    def opened(self) -> list[str]:
        """The connection is open: the frames that subscribe again to all held.

        A resumed channel gets a RESUME of its own from its last position, so
        that what was published while the client was away arrives before the
        live messages, or a :class:`RecoveryFailed` says it cannot. One that
        keeps no history (or whose position never came) is RESUMEd without a
        position, and its answer brings a :class:`RecoveryFailed` all the
        same: messages may have been missed, and nothing can tell which."""
        self.connected = True
        frames = []
        for kind, names in self.held.items():
            plain = tuple(name for name in names if name not in self.resumed)
            if plain:
                _, frame = self._subscribe(kind, plain, internal=True)
                frames.append(frame)
        for channel in [name for name in self.held[CHANNEL] if name in self.resumed]:
            position = self.positions.get(channel)
            unrecoverable = None
            if position is None:
                unrecoverable = NO_HISTORY if channel in self.positions else NO_POSITION
            _, frame = self._resume(channel, position, True, unrecoverable)
            frames.append(frame)
        return frames

    def lost(self, reason: str) -> list[Event]:
        """The connection is gone: every request waiting fails with ConnectionError
        (with :attr:`stopped` once the client has stopped over its token)."""
        self.connected = False
        events: list[Event] = []
        while self._pending:
            request = self._pending.popleft()
            events.append(Rejected(request, self.refusal() or ConnectionError(reason)))
        return events

    def refusal(self) -> TokenRefused | None:
        """A fresh :class:`TokenRefused` when the client has stopped over its
        token (one per failed call, so tracebacks do not pile up), else None."""
        stopped = self.stopped
        return None if stopped is None else TokenRefused(stopped.url, stopped.reason, stopped.code)

    def closed(
        self, url: str, code: int | None, reason: str | None, renewable: bool
    ) -> list[Event]:
        """The server closed the connection with ``code`` and ``reason``: the
        requests waiting fail, and a token close of a token that cannot be
        renewed (not ``renewable``: a fixed string, or none) stops the client
        (:attr:`stopped`), as reconnecting would only be refused again. A
        token function can return a fresh token, so it goes on."""
        if not renewable and code is not None and is_token_close(code, reason):
            self.stopped = TokenRefused(url, reason or "token refused", code)
        why = f"{code} {reason}" if reason else f"code {code}"
        return self.lost(f"connection to {url} lost: {why}")

    # -- commands -----------------------------------------------------------------------

    def _send(self, request: Request) -> None:
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        if not self.connected:
            raise ConnectionError("not connected")
        self._pending.append(request)

    def subscribe(
        self, kind: str, names: Sequence[Any], handler: Handler | None = None
    ) -> tuple[Request, list[str]]:
        """SUBSCRIBE, PSUBSCRIBE or SSUBSCRIBE; ``handler`` gets these names' messages."""
        if not names:
            raise ValueError(f"{_SUBSCRIBE[kind]} needs at least one name")
        request, frame = self._subscribe(kind, tuple(_name(n) for n in names))
        if handler is not None:
            for name in request.names:
                self._handlers[kind, name] = handler
        return request, [frame]

    def _subscribe(
        self, kind: str, names: tuple[str, ...], internal: bool = False
    ) -> tuple[Request, str]:
        command = _SUBSCRIBE[kind]
        request = Request(command, command.lower(), len(names), kind, names, internal)
        self._send(request)
        return request, encode(command, *names)

    def resume(
        self, channel: Any, handler: Handler | None = None, position: Any = None
    ) -> tuple[Request, list[str]]:
        """RESUME one channel: subscribe to it, and be sent what was published
        on it after ``position`` (an ``(epoch, offset)``), by default after
        the last position the client knows of it; the first time it knows
        none, and nothing is replayed. Resolves to a :class:`Recovery`.

        From then on the channel is resumed: a new connection RESUMEs it from
        the last message received. A message the client already received on
        it is not delivered again, so an earlier ``position`` than the last
        known replays nothing twice."""
        name = _name(channel)
        asked = self.positions.get(name) if position is None else _asked(position)
        request, frame = self._resume(name, asked)
        if handler is not None:
            self._handlers[CHANNEL, name] = handler
        return request, [frame]

    def _resume(
        self,
        channel: str,
        position: Position | None,
        internal: bool = False,
        unrecoverable: str | None = None,
    ) -> tuple[Request, str]:
        # One confirmation, then the replay, then position or recovery_failed.
        request = Request(
            "RESUME", "subscribe", 1, CHANNEL, (channel,), internal, unrecoverable=unrecoverable
        )
        self._send(request)
        if position is None:
            return request, encode("RESUME", channel)
        epoch, offset = position
        return request, encode("RESUME", channel, epoch, str(offset))

    def unsubscribe(self, kind: str, names: Sequence[Any]) -> tuple[Request, list[str]]:
        """(P|S)UNSUBSCRIBE; no names gives up every one of that kind held.

        The names stop being held at once, so a reconnect before the answer
        does not bring them back, and a resumed channel's position goes: a
        later RESUME of it starts afresh."""
        command = _UNSUBSCRIBE[kind]
        wanted = tuple(_name(n) for n in names)
        expected = len(wanted) if wanted else None
        request = Request(command, command.lower(), expected, kind, wanted)
        self._send(request)
        dropped = wanted or tuple(self.held[kind])
        for name in dropped:
            self._drop(kind, name)
            self._handlers.pop((kind, name), None)
        if wanted:
            return request, [encode(command, *wanted)]
        # How many confirmations come depends on what the server holds; the
        # pong of a PING sent right behind closes the answer.
        return request, [encode(command), encode("PING")]

    def publish(self, channel: Any, message: Any, shard: bool = False) -> tuple[Request, list[str]]:
        """PUBLISH (SPUBLISH with ``shard``); resolves to the receiver count."""
        command = "SPUBLISH" if shard else "PUBLISH"
        return self.command(command, _name(channel), _payload(message))

    def command(self, *args: Any) -> tuple[Request, list[str]]:
        """Any command answered by one ``reply`` frame (PUBSUB, AUTH, ...)."""
        request = Request(str(args[0]).upper(), "reply", 1)
        self._send(request)
        return request, [encode(*args)]

    def ping(self, text: str | None = None) -> tuple[Request, list[str]]:
        request = Request("PING", "pong", 1)
        self._send(request)
        return request, [encode("PING") if text is None else encode("PING", text)]

    # -- frames in ----------------------------------------------------------------------

    def receive(self, text: str | bytes) -> list[Event]:
        """One text frame from the server; raises ProtocolViolation on nonsense."""
        try:
            frame = json.loads(text)
        except ValueError:
            raise ProtocolViolation(f"a frame that is not JSON: {text[:80]!r}") from None
        if not isinstance(frame, list) or not frame or not isinstance(frame[0], str):
            raise ProtocolViolation(f"a frame that is not a tagged array: {frame!r}")
        frame_type = frame[0]
        if frame_type in _PUSH_KIND:
            return self._delivered(self._message(frame))
        if not self._pending:
            raise ProtocolViolation(f"an answer nobody asked for: {frame!r}")
        request = self._pending[0]
        if frame_type == "error" and len(frame) == 2 and isinstance(frame[1], str):
            return self._error(request, ReplyError(frame[1]))
        if request.expected is None and frame_type == "pong":
            return self._finish(request)
        if request.command == "RESUME" and frame_type in _RECOVERY_ANSWERS:
            return self._recovered(request, frame)
        if frame_type != request.answer:
            raise ProtocolViolation(f"{frame!r} in answer to {request.command}")
        if frame_type in ("reply", "pong"):
            request.values.append(self._value(request, frame))
            return self._finish(request)
        return self._confirmation(request, frame)

    def _message(self, frame: list[Any]) -> Message:
        frame_type = frame[0]
        if frame_type == "pmessage" and len(frame) == 4:
            return Message(
                frame_type, _received(frame[2]), _received(frame[3]), _received(frame[1])
            )
        if frame_type != "pmessage" and len(frame) == 3:
            return Message(frame_type, _received(frame[1]), _received(frame[2]))
        if frame_type == "message" and len(frame) == 4:
            # Its position, once the connection has used RESUME.
            position = _position(frame[3])
            if position is not None:
                return Message(frame_type, _received(frame[1]), _received(frame[2]), None, position)
        raise ProtocolViolation(f"a malformed {frame_type} frame: {frame!r}")

    def _delivered(self, message: Message) -> list[Event]:
        """The message, whose position a resumed channel keeps; none when it
        was delivered already. That happens when a channel held is RESUMEd
        again: the answer replays from the position the client had when it
        asked, and the live messages on their way meanwhile are in it too.

        A live message past the next offset (or, in a new epoch, past its
        first) comes after a gap the server could not fill: a
        :class:`RecoveryFailed` says so first. A replay may start anywhere
        (a position given to :meth:`resume`): its answer judges it."""
        channel, position = message.channel, message.position
        if position is None or not isinstance(channel, str) or channel not in self.resumed:
            return [message]
        known = self.positions.get(channel)
        if known is None:
            self.positions[channel] = position
            return [message]
        epoch, offset = position
        after = known[1] if known[0] == epoch else 0
        if offset <= after:
            return []
        self.positions[channel] = position
        if offset == after + 1 or self._replaying(channel):
            return [message]
        missed = never_arrived(epoch, after + 1, offset - 1)
        return [RecoveryFailed(channel, missed, position), message]

    def _replaying(self, channel: str) -> bool:
        """Whether the messages of ``channel`` arriving now are a RESUME's replay."""
        request = self._pending[0] if self._pending else None
        return (
            request is not None
            and request.command == "RESUME"
            and request.expected == 0
            and request.names[0] == channel
        )

    def _error(self, request: Request, error: ReplyError) -> list[Event]:
        if request.expected is None and request.error is None:
            request.error = error  # the closing pong (or its own error) is still due
            return []
        request.error = request.error or error
        return self._finish(request)

    def _confirmation(self, request: Request, frame: list[Any]) -> list[Event]:
        if len(frame) != 3 or not isinstance(frame[2], int):
            raise ProtocolViolation(f"a malformed confirmation: {frame!r}")
        name = None if frame[1] is None else _received(frame[1])
        kind = request.kind
        assert kind is not None
        if isinstance(name, str):
            if request.answer.endswith("unsubscribe"):
                self._drop(kind, name)
            else:
                self.held[kind][name] = None
                if request.command == "RESUME":
                    self.resumed[name] = None
        request.values.append(frame[2])
        if request.expected is not None:
            request.expected -= 1
            # RESUME's answer goes on: the replay, then its closing frame.
            if request.expected == 0 and request.command != "RESUME":
                return self._finish(request)
        return []

    def _recovered(self, request: Request, frame: list[Any]) -> list[Event]:
        """``position`` or ``recovery_failed``, which closes RESUME's answer."""
        failed = frame[0] == "recovery_failed"
        if (
            len(frame) != (4 if failed else 3)
            or (failed and not isinstance(frame[3], str))
            or request.expected != 0  # before the confirmation
            or _received(frame[1]) != request.names[0]
        ):
            raise ProtocolViolation(f"{frame!r} in answer to RESUME {request.names[0]!r}")
        channel = request.names[0]
        position = _position(frame[2])
        if channel in self.resumed:
            self.positions[channel] = position
        reason = frame[3] if failed else request.unrecoverable
        request.values.append(Recovery(channel, reason is None, reason, position))
        events: list[Event] = []
        if reason is not None:
            events.append(RecoveryFailed(channel, reason, position))
        return events + self._finish(request)

    def _value(self, request: Request, frame: list[Any]) -> Any:
        if len(frame) != 2:
            raise ProtocolViolation(f"a malformed answer: {frame!r}")
        value = frame[1]
        if request.answer == "pong":
            return _received(value)
        if isinstance(value, list):
            return [item if isinstance(item, int) else _received(item) for item in value]
        return value

    def _finish(self, request: Request) -> list[Event]:
        self._pending.popleft()
        if request.error is not None:
            self._forget_refused(request)
            return [Rejected(request, request.error)]
        # A (un)subscribe answers the count after its last confirmation.
        value = request.values[-1] if request.values else None
        return [Resolved(request, value)]

    def _forget_refused(self, request: Request) -> None:
        """A refused subscription is not held, and its handlers go."""
        kind = request.kind
        if kind is None or request.answer.endswith("unsubscribe"):
            return
        for name in request.names:
            if request.internal:
                self._drop(kind, name)
            if name not in self.held[kind]:
                self._handlers.pop((kind, name), None)

    def _drop(self, kind: str, name: str) -> None:
        """``name`` is no longer held; a resumed channel's position goes with it."""
        self.held[kind].pop(name, None)
        if kind == CHANNEL:
            self.resumed.pop(name, None)
            self.positions.pop(name, None)

    # -- handlers -----------------------------------------------------------------------

    def add_catch_all(self, handler: Handler) -> None:
        """``handler`` gets every message."""
        self._catch_all.append(handler)

    def remove_catch_all(self, handler: Handler) -> None:
        if handler in self._catch_all:
            self._catch_all.remove(handler)

    def handlers_for(self, message: Message) -> list[Handler]:
        """The handler of the message's channel or pattern, then the catch-alls."""
        kind = _PUSH_KIND[message.type]
        key = message.pattern if kind == PATTERN else message.channel
        handler = self._handlers.get((kind, key)) if isinstance(key, str) else None
        return ([handler] if handler is not None else []) + list(self._catch_all)


def _asked(position: Any) -> Position:
    """A position given to RESUME, checked before anything is sent."""
    try:
        epoch, offset = position
    except (TypeError, ValueError):
        raise ValueError(f"a position is (epoch, offset), not {position!r}") from None
    if not isinstance(epoch, str) or type(offset) is not int or offset < 0:
        raise ValueError(f"a position is (epoch: str, offset: int >= 0), not {position!r}")
    return epoch, offset


def keepalive(ping_interval: float, ping_timeout: float) -> tuple[float, float]:
    """A host's WebSocket keepalive, checked before anything is opened:
    ``ping_interval`` seconds between the pings the client sends (0: none),
    and ``ping_timeout`` seconds the server has to answer one before the
    connection is dropped as dead and the client reconnects (0: wait
    forever). A link that went silent (no FIN, no RST) is noticed only so."""
    for name, value in (("ping_interval", ping_interval), ("ping_timeout", ping_timeout)):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} is a finite number of seconds >= 0 (0: off), not {value!r}")
    return float(ping_interval), float(ping_timeout)


def numsub(flat: list[Any]) -> dict[Name, int]:
    """PUBSUB NUMSUB's flat ``[name, count, ...]`` as an ordered dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class Backoff:
    """Jittered exponential delays: the n-th retry waits a random time in
    [d/2, d], d = min(max_delay, min_delay * 2**n), so clients that lost
    one server together do not all come back in the same instant."""

    def __init__(
        self,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        random: Callable[[], float] = random.random,
    ) -> None:
        if min_delay <= 0 or max_delay < min_delay:
            raise ValueError("backoff needs 0 < min_delay <= max_delay")
        self.min_delay, self.max_delay = min_delay, max_delay
        self._random = random
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt."""
        # float: typeshed gives int ** int as Any (a negative power is a float).
        ceiling: float = min(self.max_delay, self.min_delay * 2 ** min(self.attempts, 64))
        self.attempts += 1
        return ceiling / 2 + ceiling / 2 * self._random()

    def reset(self) -> None:
        """A connection opened: the next loss starts from the shortest delay."""
        self.attempts = 0


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    secure: bool


def parse_url(url: str) -> Address:
    """Host, port and TLS of a ``ws://`` or ``wss://`` URL; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise ValueError(f"bad port in URL: {url!r}") from None
    return Address(parts.hostname, port, secure)


def url_with_token(url: str, token: str | None) -> str:
    """``url`` with ``?token=`` set (replacing one already there) when there is a token."""
    if not token:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query)))
