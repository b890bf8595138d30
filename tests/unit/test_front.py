"""The front of the WebSocket port: upgrades straight to Autobahn, the rest to twisted.web."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.web.http import _GenericHTTPChannelProtocol

from pubsub.web import front as front_module
from pubsub.websocket.protocol import EchoServerProtocol, PubSubServerProtocol
from tests.support import wsframes
from tests.support.searches import counting_bytearray
from tests.unit.test_websocket import Transport


def upgrade(path: str = "/", upgrade_field: str = "Upgrade: websocket") -> bytes:
    return wsframes.handshake(path).replace(b"Upgrade: websocket", upgrade_field.encode())


def connect(front, *chunks: bytes, host: str = "127.0.0.1") -> Transport:
    """A connection from ``host`` to the front door, fed ``chunks``."""
    protocol = front.buildProtocol(IPv4Address("TCP", host, 50000))
    transport = Transport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    for chunk in chunks:
        transport.protocol.dataReceived(chunk)
    return transport


@pytest.mark.parametrize(
    "head, goes_to",
    [
        (upgrade("/"), "pubsub"),
        (upgrade("/live/x?token=1"), "pubsub"),
        (upgrade("/", "upgrade: WebSocket"), "pubsub"),
        (upgrade("/", "Upgrade: h2c"), "web"),
        (upgrade("/healthz"), "web"),
        (upgrade("/metrics/x"), "web"),
        (upgrade("/echo"), "web"),  # no echo endpoint in these settings
        (upgrade("/%68ealthz"), "web"),  # twisted.web unquotes before routing
        (upgrade("/").replace(b"GET ", b"POST "), "web"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "web"),
        (b"junk\r\n\r\n", "web"),
    ],
)
def test_route(make_front, head, goes_to):
    front = make_front()
    factory = front.route(head.split(b"\r\n\r\n")[0])
    assert (factory is front.resource.factory) == (goes_to == "pubsub")
    assert factory is None or goes_to == "pubsub"


def test_an_upgrade_goes_straight_to_autobahn_even_in_pieces(make_front):
    front = make_front()
    head = upgrade("/")
    transport = connect(front, *(head[i : i + 7] for i in range(0, len(head), 7)))
    assert isinstance(transport.protocol, PubSubServerProtocol)
    assert transport.value().startswith(b"HTTP/1.1 101 Switching Protocols")
    assert front.resource.factory.engine.client_count == 1


def test_a_head_sent_a_byte_at_a_time_is_searched_once_and_still_opens(make_front, monkeypatch):
    Counting = counting_bytearray()
    monkeypatch.setattr(front_module, "bytearray", Counting, raising=False)
    front = make_front()
    head = upgrade("/").replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"p" * 12_000 + b"\r\n\r\n")
    transport = connect(front)
    for i in range(len(head)):
        transport.protocol.dataReceived(head[i : i + 1])
    assert transport.value().startswith(b"HTTP/1.1 101 Switching Protocols")
    assert len(head) - 1 <= Counting.searched <= 4 * len(head)


def test_the_echo_endpoint_is_reached_directly_when_it_is_on(make_front):
    front = make_front(echo_endpoint=True)
    transport = connect(front, upgrade("/echo"))
    assert isinstance(transport.protocol, EchoServerProtocol)
    assert transport.value().startswith(b"HTTP/1.1 101")


def test_everything_else_is_served_by_twisted_web_with_every_byte(make_front):
    front = make_front()
    transport = connect(front, b"GET /heal", b"thz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = transport.value().partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200") and json.loads(body)["status"] == "ok"
    missing = connect(front, upgrade("/healthz/x").replace(b"GET /healthz/x", b"GET /nope"))
    assert missing.value().startswith(b"HTTP/1.1 101")  # any other path upgrades
    script = connect(front, upgrade("/pubsub.js"))  # reserved: the client, never an upgrade
    assert script.value().startswith(b"HTTP/1.1 200")
    assert b"text/javascript" in script.value()
    metrics = connect(front, upgrade("/metrics"))  # reserved: never upgrades
    assert metrics.value().startswith(b"HTTP/1.1 200")


def test_a_head_that_never_ends_is_left_to_twisted_web(make_front):
    front = make_front()
    transport = connect(front, b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20_000)
    assert isinstance(transport.protocol, _GenericHTTPChannelProtocol)
    assert transport.disconnecting  # twisted.web drops a header line over its 16 KiB


def test_a_client_that_never_finishes_its_head_is_dropped_after_the_timeout(make_front, clock):
    front = make_front(open_handshake_timeout=5)
    transport = connect(front, b"GET / HTTP/1.1\r\nHost")
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting  # StringTransport records an abort this way
