"""The commands only the JSON protocol has: recovery from a channel's history.

RESUME subscribes to one channel and, given the position of the last message
the client saw, first sends every message it missed that the channel's
history still keeps, then says where the channel is (``position``), or that
its recovery failed (``recovery_failed``) and why. HISTORY reads a channel's
last messages. Both are extensions of docs/protocol.md (Recovery); RESP has
neither, as Redis has no such commands.

Everything runs in one reactor turn against the engine's history
(:class:`~pubsub.core.history.History`), so no publish can fall between the
messages replayed and the first live one: a message is either in the replay
(its offset at most the position announced) or delivered live after it.
Once a connection has used RESUME, its ``message`` frames of channels with a
history carry their position, which is how a client knows where to resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pubsub.core.commands import COMMANDS, Command, Error, Frame, Result
from pubsub.core.history import Position
from pubsub.hosting.port import HostedSession

if TYPE_CHECKING:  # the protocol imports this module; the session only names it
    from pubsub.websocket.protocol import PubSubServerProtocol

__all__ = ["WS_COMMANDS", "WsSession", "wire_position"]

_NOT_AN_INTEGER = Error("ERR value is not an integer or out of range")
_SUBSCRIBE = COMMANDS["subscribe"].handler


class WsSession(HostedSession):
    """A WebSocket client's session: the command layer's, plus its connection."""

    __slots__ = ()
    connection: PubSubServerProtocol


def wire_position(position: Position | None) -> dict[str, Any] | None:
    """A position as the JSON protocol writes it."""
    return None if position is None else {"epoch": position.epoch, "offset": position.offset}


def _count(text: bytes) -> int | None:
    """A non-negative decimal integer of at most 18 digits, or None."""
    if not text.isdigit() or len(text) > 18:
        return None
    return int(text)


def _resume(session: WsSession, args: Sequence[bytes]) -> list[Result]:
    if len(args) not in (2, 4):
        return [Error("ERR wrong number of arguments for 'resume' command")]
    channel = args[1]
    asked = None
    if len(args) == 4:
        offset = _count(args[3])
        if offset is None:
            return [_NOT_AN_INTEGER]
        asked = Position(args[2].decode("utf-8", "replace"), offset)
    assert _SUBSCRIBE is not None
    results = _SUBSCRIBE(session, args[:2])
    if type(results[0]) is Error:
        return results
    session.connection.use_positions()
    history = session.engine.history
    if history is None or not history.keeps(channel):
        if asked is None:
            return [*results, Frame("position", (channel, None))]
        return [*results, Frame("recovery_failed", (channel, None, "the channel keeps no history"))]
    if asked is None:
        top = history.top(channel) or Position("", 0)
        return [*results, Frame("position", (channel, wire_position(top)))]
    recovery = history.since(channel, asked)
    top = recovery.position or Position("", 0)
    if not recovery.recovered:
        return [*results, Frame("recovery_failed", (channel, wire_position(top), _why(asked, top)))]
    epoch = top.epoch
    replayed = [
        Frame("message", (channel, payload, {"epoch": epoch, "offset": offset}))
        for offset, payload in recovery.messages
    ]
    return [*results, *replayed, Frame("position", (channel, wire_position(top)))]


def _why(asked: Position, top: Position) -> str:
    """Why a recovery from ``asked`` failed, the channel being at ``top``."""
    if not top.epoch:
        return "the channel's history was lost: none of it is kept"
    if asked.epoch != top.epoch and not (asked.epoch == "" and asked.offset == 0):
        return "the channel's history was lost since (its epoch changed)"
    if asked.offset > top.offset:
        return "the position is ahead of the channel's"
    return "messages after the position are no longer kept"


def _history(session: WsSession, args: Sequence[bytes]) -> list[Result]:
    channel = args[1]
    count = _count(args[2])
    if count is None:
        return [_NOT_AN_INTEGER]
    history = session.engine.history
    if history is None or not history.keeps(channel):
        return [Frame("history", (channel, None, []))]
    recent = history.recent(channel, count)
    messages = [[offset, payload] for offset, payload in recent.messages]
    top = recent.position or Position("", 0)
    return [Frame("history", (channel, wire_position(top), messages))]


#: What the JSON protocol resolves a command against: the shared table and its own.
WS_COMMANDS: dict[str, Command] = {
    **COMMANDS,
    "resume": Command("resume", -2, _resume),
    "history": Command("history", 3, _history),
}
