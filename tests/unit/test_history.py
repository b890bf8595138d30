"""pubsub.core.history: the bounded per-channel history that recovery reads.

Plain examples pin each rule down; a hypothesis state machine then holds a
History against a deliberately naive model (lists and full scans) through
appends, clock advances, expire(), since() and recent().
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pubsub.core.history import (
    KEEPS_CACHE_SIZE,
    MESSAGE_OVERHEAD,
    History,
    Position,
    Recovery,
)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_history(
    channels: tuple[bytes, ...] = (b"news.*",),
    size: int = 10,
    ttl: float = 60.0,
    max_bytes: int = 1_000_000,
    max_channels: int = 100,
    clock: FakeClock | None = None,
) -> tuple[History, FakeClock]:
    clock = clock if clock is not None else FakeClock()
    counter = itertools.count(1)
    history = History(
        channels,
        size=size,
        ttl=ttl,
        max_bytes=max_bytes,
        max_channels=max_channels,
        clock=clock,
        new_epoch=lambda: f"e{next(counter)}",
    )
    return history, clock


# -- construction -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value"),
    [("size", 0), ("ttl", 0.0), ("ttl", -1.0), ("max_bytes", 0), ("max_channels", 0)],
)
def test_a_bound_below_its_minimum_is_refused(argument: str, value: float) -> None:
    arguments: dict[str, float] = {"size": 1, "ttl": 1.0, "max_bytes": 1, "max_channels": 1}
    arguments[argument] = value
    with pytest.raises(ValueError, match=argument):
        History([b"*"], clock=FakeClock(), **arguments)  # type: ignore[arg-type]


def test_the_default_epoch_is_random_hex() -> None:
    history = History([b"*"], size=1, ttl=1.0, max_bytes=1000, max_channels=1, clock=FakeClock())
    position = history.append(b"a", b"x")
    assert position is not None
    assert re.fullmatch("[0-9a-f]{8}", position.epoch)


# -- which channels are kept ------------------------------------------------------------


def test_only_channels_matching_a_glob_are_kept() -> None:
    history, _ = make_history(channels=(b"news.*", b"chat.[ab]"))
    assert history.keeps(b"news.sport")
    assert history.keeps(b"chat.a")
    assert not history.keeps(b"chat.c")
    assert not history.keeps(b"weather")
    assert history.append(b"weather", b"rain") is None
    assert history.top(b"weather") is None
    assert history.stream_count == 0
    assert history.stored_messages == 0


def test_no_globs_keeps_nothing() -> None:
    history, _ = make_history(channels=())
    assert not history.keeps(b"news.x")
    assert history.append(b"news.x", b"p") is None


def test_the_keeps_cache_stays_bounded() -> None:
    history, _ = make_history()
    for i in range(KEEPS_CACHE_SIZE * 2 + 3):
        history.keeps(b"news.%d" % i)
    assert len(history.keeps._cache) <= KEEPS_CACHE_SIZE
    assert history.keeps(b"news.0")
    assert not history.keeps(b"other")


# -- offsets, epochs and positions ---------------------------------------------------------


def test_offsets_start_at_one_and_grow_by_one_per_channel() -> None:
    history, _ = make_history()
    assert history.append(b"news.a", b"1") == Position("e1", 1)
    assert history.append(b"news.a", b"2") == Position("e1", 2)
    assert history.append(b"news.b", b"1") == Position("e2", 1)
    assert history.append(b"news.a", b"3") == Position("e1", 3)
    assert history.top(b"news.a") == Position("e1", 3)
    assert history.top(b"news.b") == Position("e2", 1)
    assert history.top(b"news.c") is None


def test_since_returns_the_messages_after_the_position_oldest_first() -> None:
    history, _ = make_history()
    for payload in (b"a", b"b", b"c", b"d"):
        history.append(b"news.x", payload)
    assert history.since(b"news.x", Position("e1", 2)) == Recovery(
        [(3, b"c"), (4, b"d")], Position("e1", 4), True
    )


def test_a_client_at_the_top_missed_nothing() -> None:
    history, _ = make_history()
    history.append(b"news.x", b"a")
    assert history.since(b"news.x", Position("e1", 1)) == Recovery([], Position("e1", 1), True)


def test_a_position_from_another_epoch_is_not_recovered() -> None:
    history, _ = make_history()
    history.append(b"news.x", b"a")
    history.append(b"news.x", b"b")
    assert history.since(b"news.x", Position("old", 1)) == Recovery(
        [(1, b"a"), (2, b"b")], Position("e1", 2), False
    )


def test_a_position_from_the_future_is_not_recovered() -> None:
    history, _ = make_history()
    history.append(b"news.x", b"a")
    assert history.since(b"news.x", Position("e1", 2)) == Recovery(
        [(1, b"a")], Position("e1", 1), False
    )


def test_a_negative_offset_is_not_recovered() -> None:
    history, _ = make_history()
    history.append(b"news.x", b"a")
    assert history.since(b"news.x", Position("e1", -1)).recovered is False


def test_an_unknown_stream_is_recovered_only_from_offset_zero() -> None:
    history, _ = make_history()
    assert history.since(b"news.x", Position("", 0)) == Recovery([], None, True)
    assert history.since(b"news.x", Position("e9", 0)) == Recovery([], None, True)
    assert history.since(b"news.x", Position("e9", 3)) == Recovery([], None, False)
    assert history.since(b"weather", Position("", 0)) == Recovery([], None, True)


def test_offset_zero_with_the_empty_epoch_reads_a_whole_untrimmed_stream() -> None:
    history, _ = make_history()
    history.append(b"news.x", b"a")
    history.append(b"news.x", b"b")
    expected = Recovery([(1, b"a"), (2, b"b")], Position("e1", 2), True)
    assert history.since(b"news.x", Position("", 0)) == expected
    assert history.since(b"news.x", Position("e1", 0)) == expected


def test_offset_zero_from_another_epoch_is_not_recovered() -> None:
    history, _ = make_history()
    history.append(b"news.x", b"a")
    assert history.since(b"news.x", Position("e7", 0)).recovered is False


def test_offset_zero_is_not_recovered_once_the_stream_was_trimmed() -> None:
    history, _ = make_history(size=2)
    for payload in (b"a", b"b", b"c"):
        history.append(b"news.x", payload)
    assert history.since(b"news.x", Position("", 0)) == Recovery(
        [(2, b"b"), (3, b"c")], Position("e1", 3), False
    )


def test_the_empty_epoch_matches_only_at_offset_zero() -> None:
    history, _ = make_history()
    history.append(b"news.x", b"a")
    assert history.since(b"news.x", Position("", 1)).recovered is False


# -- size ---------------------------------------------------------------------------------


def test_size_keeps_only_the_newest_messages_of_a_stream() -> None:
    history, _ = make_history(size=3)
    for i in range(1, 6):
        history.append(b"news.x", b"%d" % i)
    assert history.stored_messages == 3
    assert history.recent(b"news.x", 10).messages == [(3, b"3"), (4, b"4"), (5, b"5")]
    assert history.evicted == 0


def test_a_position_just_before_the_first_kept_message_is_recovered() -> None:
    history, _ = make_history(size=3)
    for i in range(1, 6):
        history.append(b"news.x", b"%d" % i)
    assert history.since(b"news.x", Position("e1", 2)) == Recovery(
        [(3, b"3"), (4, b"4"), (5, b"5")], Position("e1", 5), True
    )


def test_a_position_whose_next_message_was_trimmed_is_not_recovered() -> None:
    history, _ = make_history(size=3)
    for i in range(1, 6):
        history.append(b"news.x", b"%d" % i)
    assert history.since(b"news.x", Position("e1", 1)) == Recovery(
        [(3, b"3"), (4, b"4"), (5, b"5")], Position("e1", 5), False
    )


# -- ttl ----------------------------------------------------------------------------------


def test_a_message_is_kept_for_exactly_ttl_seconds() -> None:
    history, clock = make_history(ttl=10.0)
    history.append(b"news.x", b"a")
    clock.now += 10.0
    assert history.recent(b"news.x", 5).messages == [(1, b"a")]
    clock.now += 0.5
    assert history.recent(b"news.x", 5) == Recovery([], Position("e1", 1), True)
    assert history.stored_messages == 0
    assert history.stored_bytes == 0


def test_expired_messages_are_not_returned_and_their_absence_fails_recovery() -> None:
    history, clock = make_history(ttl=10.0)
    history.append(b"news.x", b"a")
    clock.now += 6
    history.append(b"news.x", b"b")
    clock.now += 6
    assert history.since(b"news.x", Position("e1", 0)) == Recovery(
        [(2, b"b")], Position("e1", 2), False
    )
    assert history.since(b"news.x", Position("e1", 1)) == Recovery(
        [(2, b"b")], Position("e1", 2), True
    )


def test_append_trims_expired_messages_of_its_stream() -> None:
    history, clock = make_history(ttl=10.0)
    history.append(b"news.x", b"a")
    clock.now += 11
    history.append(b"news.x", b"b")
    assert history.stored_messages == 1
    assert history.stored_bytes == 1 + MESSAGE_OVERHEAD


def test_expire_drops_expired_messages_and_counts_them() -> None:
    history, clock = make_history(ttl=10.0)
    history.append(b"news.a", b"1")
    history.append(b"news.a", b"2")
    history.append(b"news.b", b"3")
    clock.now += 5
    history.append(b"news.c", b"4")
    assert history.expire() == 0
    clock.now += 6
    assert history.expire() == 3
    assert history.stored_messages == 1
    assert history.stored_bytes == 1 + MESSAGE_OVERHEAD
    assert history.stream_count == 3
    assert history.expire() == 0


def test_appends_expire_other_streams_every_ttl_or_ten_seconds() -> None:
    history, clock = make_history(ttl=30.0)
    history.append(b"news.a", b"old")
    clock.now += 31
    history.append(b"news.b", b"x")  # past the first sweep: news.a's message goes
    assert history.stored_messages == 1
    top = history.top(b"news.a")
    assert top is not None and history.since(b"news.a", top).recovered
    assert (history.recoveries, history.failed_recoveries) == (1, 0)
    assert not history.since(b"news.a", Position("other", 1)).recovered
    assert (history.recoveries, history.failed_recoveries) == (1, 1)


def test_a_stream_whose_messages_all_expired_keeps_its_position() -> None:
    history, clock = make_history(ttl=10.0)
    history.append(b"news.x", b"a")
    history.append(b"news.x", b"b")
    clock.now += 11
    history.expire()
    assert history.top(b"news.x") == Position("e1", 2)
    assert history.since(b"news.x", Position("e1", 2)) == Recovery([], Position("e1", 2), True)
    assert history.since(b"news.x", Position("e1", 1)) == Recovery([], Position("e1", 2), False)
    assert history.append(b"news.x", b"c") == Position("e1", 3)


def test_expire_leaves_a_recently_published_streams_head_to_the_lazy_trim() -> None:
    history, clock = make_history(ttl=10.0)
    history.append(b"news.x", b"old")
    clock.now += 8
    history.append(b"news.x", b"new")
    clock.now += 4
    assert history.expire() == 0
    assert history.stored_messages == 2
    assert history.since(b"news.x", Position("e1", 0)).messages == [(2, b"new")]
    assert history.stored_messages == 1


# -- max_channels -------------------------------------------------------------------------


def test_max_channels_drops_the_stream_published_to_least_recently() -> None:
    history, _ = make_history(max_channels=2)
    history.append(b"news.a", b"1")
    history.append(b"news.b", b"2")
    history.append(b"news.a", b"3")
    history.append(b"news.c", b"4")
    assert history.stream_count == 2
    assert history.top(b"news.b") is None
    assert history.top(b"news.a") == Position("e1", 2)
    assert history.stored_messages == 3
    assert history.stored_bytes == 3 * (1 + MESSAGE_OVERHEAD)
    assert history.evicted == 0


def test_reading_a_stream_does_not_count_as_publishing_to_it() -> None:
    history, _ = make_history(max_channels=2)
    history.append(b"news.a", b"1")
    history.append(b"news.b", b"2")
    history.since(b"news.a", Position("e1", 0))
    history.recent(b"news.a", 1)
    history.top(b"news.a")
    history.append(b"news.c", b"3")
    assert history.top(b"news.a") is None
    assert history.top(b"news.b") is not None


def test_a_recreated_stream_has_a_new_epoch_and_old_positions_fail() -> None:
    history, _ = make_history(max_channels=1)
    history.append(b"news.a", b"1")
    history.append(b"news.a", b"2")
    history.append(b"news.b", b"x")
    assert history.since(b"news.a", Position("e1", 2)) == Recovery([], None, False)
    assert history.append(b"news.a", b"3") == Position("e3", 1)
    assert history.since(b"news.a", Position("e1", 2)) == Recovery(
        [(1, b"3")], Position("e3", 1), False
    )


def test_an_empty_stream_counts_towards_max_channels() -> None:
    history, clock = make_history(ttl=1.0, max_channels=1)
    history.append(b"news.a", b"1")
    clock.now += 2
    history.expire()
    assert history.stream_count == 1
    history.append(b"news.b", b"2")
    assert history.stream_count == 1
    assert history.top(b"news.a") is None


# -- max_bytes ----------------------------------------------------------------------------


def test_stored_bytes_counts_payloads_and_a_fixed_overhead() -> None:
    history, _ = make_history()
    history.append(b"news.a", b"12345")
    history.append(b"news.b", b"")
    assert history.stored_bytes == 5 + MESSAGE_OVERHEAD + MESSAGE_OVERHEAD
    assert history.stored_messages == 2


def test_max_bytes_drops_the_oldest_messages_of_the_least_recent_streams_first() -> None:
    unit = 10 + MESSAGE_OVERHEAD
    history, _ = make_history(max_bytes=4 * unit)
    history.append(b"news.a", b"a" * 10)
    history.append(b"news.a", b"b" * 10)
    history.append(b"news.b", b"c" * 10)
    history.append(b"news.a", b"d" * 10)
    assert history.evicted == 0
    # news.b was published to least recently: its one message goes first.
    history.append(b"news.c", b"e" * 10)
    assert history.evicted == 1
    assert history.recent(b"news.b", 10) == Recovery([], Position("e2", 1), True)
    assert history.stored_bytes == 4 * unit
    # Then news.a, oldest message first.
    history.append(b"news.c", b"f" * 10)
    assert history.evicted == 2
    assert [offset for offset, _ in history.recent(b"news.a", 10).messages] == [2, 3]
    assert history.since(b"news.a", Position("e1", 1)).recovered is True
    assert history.since(b"news.a", Position("e1", 0)).recovered is False
    assert history.stream_count == 3


def test_a_message_larger_than_max_bytes_is_dropped_but_spends_its_offset() -> None:
    history, _ = make_history(max_bytes=MESSAGE_OVERHEAD + 5)
    assert history.append(b"news.a", b"small") == Position("e1", 1)
    assert history.append(b"news.a", b"much too large") == Position("e1", 2)
    assert history.stored_messages == 0
    assert history.stored_bytes == 0
    assert history.evicted == 2
    assert history.since(b"news.a", Position("e1", 1)) == Recovery([], Position("e1", 2), False)
    assert history.since(b"news.a", Position("e1", 2)).recovered is True


# -- recent -------------------------------------------------------------------------------


def test_recent_returns_the_last_messages_oldest_first() -> None:
    history, _ = make_history()
    for payload in (b"a", b"b", b"c"):
        history.append(b"news.x", payload)
    assert history.recent(b"news.x", 2) == Recovery([(2, b"b"), (3, b"c")], Position("e1", 3), True)
    assert history.recent(b"news.x", 99).messages == [(1, b"a"), (2, b"b"), (3, b"c")]
    assert history.recent(b"news.x", 0) == Recovery([], Position("e1", 3), True)


def test_recent_on_an_unknown_channel_has_no_position() -> None:
    history, _ = make_history()
    assert history.recent(b"news.x", 5) == Recovery([], None, True)


# -- the model ----------------------------------------------------------------------------


@dataclass
class ModelStream:
    epoch: str
    top: int = 0
    messages: list[tuple[int, bytes, float]] = field(default_factory=list)


class Model:
    """History's rules written the slow, obvious way: lists and full scans."""

    def __init__(
        self, size: int, ttl: float, max_bytes: int, max_channels: int, now: float
    ) -> None:
        self.size, self.ttl, self.max_bytes, self.max_channels = size, ttl, max_bytes, max_channels
        self.streams: dict[bytes, ModelStream] = {}
        self.order: list[bytes] = []  # least recently published first
        self.epochs = itertools.count(1)
        self.evicted = 0
        self.recoveries = self.failed_recoveries = 0
        self.next_sweep = now + min(ttl, 10.0)

    @staticmethod
    def keeps(channel: bytes) -> bool:
        return channel.startswith(b"keep.")

    def all_messages(self) -> list[tuple[int, bytes, float]]:
        return [m for s in self.streams.values() for m in s.messages]

    def stored_bytes(self) -> int:
        return sum(len(payload) + MESSAGE_OVERHEAD for _, payload, _ in self.all_messages())

    def trim(self, channel: bytes, now: float) -> None:
        stream = self.streams[channel]
        stream.messages = [m for m in stream.messages if not m[2] < now - self.ttl]

    def append(self, channel: bytes, payload: bytes, now: float) -> Position | None:
        if not self.keeps(channel):
            return None
        if now >= self.next_sweep:  # append's own expire(), every min(ttl, 10) s
            self.next_sweep = now + min(self.ttl, 10.0)
            self.expire(now)
        if channel not in self.streams:
            if len(self.streams) >= self.max_channels:
                del self.streams[self.order.pop(0)]
            self.streams[channel] = ModelStream(f"e{next(self.epochs)}")
        else:
            self.order.remove(channel)
            self.trim(channel, now)
        self.order.append(channel)
        stream = self.streams[channel]
        stream.top += 1
        stream.messages.append((stream.top, payload, now))
        stream.messages = stream.messages[-self.size :]
        for name in self.order:
            messages = self.streams[name].messages
            while messages and self.stored_bytes() > self.max_bytes:
                messages.pop(0)
                self.evicted += 1
        return Position(stream.epoch, stream.top)

    def since(self, channel: bytes, position: Position, now: float) -> Recovery:
        recovery = self._since(channel, position, now)
        if recovery.recovered:
            self.recoveries += 1
        else:
            self.failed_recoveries += 1
        return recovery

    def _since(self, channel: bytes, position: Position, now: float) -> Recovery:
        if channel not in self.streams:
            return Recovery([], None, position.offset == 0)
        self.trim(channel, now)
        stream = self.streams[channel]
        kept = {offset for offset, _, _ in stream.messages}
        epoch_ok = position.epoch == stream.epoch or (position.offset == 0 and position.epoch == "")
        recovered = (
            epoch_ok
            and 0 <= position.offset <= stream.top
            and all(o in kept for o in range(position.offset + 1, stream.top + 1))
        )
        messages = [
            (offset, payload)
            for offset, payload, _ in stream.messages
            if not recovered or offset > position.offset
        ]
        return Recovery(messages, Position(stream.epoch, stream.top), recovered)

    def recent(self, channel: bytes, limit: int, now: float) -> Recovery:
        if channel not in self.streams:
            return Recovery([], None, True)
        self.trim(channel, now)
        stream = self.streams[channel]
        messages = [(o, p) for o, p, _ in stream.messages]
        return Recovery(
            messages[-limit:] if limit > 0 else [], Position(stream.epoch, stream.top), True
        )

    def expire(self, now: float) -> int:
        # A stream whose last message has expired loses them all; the others are
        # left to the lazy trim (see History.expire).
        dropped = 0
        for stream in self.streams.values():
            if stream.messages and stream.messages[-1][2] < now - self.ttl:
                dropped += len(stream.messages)
                stream.messages = []
        return dropped


