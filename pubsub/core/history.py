"""A bounded history of recent messages per channel, for recovery.

A client that loses its connection misses whatever was published while it was
away.  If it remembers the :class:`Position` of the last message it saw, it can
ask on reconnecting for everything after it, and learn whether that was all it
missed (``recovered``) or whether some of it is gone, in which case it must
resynchronise some other way.

Each kept channel (one matching a glob of ``channels``) has a *stream*:

* an *epoch*, a short random name for this lifetime of the stream.  A stream
  that is evicted and later recreated gets a new epoch and starts its offsets
  again at 1, so a position taken from the old one can never be mistaken for a
  position in the new one;
* the next offset: offsets are 1 for the first message of a stream and grow by
  one per message, so a client can tell from an offset alone whether it missed
  something;
* the messages still kept, oldest first.  Their offsets are contiguous, so the
  offset of the ``i``-th kept message is the first kept offset plus ``i`` and is
  not stored.

Four bounds keep the memory finite, each for its own reason:

* ``size`` messages per stream: a channel's burst cannot push out the others'
  history; the oldest message goes on append;
* ``ttl`` seconds per message: recovery is for short disconnections, and a
  message older than that is of no use.  Expired messages are trimmed at the
  head of a stream whenever the stream is appended to or read, and by
  :meth:`History.expire`, which :meth:`History.append` runs once every
  ``min(ttl, 10)`` seconds (no timer: with no publish at all nothing new is
  kept either, and ``max_bytes`` bounds what is);
* ``max_bytes`` over all streams (:data:`MESSAGE_OVERHEAD` included per
  message): when passed, the oldest messages of the streams published to least
  recently go first, counted in ``evicted``;
* ``max_channels`` streams: beyond it, the stream published to least recently
  goes whole, metadata included.

A stream whose messages are all gone keeps its epoch and offset, so that a
client already at the top is still told it missed nothing.

The clock is injected (``clock()`` returns seconds) and must not go backwards:
messages, and streams in order of last publish, are assumed to be in time order.

Nothing here may import Twisted, Autobahn or a codec.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any, Literal, NamedTuple, Protocol

from pubsub.core.glob import Matcher, compile_pattern

__all__ = [
    "MESSAGE_OVERHEAD",
    "History",
    "HistoryUnavailable",
    "Kept",
    "Position",
    "Recovery",
    "SharedHistory",
    "honoured",
]

#: The bytes each kept message is charged beyond its payload, the number
#: ``max_bytes`` bounds along with the payloads.  CPython's objects for one
#: entry are a 2-tuple (56), its float time (24), the bytes object's header
#: (33) and the deque slot (8), 121 bytes; pymalloc rounds each object up to
#: 16 bytes, and the process grows by about 150 bytes beyond a 64-byte
#: payload (bench/history_memory.py).  160 keeps the bound above that.
MESSAGE_OVERHEAD = 160

#: How many channel names :class:`Kept` remembers its answer for; the
#: cache is emptied when full, which is cheap and bounds it against a flood of
#: distinct names.
KEEPS_CACHE_SIZE = 4096


class Position(NamedTuple):
    """A place in one channel's stream: the last message a client has seen.

    ``epoch`` names one lifetime of the stream and changes when the stream is
    lost and recreated; ``offset`` is 1 for the stream's first message and grows
    by one per message.  Offset 0 means "before the first message": with the
    empty epoch ``""`` it is what a client that has never seen the stream asks
    from (see :meth:`History.since`).
    """

    epoch: str
    offset: int


class Recovery(NamedTuple):
    """The answer to "what did I miss?".

    ``messages`` are ``(offset, payload)`` pairs, oldest first.  ``position`` is
    the stream's current top (None when the channel has no stream), from which
    the client carries on.  ``recovered`` is False when the messages are not
    known to be everything the client missed: the messages are then whatever is
    still kept, for a client that would rather have some than none.
    """

    messages: list[tuple[int, bytes]]
    position: Position | None
    recovered: bool


class _Stream:
    """One channel's stream: its epoch, next offset and kept messages.

    ``messages`` holds ``(payload, time stored)`` pairs; the first one's offset
    is ``next_offset - len(messages)``.
    """

    __slots__ = ("epoch", "messages", "next_offset")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.next_offset = 1
        self.messages: deque[tuple[bytes, float]] = deque()

    def top(self) -> Position:
        return Position(self.epoch, self.next_offset - 1)

    def last(self, count: int) -> list[tuple[int, bytes]]:
        """The last ``count`` kept messages as (offset, payload), oldest first.

        Reads from the tail, so the cost is ``count``, not the stream's length.
        """
        messages = self.messages
        count = min(count, len(messages))
        if count <= 0:
            return []
        offset = self.next_offset - count
        tail = list(islice(reversed(messages), count))
        tail.reverse()
        return [(offset + i, payload) for i, (payload, _) in enumerate(tail)]


class HistoryUnavailable(Exception):
    """A :class:`SharedHistory` could not be read (its store is down)."""


class SharedHistory(Protocol):
    """A history that several nodes share, kept elsewhere (in Redis, by the
    backplane): what the engine and the commands use of it.

    A publish on a kept channel is not delivered here at once: :meth:`publish`
    hands it over, and it comes back to every node, this one included, with
    its position (the engine's ``deliver_message_at``), so that every node
    delivers a channel's messages in the order of its history.  When
    :meth:`publish` returns False the message could not be handed over (the
    backplane is down or behind) and the engine delivers it here only,
    without a position, as any publish then.

    :meth:`since` and :meth:`recent` answer as :class:`History`'s do, but
    later: they return Deferreds (Twisted's; this module only names them) of
    a :class:`Recovery`, which fail with :class:`HistoryUnavailable` when the
    history cannot be read.  ``since`` with ``position`` None answers only
    where the channel is (no messages).
    ``since`` answers only once every message published after it will also
    reach this node live, so a client can take the replay, then the live
    messages after its top, with no gap.
    :meth:`forget` says this node no longer carries ``channel`` (its last
    subscriber left): what it delivered of it is no longer a baseline.
    ``missed_filled`` and ``missed_lost`` count the messages this node
    missed (its link to the others was lost a moment), found in the
    history and delivered late, or not.
    """

    shared: Literal[True]
    keeps: Kept
    recoveries: int
    failed_recoveries: int
    missed_filled: int
    missed_lost: int

    def publish(self, channel: bytes, payload: bytes) -> bool: ...

    def forget(self, channel: bytes) -> None: ...

    def since(self, channel: bytes, position: Position | None) -> Any: ...

    def recent(self, channel: bytes, limit: int) -> Any: ...


def _default_epoch() -> str:
    return secrets.token_hex(4)


class Kept:
    """Whether a channel matches one of the globs whose channels keep a history.

    Called on every publish when a history is configured, so the answers are
    cached per channel name.
    """

    def __init__(self, channels: Sequence[bytes]) -> None:
        self._matchers: list[Matcher] = [compile_pattern(pattern) for pattern in channels]
        self._cache: dict[bytes, bool] = {}

    def __call__(self, channel: bytes) -> bool:
        cache = self._cache
        answer = cache.get(channel)
        if answer is None:
            answer = any(matcher(channel) is not None for matcher in self._matchers)
            if len(cache) >= KEEPS_CACHE_SIZE:
                cache.clear()
            cache[channel] = answer
        return answer


def honoured(asked: Position, top: Position, first: int) -> bool:
    """Whether every message after ``asked`` is still kept, in a stream at
    ``top`` whose first kept message has offset ``first`` (``top.offset + 1``
    when it keeps none): the rule of :meth:`History.since`."""
    offset = asked.offset
    same_epoch = asked.epoch == top.epoch or (offset == 0 and asked.epoch == "")
    return same_epoch and 0 <= offset <= top.offset and offset >= first - 1


class History:
    """The recent messages of the channels matching ``channels``, bounded.

    A host calls :meth:`append` on every publish (it costs one dictionary look-up
    for a channel not kept), :meth:`since` or :meth:`recent` when a client
    subscribes asking for recovery, and :meth:`expire` every few seconds.

    ``shared`` is False: this history is this process's own (see
    :class:`SharedHistory` for the other kind).

    ``stored_messages``, ``stored_bytes``, ``stream_count`` and ``evicted`` are
    kept up to date as things change, so that /metrics reads them for free.
    ``stored_*`` count every message not yet dropped: a stream published to
    within ``ttl`` may still hold messages that have expired since, until it is
    next appended to or read (they are never returned).
    """

    shared: Literal[False] = False

    def __init__(
        self,
        channels: Sequence[bytes],
        size: int,
        ttl: float,
        max_bytes: int,
        max_channels: int,
        clock: Callable[[], float],
        new_epoch: Callable[[], str] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"history size must be at least 1, not {size}")
        if not ttl > 0:
            raise ValueError(f"history ttl must be a positive number of seconds, not {ttl}")
        if max_bytes < 1:
            raise ValueError(f"history max_bytes must be at least 1, not {max_bytes}")
        if max_channels < 1:
            raise ValueError(f"history max_channels must be at least 1, not {max_channels}")
        #: Whether a channel keeps a history (matches one of ``channels``).
        self.keeps = Kept(channels)
        self._size = size
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._max_channels = max_channels
        self._clock = clock
        self._new_epoch = new_epoch if new_epoch is not None else _default_epoch
        # Every stream, least recently published first (the max_channels order).
        self._streams: OrderedDict[bytes, _Stream] = OrderedDict()
        # The same order restricted to streams holding messages, so that the
        # max_bytes eviction and expire() never walk past empty streams.
        self._filled: OrderedDict[bytes, _Stream] = OrderedDict()
        self.stored_messages = 0
        self.stored_bytes = 0
        self.evicted = 0
        #: Answers of since(): recovered, and not (for the metrics).
        self.recoveries = 0
        self.failed_recoveries = 0
        self._sweep_every = min(ttl, 10.0)
        self._next_sweep = clock() + self._sweep_every

    @property
    def stream_count(self) -> int:
        """How many streams exist, with messages or with only their metadata."""
        return len(self._streams)

    def append(self, channel: bytes, payload: bytes) -> Position | None:
        """Keep ``payload`` as the next message of ``channel``'s stream.

        Returns the message's position, or None when the channel is not kept.
        The position is returned even when the bounds drop the message at once
        (a payload larger than ``max_bytes``): the offset is spent all the
        same, so that a client knows it missed a message.
        """
        if not self.keeps(channel):
            return None
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_every
            self.expire()
        streams = self._streams
        stream = streams.get(channel)
        if stream is None:
            if len(streams) >= self._max_channels:
                self._drop_stream()
            stream = streams[channel] = _Stream(self._new_epoch())
        else:
            streams.move_to_end(channel)
            self._trim_expired(channel, stream, now - self._ttl)
        messages = stream.messages
        if len(messages) >= self._size:
            self._forget(len(messages.popleft()[0]))
        messages.append((payload, now))
        stream.next_offset += 1
        self.stored_messages += 1
        self.stored_bytes += len(payload) + MESSAGE_OVERHEAD
        filled = self._filled
        if channel in filled:
            filled.move_to_end(channel)
        else:
            filled[channel] = stream
        if self.stored_bytes > self._max_bytes:
            self._evict_bytes()
        return Position(stream.epoch, stream.next_offset - 1)

    def since(self, channel: bytes, position: Position) -> Recovery:
        """What a client whose last seen message is at ``position`` missed.

        Recovered when the stream exists, has the same epoch, and still keeps
        every message after ``position.offset`` (a client at the top missed
        nothing, so it is recovered even when every message has expired).  A
        position beyond the top, from another epoch, or with a negative offset
        is not honoured.

        Offset 0 asks for the whole stream: recovered only while no message was
        ever dropped from it (the first kept offset is still 1).  With offset 0
        the empty epoch ``""`` stands for any epoch, for a client that has never
        seen one.  A channel with no stream is recovered only from offset 0:
        nothing was published to it that is remembered, which for a client
        asking from the start is all there is to know.

        When not recovered, ``messages`` is everything still kept.
        """
        stream = self._streams.get(channel)
        if stream is None:
            if position.offset == 0:
                self.recoveries += 1
                return Recovery([], None, True)
            self.failed_recoveries += 1
            return Recovery([], None, False)
        self._trim_expired(channel, stream, self._clock() - self._ttl)
        top = stream.top()
        if honoured(position, top, stream.next_offset - len(stream.messages)):
            self.recoveries += 1
            return Recovery(stream.last(top.offset - position.offset), top, True)
        self.failed_recoveries += 1
        return Recovery(stream.last(len(stream.messages)), stream.top(), False)

    def recent(self, channel: bytes, limit: int) -> Recovery:
        """The last ``limit`` messages ``channel`` still keeps, oldest first.

        For a client that asks for recent messages rather than for what it
        missed: always recovered, since nothing more was asked.  A channel with
        no stream has no messages and position None.
        """
        stream = self._streams.get(channel)
        if stream is None:
            return Recovery([], None, True)
        self._trim_expired(channel, stream, self._clock() - self._ttl)
        return Recovery(stream.last(limit), stream.top(), True)

    def top(self, channel: bytes) -> Position | None:
        """``channel``'s current position, or None when it has no stream."""
        stream = self._streams.get(channel)
        return None if stream is None else stream.top()

    def expire(self) -> int:
        """Drop the messages ``ttl`` says are gone; returns how many were dropped.

        Walks the streams holding messages from the one published to least
        recently, and stops at the first whose last message is still within
        ``ttl``: every later stream was published to later still.  A stream
        passed over this way may keep expired messages at its head until it is
        next appended to or read; each of them is at most ``ttl`` older than
        that stream's last message, so memory stays bounded.
        """
        cutoff = self._clock() - self._ttl
        filled = self._filled
        dropped = 0
        while filled:
            channel = next(iter(filled))
            messages = filled[channel].messages
            if messages[-1][1] >= cutoff:
                break
            dropped += len(messages)
            self._forget_all(messages)
            del filled[channel]
        return dropped

    # -- the bounds ---------------------------------------------------------------------

    def _forget(self, payload_length: int) -> None:
        self.stored_messages -= 1
        self.stored_bytes -= payload_length + MESSAGE_OVERHEAD

    def _forget_all(self, messages: deque[tuple[bytes, float]]) -> None:
        self.stored_messages -= len(messages)
        self.stored_bytes -= sum(len(payload) for payload, _ in messages) + MESSAGE_OVERHEAD * len(
            messages
        )
        messages.clear()

    def _trim_expired(self, channel: bytes, stream: _Stream, cutoff: float) -> None:
        """Drop the head messages of ``stream`` stored before ``cutoff``."""
        messages = stream.messages
        while messages and messages[0][1] < cutoff:
            self._forget(len(messages.popleft()[0]))
        if not messages:
            self._filled.pop(channel, None)

    def _drop_stream(self) -> None:
        """Drop the stream published to least recently, metadata and all."""
        channel, stream = self._streams.popitem(last=False)
        self._filled.pop(channel, None)
        self._forget_all(stream.messages)

    def _evict_bytes(self) -> None:
        """Drop the oldest messages of the least recently published streams
        until ``stored_bytes`` is within ``max_bytes`` again."""
        filled = self._filled
        while self.stored_bytes > self._max_bytes and filled:
            channel = next(iter(filled))
            messages = filled[channel].messages
            while messages and self.stored_bytes > self._max_bytes:
                self._forget(len(messages.popleft()[0]))
                self.evicted += 1
            if not messages:
                del filled[channel]
