"""A client's deliveries, held while something it asked for is being answered.

A client that resumes a channel whose history the nodes share in Redis must
get the messages it missed before the live ones, and each once; the missed
ones are read from Redis, which takes a round trip, while live messages keep
coming.  So for that while the engine delivers to a :class:`Held` instead of
the client (``Engine.set_subscriber``): each frame is kept with, for a
message of a channel with a history, its channel and position, so that the
ones the replay already had can be left out when the client gets the rest.

What is held counts against the client's hard output limit, as its outbox
would: past it the client is cut off as a slow consumer.

Nothing here knows about a transport's framing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pubsub.core.engine import Encoder
from pubsub.core.history import Position

__all__ = ["Held"]

#: One held delivery: the frame, and the channel and position of a message
#: of a channel with a history (else None and None).
Item = tuple[Any, "bytes | None", "Position | None"]


class _Tagging:
    """An encoder's frames, each with the channel and position it carries."""

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder

    def message(self, channel: bytes, payload: bytes) -> Item:
        return self._encoder.message(channel, payload), None, None

    def message_at(self, channel: bytes, payload: bytes, position: Position) -> Item:
        return self._encoder.message_at(channel, payload, position), channel, position

    def pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> Item:
        return self._encoder.pmessage(pattern, channel, payload), None, None

    def smessage(self, channel: bytes, payload: bytes) -> Item:
        return self._encoder.smessage(channel, payload), None, None


class Held:
    """A subscriber for the engine that keeps a client's frames, in order.

    ``encoder`` is the client's own; ``limit`` its hard output limit in bytes
    (0: none), past which ``on_breach`` is called once, with the reason, and
    nothing more is kept.
    """

    def __init__(self, encoder: Encoder, limit: int, on_breach: Callable[[str], None]) -> None:
        self.encoder = _Tagging(encoder)
        self.items: list[Item] = []
        self._bytes = 0
        self._limit = limit
        self._on_breach: Callable[[str], None] | None = on_breach

    def deliver(self, item: Item) -> None:
        if self._on_breach is None:
            return  # breached: the client is being cut off
        self.items.append(item)
        self._bytes += len(item[0])
        if self._limit and self._bytes > self._limit:
            on_breach, self._on_breach = self._on_breach, None
            self.items.clear()
            on_breach(
                f"output buffer over its hard limit of {self._limit} bytes "
                "while its recovery was read"
            )

    def after(self, channel: bytes, top: Position | None) -> list[Any]:
        """The frames held, but those of ``channel`` at or below ``top``
        (the replay had them); all of them when ``top`` is None."""
        if top is None:
            return [frame for frame, _, _ in self.items]
        return [
            frame
            for frame, held_channel, position in self.items
            if held_channel != channel
            or position is None
            or position.epoch != top.epoch
            or position.offset > top.offset
        ]
