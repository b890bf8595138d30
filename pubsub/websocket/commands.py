"""The commands only the JSON protocol has: recovery from a channel's history.

RESUME subscribes to one channel and, given the position of the last message
the client saw, first sends every message it missed that the channel's
history still keeps, then says where the channel is (``position``), or that
its recovery failed (``recovery_failed``) and why. HISTORY reads a channel's
last messages. Both are extensions of docs/protocol.md (Recovery); RESP has
neither, as Redis has no such commands.

Against this node's own history (:class:`~pubsub.core.history.History`)
everything runs in one reactor turn, so no publish can fall between the
messages replayed and the first live one: a message is either in the replay
(its offset at most the position announced) or delivered live after it.
Against a history the nodes share in Redis
(:class:`~pubsub.core.history.SharedHistory`) the answer comes later, and
the client's live messages are held until it does (:func:`_resume_shared`).
Once a connection has used RESUME, its ``message`` frames of channels with a
history carry their position, which is how a client knows where to resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pubsub.core.commands import COMMANDS, Command, Error, Frame, Result
from pubsub.core.history import HistoryUnavailable, Position, Recovery, SharedHistory
from pubsub.hosting.port import HostedSession

if TYPE_CHECKING:  # the protocol imports this module; the session only names it
    from pubsub.websocket.protocol import PubSubServerProtocol

__all__ = ["WS_COMMANDS", "WsSession", "wire_position"]

_log = Logger()

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


def _resume(session: WsSession, args: Sequence[bytes]) -> Any:
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
    if history.shared:
        return _resume_shared(session, history, channel, asked, results)
    if asked is None:
        return [*results, *_answer(channel, None, Recovery([], history.top(channel), True))]
    return [*results, *_answer(channel, asked, history.since(channel, asked))]


def _answer(channel: bytes, asked: Position | None, recovery: Recovery) -> list[Result]:
    """What RESUME from ``asked`` (None: from now) answers after its
    subscription: the replay and where the channel is, or that it failed."""
    top = recovery.position or Position("", 0)
    if asked is not None and not recovery.recovered:
        return [Frame("recovery_failed", (channel, wire_position(top), _why(asked, top)))]
    epoch = top.epoch
    replayed: list[Result] = [
        Frame("message", (channel, payload, {"epoch": epoch, "offset": offset}))
        for offset, payload in recovery.messages
    ]
    return [*replayed, Frame("position", (channel, wire_position(top)))]


def _resume_shared(
    session: WsSession,
    history: SharedHistory,
    channel: bytes,
    asked: Position | None,
    results: list[Result],
) -> defer.Deferred[list[Result]]:
    """RESUME from a history the nodes share: it answers later, once read.

    Meanwhile the client's deliveries are held (:meth:`PubSubServerProtocol.hold`),
    and the connection reads nothing more.  Once the history is read, the
    client gets the subscription, the replay and the position, then the
    held deliveries but those of ``channel`` at or below the position, which
    the replay had (see :mod:`pubsub.backplane.history`)."""
    connection = session.connection
    held = connection.hold()

    def answered(recovery: Recovery) -> list[Result]:
        top = recovery.position
        return connection.release(
            held, channel, top, [*results, *_answer(channel, asked, recovery)]
        )

    def failed(failure: Failure) -> list[Result]:
        if failure.check(HistoryUnavailable) is None:
            _log.failure("reading the history of {channel!r}", failure, channel=channel)
            reason = "the channel's history could not be read"
        else:
            reason = f"the channel's history cannot be read: {failure.getErrorMessage()}"
        refusal = Frame("recovery_failed", (channel, None, reason))
        return connection.release(held, channel, None, [*results, refusal])

    answer: defer.Deferred[list[Result]] = history.since(channel, asked).addCallbacks(
        answered, failed
    )
    return answer


def _why(asked: Position, top: Position) -> str:
    """Why a recovery from ``asked`` failed, the channel being at ``top``."""
    if not top.epoch:
        return "the channel's history was lost: none of it is kept"
    if asked.epoch != top.epoch and not (asked.epoch == "" and asked.offset == 0):
        return "the channel's history was lost since (its epoch changed)"
    if asked.offset > top.offset:
        return "the position is ahead of the channel's"
    return "messages after the position are no longer kept"


def _history(session: WsSession, args: Sequence[bytes]) -> Any:
    channel = args[1]
    count = _count(args[2])
    if count is None:
        return [_NOT_AN_INTEGER]
    history = session.engine.history
    if history is None or not history.keeps(channel):
        return [Frame("history", (channel, None, []))]
    if history.shared:
        # Not held: what HISTORY answers is a snapshot, not a seam with the live messages.
        answer: defer.Deferred[list[Result]] = history.recent(channel, count).addCallbacks(
            lambda recent: [_history_frame(channel, recent)],
            _history_failed,
            errbackArgs=(channel,),
        )
        return answer
    return [_history_frame(channel, history.recent(channel, count))]


def _history_failed(failure: Failure, channel: bytes) -> list[Result]:
    """HISTORY's answer when a shared history could not be read: the
    backplane's error when it is down, else (a fault here) logged."""
    if failure.check(HistoryUnavailable) is None:
        _log.failure("reading the history of {channel!r}", failure, channel=channel)
        return [Error("ERR the channel's history could not be read")]
    return [Error(f"BACKPLANE {failure.getErrorMessage()}")]


def _history_frame(channel: bytes, recent: Recovery) -> Frame:
    messages = [[offset, payload] for offset, payload in recent.messages]
    top = recent.position or Position("", 0)
    return Frame("history", (channel, wire_position(top), messages))


#: What the JSON protocol resolves a command against: the shared table and its own.
WS_COMMANDS: dict[str, Command] = {
    **COMMANDS,
    "resume": Command("resume", -2, _resume),
    "history": Command("history", 3, _history),
}
