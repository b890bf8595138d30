"""Output buffering and the slow-consumer policy, for any transport.

Twisted's transports buffer whatever is written to them without limit and
expose no byte count.  Their supported signal is the streaming producer: past
64 KiB unsent they call ``pauseProducing``, and ``resumeProducing`` once the
socket has drained.  An :class:`Outbox` sits between a connection and its
transport: frames go in, are written once per reactor turn as one
``writeSequence`` (not one ``write`` per delivery), and while the transport
is paused they wait in the outbox, where their bytes are counted. A
connection's answers to what it has just sent go out when that read has been
handled (:meth:`OutboxProducer._answer`), without waiting for the end of the
turn.

The policy is Redis's ``client-output-buffer-limit pubsub HARD SOFT SECONDS``:
a connection whose waiting bytes pass the hard limit, or stay past the soft
limit for longer than the soft seconds, is cut off through ``on_breach``
with a reason naming the limit.  Its memory is therefore bounded by the hard
limit plus what the transport holds, whatever the reader does, and nobody
else waits for it.

Nothing here knows about WebSocket or RESP framing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pubsub.internals import send_now

__all__ = ["Flusher", "Outbox", "OutboxProducer", "OutputLimits"]


@dataclass(frozen=True)
class OutputLimits:
    """``client-output-buffer-limit``: bytes and seconds; 0 switches a limit off."""

    hard: int = 8 * 1024 * 1024
    soft: int = 1024 * 1024
    soft_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Any) -> OutputLimits:
        """The ``output_buffer_*`` fields of :class:`pubsub.operations.config.Settings`."""
        return cls(
            settings.output_buffer_hard,
            settings.output_buffer_soft,
            settings.output_buffer_soft_seconds,
        )


class Flusher:
    """Writes every outbox that received frames during this reactor turn.

    One ``callLater(0, ...)`` per turn, whatever the number of connections,
    so a publish to N subscribers costs N list appends, then N writes.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._pending: list[Outbox] = []
        self._call: Any = None
        #: Bytes handed to transports by the outboxes of this flusher.
        self.bytes_out = 0

    def schedule(self, outbox: Outbox) -> None:
        self._pending.append(outbox)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        pending, self._pending = self._pending, []
        for outbox in pending:
            outbox.flush()


class Outbox:
    """One connection's unsent frames, bounded by its output limits."""

    __slots__ = (
        "_breach",
        "_clock",
        "_flusher",
        "_frames",
        "_limits",
        "_scheduled",
        "_soft_timer",
        "_transport",
        "closed",
        "paused",
        "size",
    )

    def __init__(
        self,
        transport: Any,
        flusher: Flusher,
        limits: OutputLimits,
        clock: Any,
        on_breach: Callable[[str], None],
    ) -> None:
        self._transport = transport
        self._flusher = flusher
        self._limits = limits
        self._clock = clock
        self._breach = on_breach
        self._frames: list[bytes] = []
        self._scheduled = False
        self._soft_timer: Any = None
        #: Bytes waiting here (not yet handed to the transport).
        self.size = 0
        #: True while the transport has asked us to stop writing.
        self.paused = False
        #: True once the connection is cut off; later frames are dropped.
        self.closed = False

    def append(self, data: bytes) -> None:
        """Queue ``data`` behind everything queued before it."""
        if self.closed:
            return
        self._frames.append(data)
        self.size += len(data)
        if self.paused:
            self._check_limits()
        elif not self._scheduled:
            self._scheduled = True
            self._flusher.schedule(self)

    def __bool__(self) -> bool:
        return bool(self._frames)

    def hold(self) -> bool:
        """Gather what is queued until :meth:`release`, rather than leave it
        to the flusher at the end of the reactor turn; whether the flusher
        already has this outbox (pass it to :meth:`release`)."""
        scheduled = self._scheduled
        self._scheduled = True
        return scheduled

    def release(self, scheduled: bool) -> None:
        """Write what was gathered since :meth:`hold` at once, unless the
        flusher already has this outbox for this turn."""
        if not scheduled:
            self.flush()

    def flush(self) -> None:
        """Hand every waiting frame to the transport, unless it is paused."""
        self._scheduled = False
        if self.paused or self.closed or not self._frames:
            return
        frames, self._frames = self._frames, []
        self._flusher.bytes_out += self.size
        self.size = 0
        self._cancel_soft_timer()
        send_now(self._transport, frames)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.flush()

    def finish(self) -> None:
        """Hand everything waiting to the transport, paused or not, and accept
        nothing more: the last words before a connection is closed."""
        frames = self._frames
        self._flusher.bytes_out += self.size
        self.close()
        if frames:
            self._transport.writeSequence(frames)

    def close(self) -> None:
        """Drop what is waiting and accept nothing more."""
        self.closed = True
        self._frames = []
        self.size = 0
        self._cancel_soft_timer()

    def _check_limits(self) -> None:
        limits = self._limits
        if limits.hard and self.size > limits.hard:
            self._cut_off(f"output buffer over its hard limit of {limits.hard} bytes")
        elif limits.soft and self.size > limits.soft:
            if self._soft_timer is None and limits.soft_seconds:
                self._soft_timer = self._clock.callLater(limits.soft_seconds, self._soft_expired)
            elif not limits.soft_seconds:
                self._soft_expired()

    def _soft_expired(self) -> None:
        self._soft_timer = None
        if not self.closed and self.size > self._limits.soft:
            self._cut_off(
                f"output buffer over its soft limit of {self._limits.soft} bytes "
                f"for {self._limits.soft_seconds:g} s"
            )

    def _cancel_soft_timer(self) -> None:
        if self._soft_timer is not None:
            if self._soft_timer.active():
                self._soft_timer.cancel()
            self._soft_timer = None

    def _cut_off(self, reason: str) -> None:
        self.close()
        self._breach(reason)


class OutboxProducer:
    """The streaming producer of a connection whose writes go through its
    ``_outbox``: the transport's flow-control signals pause, resume or drop it."""

    _outbox: Outbox | None = None
    transport: Any

    def _start_outbox(self, factory: Any, on_breach: Callable[[str], None]) -> None:
        """Put an outbox (the factory's flusher and limits) between this
        connection and its transport, and become the transport's producer,
        taking over from whoever was (twisted.web's HTTP channel, say)."""
        transport = self.transport
        self._outbox = Outbox(
            transport, factory.flusher, factory.output_limits, factory.reactor, on_breach
        )
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(self, True)

    def _answer(self, read: Callable[[bytes], None], data: bytes) -> None:
        """``read(data)``, then write what it queued at once: the replies to
        the commands of one read (and anything delivered to this connection
        meanwhile) in one write, without waiting for the end of the reactor
        turn. Deliveries to other connections still go out at the end of
        the turn, all together."""
        outbox = self._outbox
        if outbox is None:
            read(data)
            return
        scheduled = outbox.hold()
        try:
            read(data)
        finally:
            outbox.release(scheduled)

    def pauseProducing(self) -> None:
        if self._outbox is not None:
            self._outbox.pause()

    def resumeProducing(self) -> None:
        if self._outbox is not None:
            self._outbox.resume()

    def stopProducing(self) -> None:
        self._drop_outbox()

    def _drop_outbox(self) -> None:
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None
