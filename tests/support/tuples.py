"""An engine subscriber whose frames are plain tuples, so deliveries are easy to compare."""

from __future__ import annotations

from typing import Any


class TupleFrames:
    """An encoder (``engine`` calls it once per publish) that builds tuples."""

    def message(self, channel: bytes, payload: bytes) -> Any:
        return ("message", channel, payload)

    def pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> Any:
        return ("pmessage", pattern, channel, payload)

    def message_at(self, channel: bytes, payload: bytes, position: Any) -> Any:
        return ("message", channel, payload, position)

    def smessage(self, channel: bytes, payload: bytes) -> Any:
        return ("smessage", channel, payload)


class TupleSubscriber(TupleFrames):
    """A subscriber that is its own tuple encoder and keeps what it is delivered."""

    def __init__(self) -> None:
        self.encoder = self
        self.frames: list = []

    def deliver(self, frame: Any) -> None:
        self.frames.append(frame)