CHANNELS = [b"keep.a", b"keep.b", b"keep.c", b"keep.d", b"drop.a"]


class HistoryMachine(RuleBasedStateMachine):
    history: History
    model: Model
    clock: FakeClock

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, Position]] = []

    @initialize(
        size=st.integers(1, 4),
        ttl=st.sampled_from([1.0, 5.0, 30.0]),
        # Mostly room for a few messages, so that max_bytes evicts often.
        max_bytes=st.one_of(
            st.integers(1, MESSAGE_OVERHEAD + 6),
            st.integers(2 * MESSAGE_OVERHEAD, 6 * (MESSAGE_OVERHEAD + 6)),
        ),
        max_channels=st.integers(1, 4),
    )
    def start(self, size: int, ttl: float, max_bytes: int, max_channels: int) -> None:
        self.clock = FakeClock(100.0)
        epochs = itertools.count(1)
        self.history = History(
            [b"keep.*"],
            size=size,
            ttl=ttl,
            max_bytes=max_bytes,
            max_channels=max_channels,
            clock=self.clock,
            new_epoch=lambda: f"e{next(epochs)}",
        )
        self.model = Model(size, ttl, max_bytes, max_channels, self.clock.now)

    @rule(channel=st.sampled_from(CHANNELS), payload=st.binary(max_size=6))
    def append(self, channel: bytes, payload: bytes) -> None:
        position = self.history.append(channel, payload)
        assert position == self.model.append(channel, payload, self.clock.now)
        if position is not None:
            self.seen.append((channel, position))

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 31.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def expire(self) -> None:
        assert self.history.expire() == self.model.expire(self.clock.now)

    @rule(data=st.data(), channel=st.sampled_from(CHANNELS))
    def since(self, data: st.DataObject, channel: bytes) -> None:
        candidates = [position for name, position in self.seen if name == channel]
        candidates += [Position("", 0), Position("e1", 0), Position("zz", 1)]
        for position in list(candidates):
            candidates.append(position._replace(offset=position.offset + 1))
            candidates.append(position._replace(offset=position.offset - 1))
        position = data.draw(st.sampled_from(candidates))
        assert self.history.since(channel, position) == self.model.since(
            channel, position, self.clock.now
        )

    @rule(channel=st.sampled_from(CHANNELS), limit=st.integers(0, 5))
    def recent(self, channel: bytes, limit: int) -> None:
        assert self.history.recent(channel, limit) == self.model.recent(
            channel, limit, self.clock.now
        )

    @invariant()
    def figures_agree(self) -> None:
        history, model = self.history, self.model
        assert history.stored_messages == len(model.all_messages())
        assert history.stored_bytes == model.stored_bytes()
        assert history.stream_count == len(model.streams)
        assert history.evicted == model.evicted
        assert (history.recoveries, history.failed_recoveries) == (
            model.recoveries,
            model.failed_recoveries,
        )
        assert history.stored_bytes <= model.max_bytes
        assert history.stream_count <= model.max_channels
        for channel in CHANNELS:
            stream = model.streams.get(channel)
            expected = None if stream is None else Position(stream.epoch, stream.top)
            assert history.top(channel) == expected


HistoryMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestHistoryMachine = HistoryMachine.TestCase
