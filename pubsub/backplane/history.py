"""The history of recovery kept in Redis, shared by every node of a backplane.

With a backplane, a channel's history cannot be each node's own: a node would
keep only what was published on it, and positions would not agree across
nodes.  So a kept channel's history lives in Redis, where every node writes
and reads it:

* a stream, ``<prefix>history:<channel>``: one entry per message, with the
  message's offset (``o``) and payload (``p``).  Redis's own entry IDs
  (milliseconds of Redis's clock, then a sequence) order the entries and
  trim them by age (``XTRIM MINID``); ``XADD MAXLEN`` trims them by count;
* a hash, ``<prefix>history-position:<channel>``: the stream's epoch and
  the offset of its last message.

The position a client sees is the same ``(epoch, offset)`` as on a single
node, offsets growing by one per message, so that a client can tell from an
offset alone that it missed something; the stream ID stays Redis's.

A publish runs one Lua script (:data:`PUBLISH_SCRIPT`, by ``EVALSHA``) that
gives the message the next offset, appends it to the stream, trims the
stream, and PUBLISHes it in a positioned envelope to every node, this one
included.  A script runs whole, alone, so the history's order and the order
in which the nodes receive the messages are the same.  No node delivers a
kept channel's message before Redis has it: each delivers it as it comes
back from Redis, with its position.

A recovery (:meth:`RedisHistory.since`) first makes sure Redis has this
node's subscription to the channel (:meth:`RedisBackplane.barrier`), then
reads the stream (:data:`READ_SCRIPT`), then waits on a second barrier.
Whatever is published after the read reaches the node live, with an offset
above the top the read gave; what was published before is in the read (or
was trimmed: the recovery fails), and its live copy, which comes on the
other connection and may be read after the read's reply, has arrived by
the second barrier.  The host holds the client's live messages meanwhile,
and drops those at or below the top (:mod:`pubsub.websocket.commands`).

Over a Redis Cluster, each channel's history lives on the shard that
carries the channel (as the sharded channel ``prefix + "c:" + name``): the
keys begin with a hash tag of that slot (:func:`slot_tags`), since a script
touches one slot only, and the script SPUBLISHes the envelope there, and
PUBLISHes it too while patterns are held.  The backplane routes each
publish, read and barrier to that shard's link (``carry``, ``call`` and
``barrier`` take the channel); ``history_names`` gives the names.

A node that misses some of a kept channel's messages while its clients stay
(its link to Redis was lost a moment, a failover dropped its subscription)
sees it from the next message's offset, or, once the backplane is back,
from the channel's top in Redis: it holds that channel's messages,
reads the ones missed from the history (waiting up to ``hold_limit``
seconds for the backplane to be up), and delivers them first, in order.
Those the history no longer has are counted and logged (``missed_lost``);
the rest in ``missed_filled``.

The bounds are ``history_size`` messages and ``history_ttl`` seconds per
channel, both kept by Redis, and Redis's own ``maxmemory``;
``history_max_bytes`` and ``history_max_channels`` bound a node's own history
only.  The epoch and offset of a channel not published to for
:data:`POSITION_TTL` seconds are forgotten with its messages: a client coming
back after that is told its recovery failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from pubsub.backplane.redis import NODE_ID_SIZE, BackplaneDown, RedisBackplane, command
from pubsub.backplane.redis_cluster import RedisClusterBackplane, slot_tags
from pubsub.core.history import HistoryUnavailable, Kept, Position, Recovery, honoured

__all__ = ["POSITION_TTL", "PUBLISH_SCRIPT", "READ_SCRIPT", "RedisHistory"]

_log = Logger()

#: Seconds a channel's epoch and offset outlive its last publish in Redis.
POSITION_TTL = 24 * 3600

#: KEYS: the stream, the position hash.  ARGV: the channel as published in
#: Redis, the payload, history_size, history_ttl in ms, an epoch for a new
#: stream, POSITION_TTL in ms, the envelope's head (node id and "@"), then
#: the commands that publish the envelope (PUBLISH; SPUBLISH on a Cluster).
PUBLISH_SCRIPT = b"""
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
local ttl = tonumber(ARGV[4])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'o', offset, 'p', ARGV[2])
redis.call('XTRIM', KEYS[1], 'MINID', ms - ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local envelope = ARGV[7] .. epoch .. ' ' .. offset .. ' ' .. ARGV[2]
for i = 8, #ARGV do
  redis.call(ARGV[i], ARGV[1], envelope)
end
return offset
"""

#: KEYS: the stream, the position hash.  ARGV: history_ttl in ms.  Returns
#: {} for a channel with no history, else {epoch, top offset, then each
#: kept message's offset and payload, oldest first}.
READ_SCRIPT = b"""
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XTRIM', KEYS[1], 'MINID', ms - tonumber(ARGV[1]))
local position = redis.call('HMGET', KEYS[2], 'epoch', 'offset')
if not position[1] then
  return {}
end
local out = {position[1], position[2]}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  out[#out + 1] = entry[2][2]
  out[#out + 1] = entry[2][4]
end
return out
"""

_PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT).hexdigest().encode()
_READ_SHA = hashlib.sha1(READ_SCRIPT).hexdigest().encode()


class RedisHistory:
    """The engine's :class:`~pubsub.core.history.SharedHistory`, in the
    backplane's Redis (see the module's text).

    ``size`` and ``ttl`` are ``history_size`` and ``history_ttl``.
    ``recoveries`` and ``failed_recoveries`` count the answers of
    :meth:`since`, a read that failed counted as a failed recovery;
    ``missed_filled`` and ``missed_lost`` the messages this node missed
    from Redis, filled from the history or not (see the module's text).
    """

    #: Seconds a gap's fill waits for the backplane to be up, at most.
    hold_limit = 5.0
    #: Bytes of a channel's messages held while its gap is filled, at most.
    hold_bytes = 8 * 1024 * 1024

    shared: Literal[True] = True

    def __init__(
        self,
        bridge: RedisBackplane | RedisClusterBackplane,
        channels: Sequence[bytes],
        size: int,
        ttl: float,
    ) -> None:
        self.keeps = Kept(channels)
        self._bridge = bridge
        self._size = b"%d" % size
        self._ttl = b"%d" % max(1, round(ttl * 1000))
        self._position_ttl = b"%d" % (max(POSITION_TTL, ttl) * 1000)
        self._head = bridge.node_id + b"@"
        # A fresh stream's epoch: this node's id and a count, never twice the
        # same, so a stream lost and begun again never has its old epoch.
        self._epochs = 0
        self.recoveries = 0
        self.failed_recoveries = 0
        self.missed_filled = 0
        self.missed_lost = 0
        #: The position of the last message delivered here, per kept channel
        #: this node carries: the next one must be one further on.
        self._delivered: dict[bytes, Position] = {}
        #: Channels whose gap is being filled (see _fill).
        self._filling: dict[bytes, _Fill] = {}
        self._deliver_at = bridge.engine.deliver_message_at
        bridge.positioned = self._arrived
        bridge.came_back = self._came_back
        bridge.preamble.extend(
            [(b"SCRIPT", b"LOAD", PUBLISH_SCRIPT), (b"SCRIPT", b"LOAD", READ_SCRIPT)]
        )
        if isinstance(bridge, RedisClusterBackplane):
            slot_tags()  # the keys' hash tags: made now, not at the first publish

    def publish(self, channel: bytes, payload: bytes) -> bool:
        self._epochs += 1
        bridge = self._bridge
        stream, position, wire, commands = bridge.history_names(channel)
        return bridge.carry(
            channel,
            command(
                b"EVALSHA",
                _PUBLISH_SHA,
                b"2",
                stream,
                position,
                wire,
                payload,
                self._size,
                self._ttl,
                b"%s.%x" % (bridge.node_id[: NODE_ID_SIZE // 2], self._epochs),
                self._position_ttl,
                self._head,
                *commands,
            ),
        )

    # -- messages back from Redis, and the gaps between them --------------------

    def _arrived(self, channel: bytes, payload: bytes, position: Position) -> int:
        """A kept channel's message, back from Redis: delivered here, after
        those it shows this node missed."""
        filling = self._filling.get(channel)
        if filling is not None:
            filling.hold(payload, position)
            return 0
        last = self._delivered.get(channel)
        if last is not None and last.epoch == position.epoch and position.offset > last.offset + 1:
            self._fill(channel, last, payload, position)
            return 0
        return self._deliver(channel, payload, position)

    def _deliver(self, channel: bytes, payload: bytes, position: Position) -> int:
        receivers = self._deliver_at(channel, payload, position)
        if receivers:
            self._delivered[channel] = position
        else:
            self._delivered.pop(channel, None)  # no one here: no gap to see
        return receivers

    def forget(self, channel: bytes) -> None:
        self._delivered.pop(channel, None)

    def _came_back(self) -> None:
        """The backplane is connected again: the channels this node carries
        may have had messages meanwhile and no next one yet to show the gap.
        Their tops are asked for; a channel behind is filled."""
        bridge = self._bridge
        for channel in [c for c in self._delivered if c not in self._filling]:
            _, position, _, _ = bridge.history_names(channel)
            asked = bridge.call(channel, b"HMGET", position, b"epoch", b"offset")
            # Not answered (down again): the next message shows the gap.
            asked.addCallbacks(self._top_known, lambda _: None, callbackArgs=(channel,))

    def _top_known(self, reply: Any, channel: bytes) -> None:
        last = self._delivered.get(channel)
        if last is None or channel in self._filling or reply[0] is None:
            return
        epoch, offset = reply[0].decode("ascii", "replace"), int(reply[1])
        if epoch == last.epoch and offset > last.offset:
            self._fill(channel, last)

    def _fill(
        self,
        channel: bytes,
        last: Position,
        payload: bytes | None = None,
        position: Position | None = None,
    ) -> None:
        """Hold ``channel``'s messages, from this one on (if any: else from
        the next); read the history (again while the backplane is not up,
        for at most ``hold_limit`` and ``hold_bytes`` held); deliver the
        missed ones it has, then what was held."""
        filling = self._filling[channel] = _Fill()
        if payload is not None and position is not None:
            filling.hold(payload, position)
        clock = self._bridge.clock
        until = clock.seconds() + self.hold_limit

        def again(failure: Failure) -> Any:
            failure.trap(BackplaneDown)
            full = filling.bytes > self.hold_bytes
            if full or clock.seconds() + _RETRY > until:
                return None
            return task.deferLater(clock, _RETRY, self._read, channel).addErrback(again)

        read = self._read(channel).addErrback(again)
        read.addCallback(self._filled, channel, last)
        read.addErrback(
            lambda failure: _log.failure(
                "history: fault filling a gap of {channel!r}", failure, channel=channel
            )
        )

    def _filled(self, read: Any, channel: bytes, last: Position) -> None:
        filling = self._filling.pop(channel)
        top = None if read is None or read[0] is None or read[0].epoch != last.epoch else read[0]
        # Missed: up to the first message held, or without one, the top read.
        held = [p.offset for _, p in filling.messages if p.epoch == last.epoch]
        end = held[0] if held else (last.offset if top is None else top.offset) + 1
        missed = range(last.offset + 1, end)
        found = [] if top is None else [m for m in read[1] if m[0] in missed]
        # Trimming takes the oldest: what was found of the missed ones is
        # their end, and the lost ones, if any, their beginning.
        filled = len(found)
        self.missed_filled += filled
        if filled < len(missed):
            self.missed_lost += len(missed) - filled
            _log.warn(
                "history: this node missed {count} messages of {channel!r} (offsets "
                "{first} to {last} of epoch {epoch}) that the history no longer has, or "
                "could not be read: not delivered here (pubsub_history_missed_total)",
                count=len(missed) - filled,
                channel=channel,
                first=missed.start,
                last=missed.stop - 1 - filled,
                epoch=last.epoch,
            )
        # The missed ones the read found, in order; those it did not are
        # counted: go on past them; then what was held.  (The read may have
        # more, after them: those come live, as the held ones did.)
        for offset, payload in found:
            self._deliver(channel, payload, Position(last.epoch, offset))
        now = self._delivered.get(channel)  # None: no one here any more
        if now is not None and now.epoch == last.epoch and now.offset < missed.stop - 1:
            self._delivered[channel] = Position(last.epoch, missed.stop - 1)
        for payload, position in filling.messages:
            self._arrived(channel, payload, position)
        filling.settled(self._filling.get(channel))

    def _settled(self, channel: bytes) -> defer.Deferred[None]:
        """Fires once no gap of ``channel`` is being filled."""
        filling = self._filling.get(channel)
        return defer.succeed(None) if filling is None else filling.wait()

    def _read(self, channel: bytes) -> defer.Deferred[Any]:
        """The channel's stream: a Deferred of (its top or None, its kept
        messages as (offset, payload), oldest first, first offset)."""
        stream, position, _, _ = self._bridge.history_names(channel)
        return self._bridge.call(
            channel, b"EVALSHA", _READ_SHA, b"2", stream, position, self._ttl
        ).addCallback(_stream)

    def since(self, channel: bytes, position: Position | None) -> defer.Deferred[Recovery]:
        """What a client at ``position`` missed, as :meth:`History.since`
        answers it, once Redis has this node's subscription to ``channel``.
        With ``position`` None, no messages: only where the channel is."""
        bridge = self._bridge
        answer = bridge.barrier(channel).addCallback(lambda _: self._read(channel))
        # The read's reply comes on the publisher connection, the messages
        # published before it on the subscriber connection, which the
        # reactor may read later: a second barrier there lets them all in
        # (to be held, and dropped as replayed) before the answer.
        answer.addCallback(lambda read: bridge.barrier(channel).addCallback(lambda _: read))
        # A gap being filled delivers messages at or below the top read:
        # they must come while the client's messages are held, not after.
        answer.addCallback(lambda read: self._settled(channel).addCallback(lambda _: read))
        return answer.addCallbacks(
            self._judge, self._failed, callbackArgs=(position,), errbackArgs=(position,)
        )

    def _judge(
        self, read: tuple[Position | None, list[tuple[int, bytes]], int], asked: Position | None
    ) -> Recovery:
        top, messages, first = read
        if asked is None:
            return Recovery([], top, True)
        if top is None:
            recovered = asked.offset == 0
        else:
            recovered = honoured(asked, top, first)
        if not recovered:
            self.failed_recoveries += 1
            return Recovery(messages, top, False)
        self.recoveries += 1
        return Recovery([m for m in messages if m[0] > asked.offset], top, True)

    def _failed(self, failure: Any, asked: Position | None) -> Recovery:
        failure.trap(BackplaneDown)
        if asked is not None:
            self.failed_recoveries += 1
        raise HistoryUnavailable(failure.getErrorMessage())

    def recent(self, channel: bytes, limit: int) -> defer.Deferred[Recovery]:
        """The last ``limit`` messages kept, as :meth:`History.recent`."""

        def last(read: tuple[Position | None, list[tuple[int, bytes]], int]) -> Recovery:
            top, messages, _ = read
            return Recovery(messages[max(0, len(messages) - limit) :] if limit else [], top, True)

        return self._read(channel).addCallbacks(last, self._failed, errbackArgs=(None,))


#: Seconds between reads of a gap's fill while the backplane is not up.
_RETRY = 0.1


class _Fill:
    """A channel's messages held while a gap before them is filled, and the
    Deferreds waiting for the fill (:meth:`RedisHistory._settled`)."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, Position]] = []
        self.bytes = 0
        self._waiting: list[defer.Deferred[None]] = []

    def hold(self, payload: bytes, position: Position) -> None:
        self.messages.append((payload, position))
        self.bytes += len(payload)

    def wait(self) -> defer.Deferred[None]:
        waiting: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(waiting)
        return waiting

    def settled(self, then: _Fill | None) -> None:
        """Done: the waiting go on, or wait for ``then``, a fill begun since."""
        for waiting in self._waiting:
            if then is None:
                waiting.callback(None)
            else:
                then.wait().chainDeferred(waiting)


def _stream(reply: Any) -> tuple[Position | None, list[tuple[int, bytes]], int]:
    """READ_SCRIPT's reply as (top, messages, first kept offset)."""
    if not reply:
        return None, [], 1
    epoch, top = reply[0].decode("ascii", "replace"), int(reply[1])
    messages = [(int(reply[i]), reply[i + 1]) for i in range(2, len(reply) - 1, 2)]
    first = messages[0][0] if messages else top + 1
    return Position(epoch, top), messages, first
