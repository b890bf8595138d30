"""Timers shared by every connection of a port: one reactor timer serves many.

A connection that waits for something (the end of its request's head, a
pong, a close handshake) would otherwise set and cancel a reactor timer of
its own, which opening and closing a connection pays for even when nothing
is late.  :class:`Deadlines` bounds items that all wait the same time (the
front door's request heads); :class:`BatchedTimer` is what Autobahn schedules
its pings and timeouts with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

__all__ = ["BatchedTimer", "Deadlines"]


class Deadlines:
    """Calls ``expire(item)`` for each item still here ``seconds`` after it
    was added, on one timer for them all.

    Every item waits the same time, so they fall due in the order they came:
    adding and discarding cost a dict entry each (no timer per item to make
    and cancel, which is what a connection's opening would otherwise pay),
    and the one timer is set for the oldest item only.
    """

    def __init__(self, clock: Any, seconds: float, expire: Callable[[Any], None]) -> None:
        self._clock = clock
        self._seconds = seconds
        self._expire = expire
        self._due: dict[Any, float] = {}
        self._call: Any = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, item: Any) -> None:
        self._due[item] = self._clock.seconds() + self._seconds
        if self._call is None:
            self._call = self._clock.callLater(self._seconds, self._run)

    def discard(self, item: Any) -> None:
        self._due.pop(item, None)

    def _run(self) -> None:
        self._call = None
        now = self._clock.seconds()
        expired = []
        while self._due:
            item, due = next(iter(self._due.items()))
            if due > now:
                self._call = self._clock.callLater(due - now, self._run)
                break
            del self._due[item]
            expired.append(item)
        for item in expired:
            self._expire(item)


_log = Logger()


class _BatchedCall:
    """One call of a :class:`BatchedTimer`; ``cancel()`` forgets it."""

    __slots__ = ("_bucket", "_call")

    def __init__(self, bucket: dict[_BatchedCall, None], call: Callable[[], Any]) -> None:
        self._bucket = bucket
        self._call = call

    def cancel(self) -> None:
        self._bucket.pop(self, None)


class BatchedTimer:
    """Timers for every connection of a factory: what Autobahn schedules its
    pings, ping timeouts and handshake timeouts with (txaio's
    ``IBatchedTimer``, the factory's ``_batched_timer``).

    Calls due in the same ``resolution`` seconds share one reactor timer and
    run at its end, never early; past ``chunk`` calls at once, the rest run
    on the next reactor turns, so 10,000 pings due together do not stall the
    server. Scheduling is a dict entry, cancelling one removal: txaio's own
    timer allocates a closure per call and removes a cancelled one from a
    list as long as the connections opened in the same second, which every
    connection closing before its first ping paid.
    """

    def __init__(self, clock: Any, resolution: float = 0.2, chunk: int = 1000) -> None:
        self._clock = clock
        self._resolution = resolution
        self._chunk = chunk
        self._buckets: dict[int, dict[_BatchedCall, None]] = {}

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any) -> _BatchedCall:
        now = self._clock.seconds()
        slot = math.ceil((now + delay) / self._resolution)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = {}
            self._clock.callLater(max(0.0, slot * self._resolution - now), self._run, slot)
        call = _BatchedCall(bucket, (lambda: func(*args)) if args else func)
        bucket[call] = None
        return call

    def _run(self, slot: int) -> None:
        bucket = self._buckets[slot]
        due = [bucket.popitem()[0] for _ in range(min(self._chunk, len(bucket)))]
        if bucket:
            self._clock.callLater(0, self._run, slot)
        else:
            del self._buckets[slot]
        for call in due:
            try:
                call._call()
            except Exception:  # noqa: BLE001 - one connection's fault must not stop the others
                _log.failure("internal fault in a connection's timer")
