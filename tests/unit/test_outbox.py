"""The outbox and the slow-consumer policy, on a Clock."""

from __future__ import annotations

import pytest

from pubsub.hosting.outbox import Flusher, Outbox, OutputLimits


class Transport:
    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []

    def writeSequence(self, frames: list[bytes]) -> None:
        self.writes.append(list(frames))


def make_outbox(clock, **limits):
    breaches: list[str] = []
    transport = Transport()
    outbox = Outbox(transport, Flusher(clock), OutputLimits(**limits), clock, breaches.append)
    return outbox, transport, breaches


def test_frames_are_written_once_per_reactor_turn_in_order(clock):
    outbox, transport, _ = make_outbox(clock)
    for n in range(100):
        outbox.append(b"%d" % n)
    assert transport.writes == []
    clock.advance(0)
    assert transport.writes == [[b"%d" % n for n in range(100)]]
    assert outbox.size == 0


def test_one_flush_call_serves_every_outbox(clock):
    flusher = Flusher(clock)
    transports = [Transport() for _ in range(50)]
    outboxes = [Outbox(t, flusher, OutputLimits(), clock, print) for t in transports]
    for outbox in outboxes:
        outbox.append(b"x")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert all(t.writes == [[b"x"]] for t in transports)


def test_paused_frames_wait_and_are_counted_then_flow_on_resume(clock):
    outbox, transport, breaches = make_outbox(clock, hard=1000, soft=0)
    outbox.pause()
    for _ in range(10):
        outbox.append(b"x" * 50)
    clock.advance(0)
    assert transport.writes == [] and outbox.size == 500
    outbox.resume()
    assert transport.writes == [[b"x" * 50] * 10]
    assert outbox.size == 0 and breaches == []


def test_past_the_hard_limit_the_connection_is_cut_off(clock):
    outbox, transport, breaches = make_outbox(clock, hard=1000, soft=0)
    outbox.pause()
    for _ in range(20):
        outbox.append(b"x" * 100)
    assert breaches == ["output buffer over its hard limit of 1000 bytes"]
    assert outbox.closed and outbox.size == 0
    outbox.resume()
    assert transport.writes == []  # what waited was dropped, not sent late


def test_past_the_soft_limit_for_its_seconds_the_connection_is_cut_off(clock):
    outbox, _, breaches = make_outbox(clock, hard=10_000, soft=500, soft_seconds=30)
    outbox.pause()
    outbox.append(b"x" * 600)
    clock.advance(29.9)
    assert breaches == []
    clock.advance(0.2)
    assert breaches == ["output buffer over its soft limit of 500 bytes for 30 s"]


def test_draining_in_time_forgives_the_soft_limit(clock):
    outbox, transport, breaches = make_outbox(clock, hard=10_000, soft=500, soft_seconds=30)
    outbox.pause()
    outbox.append(b"x" * 600)
    clock.advance(20)
    outbox.resume()
    clock.advance(60)
    assert breaches == [] and transport.writes == [[b"x" * 600]]
    # A new stall starts a new clock.
    outbox.pause()
    outbox.append(b"y" * 600)
    clock.advance(29)
    assert breaches == []
    clock.advance(2)
    assert len(breaches) == 1


def test_zero_switches_limits_off(clock):
    outbox, _, breaches = make_outbox(clock, hard=0, soft=0)
    outbox.pause()
    for _ in range(1000):
        outbox.append(b"x" * 1000)
    clock.advance(3600)
    assert breaches == [] and outbox.size == 1_000_000


def test_soft_seconds_zero_cuts_off_at_once(clock):
    outbox, _, breaches = make_outbox(clock, hard=0, soft=10, soft_seconds=0)
    outbox.pause()
    outbox.append(b"x" * 11)
    assert breaches == ["output buffer over its soft limit of 10 bytes for 0 s"]


class Socket:
    def __init__(self, takes: int | None = None, error: OSError | None = None) -> None:
        self.takes, self.error, self.sent = takes, error, []

    def send(self, data: bytes) -> int:
        if self.error:
            raise self.error
        taken = data[: self.takes] if self.takes is not None else data
        self.sent.append(taken)
        return len(taken)


class TcpTransport(Transport):
    """The parts of Twisted's TCP transport the outbox looks at."""

    def __init__(self, sock: Socket, buffered: bytes = b"") -> None:
        super().__init__()
        self.socket, self.connected, self.disconnecting = sock, True, False
        self.dataBuffer, self.offset, self._tempDataBuffer = buffered, 0, []
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def flush_to(transport, clock):
    outbox = Outbox(transport, Flusher(clock), OutputLimits(), clock, lambda reason: None)
    outbox.append(b"one ")
    outbox.append(b"two")
    clock.advance(0)


def test_frames_go_straight_to_the_socket_when_the_transport_holds_nothing(clock):
    transport = TcpTransport(Socket())
    flush_to(transport, clock)
    assert transport.socket.sent == [b"one two"]
    assert transport.writes == [] and transport.written == []


def test_a_fresh_connection_with_twisteds_class_defaults_sends_at_once(clock):
    # Twisted's TCP transport sets dataBuffer and offset only once it buffers.
    transport = TcpTransport(Socket())
    del transport.dataBuffer, transport.offset
    flush_to(transport, clock)
    assert transport.socket.sent == [b"one two"]
    assert transport.writes == [] and transport.written == []


def test_what_the_socket_does_not_take_is_left_to_the_transport(clock):
    transport = TcpTransport(Socket(takes=5))
    flush_to(transport, clock)
    assert transport.socket.sent == [b"one t"] and transport.written == [b"wo"]
    blocked = TcpTransport(Socket(error=BlockingIOError()))
    flush_to(blocked, clock)
    assert blocked.written == [b"one two"]


@pytest.mark.parametrize(
    "change",
    [
        lambda t: setattr(t, "dataBuffer", b"waiting"),
        lambda t: t._tempDataBuffer.append(b"waiting"),
        lambda t: setattr(t, "disconnecting", True),
        lambda t: setattr(t, "connected", False),
        lambda t: setattr(t, "_writeDisconnected", True),
    ],
)
def test_the_transport_queues_it_when_it_already_has_something_or_is_closing(clock, change):
    transport = TcpTransport(Socket())
    change(transport)
    flush_to(transport, clock)
    assert transport.socket.sent == [] and transport.writes == [[b"one ", b"two"]]


class Wrapper(Transport):
    """Like Twisted's TLS wrapper: attribute lookups fall through to the TCP
    transport under it."""

    def __init__(self, under: TcpTransport) -> None:
        super().__init__()
        self._under = under

    def __getattr__(self, name: str):
        return getattr(self._under, name)


def test_a_wrapping_transport_such_as_tls_always_gets_write_sequence(clock):
    under = TcpTransport(Socket())
    wrapper = Wrapper(under)
    flush_to(wrapper, clock)
    assert under.socket.sent == []  # never unencrypted bytes on a TLS socket
    assert wrapper.writes == [[b"one ", b"two"]]
