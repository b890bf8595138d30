"""The lean frame reader against Autobahn's own: the same input, the same behaviour.

The lean path (``pubsub.websocket.reader.LeanReader``) takes whole and split masked text
frames itself and hands everything else to Autobahn.  Hypothesis sends
random frame sequences (text, binary, control, fragmented, bad UTF-8,
reserved opcodes and bits, oversize, unmasked, non-minimal lengths), split
at random points, to the echo endpoint, which reads through the lean path,
and to a plain Autobahn ``WebSocketServerProtocol`` under the same options:
every byte each one sends back (the echoes, pongs, close frames and their
codes) and whether it drops the connection must be the same.
"""

from __future__ import annotations

import itertools
import json
import struct

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from pubsub.operations.config import Settings
from pubsub.websocket.protocol import EchoServerFactory
from tests.support import wsframes
from tests.support.clocked import websocket_factory
from tests.unit.test_websocket import Connection, Transport

LIMIT = 1000  # max_message_size for both, so that oversize frames are cheap

# The options _ConfiguredFactory sets from these settings, given to a plain factory.
OPTIONS = {
    "maxMessagePayloadSize": LIMIT,
    "maxFramePayloadSize": LIMIT,
    "failByDrop": False,
    "autoPingInterval": 0,
}


class PlainEcho(WebSocketServerProtocol):
    """Autobahn's protocol as it comes, echoing every message while open."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(payload, isBinary)


def plain_factory(clock: Clock) -> WebSocketServerFactory:
    factory = WebSocketServerFactory(reactor=clock)
    factory.protocol = PlainEcho
    factory.setProtocolOptions(**OPTIONS)
    return factory


def lean_factory(clock: Clock) -> EchoServerFactory:
    settings = Settings(max_message_size=LIMIT, ping_interval=0, compression=False)
    return EchoServerFactory(settings, reactor=clock)


def opened(factory) -> tuple:
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = Transport()
    protocol.makeConnection(transport)
    protocol.dataReceived(wsframes.handshake("/echo"))
    assert transport.value().startswith(b"HTTP/1.1 101")
    transport.clear()
    return protocol, transport


def frame(opcode: int, payload: bytes, fin: bool, rsv: int, masked: bool, wide: int) -> bytes:
    """A client frame; ``wide`` 1 or 2 writes a small length the long way."""
    size = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if masked else 0
    if wide == 2 or size > 0xFFFF:
        header = bytes([first, bit | 127]) + struct.pack("!Q", size)
    elif wide == 1 or size > 125:
        header = bytes([first, bit | 126]) + struct.pack("!H", size)
    else:
        header = bytes([first, bit | size])
    if not masked:
        return header + payload
    mask = b"\x37\xfa\x21\x3d"
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


payloads = st.one_of(
    st.text(max_size=60).map(lambda t: t.encode("utf-8")),
    st.text(min_size=100, max_size=400).map(lambda t: t.encode("utf-8")),
    st.binary(max_size=40),
    st.sampled_from([b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"a\xff", b"\xe2\x82"]),
    st.just(json.dumps(["PUBLISH", "c", "x" * 300]).encode()),
    st.integers(min_value=LIMIT - 2, max_value=LIMIT + 2).map(lambda n: b"y" * n),
)
frames = st.builds(
    frame,
    opcode=st.sampled_from([1, 1, 1, 1, 2, 0, 8, 9, 10, 3, 11]),
    payload=payloads,
    fin=st.sampled_from([True, True, True, False]),
    rsv=st.sampled_from([0, 0, 0, 0, 0, 1, 4]),
    masked=st.sampled_from([True] * 9 + [False]),
    wide=st.sampled_from([0] * 8 + [1, 2]),
)


def run(factory, data: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    protocol, transport = opened(factory)
    points = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
    for start, end in itertools.pairwise(points):
        protocol.dataReceived(data[start:end])
    return transport.value(), transport.disconnecting


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(frames, min_size=1, max_size=8).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=3000), max_size=40),
)
@example(
    data=frame(1, "é".encode() * 200, True, 0, True, 0) + frame(1, b"\xc3", True, 0, True, 0),
    cuts=[5, 9, 10, 11, 300],
)
def test_the_lean_path_behaves_as_autobahn_for_any_frames_split_anywhere(data, cuts):
    clock = Clock()
    assert run(lean_factory(clock), data, cuts) == run(plain_factory(clock), data, cuts)


def test_a_text_frame_split_anywhere_is_read_by_the_lean_path():
    # The differential test above would pass if the lean path handed every
    # split frame to Autobahn; this one sees that it does not.
    clock = Clock()
    payload = json.dumps(["PING", "é" * 300]).encode()
    data = wsframes.client_frame(payload)
    for size in (1, 3, 7, 100):
        connection = Connection(websocket_factory(clock))
        for start in range(0, len(data), size):
            connection.send(data[start : start + size])
        assert connection.frames() == [(wsframes.TEXT, b'["pong","' + "é".encode() * 300 + b'"]')]
        protocol = connection.protocol
        assert protocol.current_frame is None and not protocol.data  # Autobahn saw nothing


def test_a_frame_still_arriving_when_the_server_closes_is_autobahns_to_finish():
    # A timer (idle, a revoked token, shutdown) may close the connection
    # while a text frame is half read: the rest is handled as Autobahn would.
    clock = Clock()
    data = frame(1, "é".encode() * 100, True, 0, True, 0) + frame(9, b"ping", True, 0, True, 0)
    outputs = []
    for factory in (lean_factory(clock), plain_factory(clock)):
        protocol, transport = opened(factory)
        protocol.dataReceived(data[:50])
        protocol.sendClose(1000)
        protocol.dataReceived(data[50:])
        outputs.append((transport.value(), transport.disconnecting))
    assert outputs[0] == outputs[1]
