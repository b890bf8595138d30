"""The front door's own opening handshake: what it takes, and that it answers as Autobahn does.

Each request goes twice through a fresh server: through the front (which opens
plain requests itself) and straight to the Autobahn protocol (its own
handshake, as before the front). Both must write the same bytes.
"""

from __future__ import annotations

import json

import jwt
import pytest
from autobahn.twisted.util import create_transport_details
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from pubsub.core.vocabulary import CLOSE_TOKEN
from pubsub.websocket.handshake import accept_response, read_upgrade
from pubsub.websocket.protocol import EchoServerProtocol, PubSubServerProtocol
from tests.support import wsframes
from tests.support.wsframes import TEXT, command
from tests.unit.test_front import connect
from tests.unit.test_websocket import Transport

KEY = wsframes.HANDSHAKE_KEY

PLAIN = [
    "GET / HTTP/1.1",
    "Host: 127.0.0.1:9000",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
]


def head(*changes: str, drop: tuple[str, ...] = (), line: str | None = None) -> bytes:
    """The plain request with headers dropped (by name), replaced or added."""
    fields = [f for f in PLAIN[1:] if f.split(":")[0].lower() not in {d.lower() for d in drop}]
    names = {c.split(":")[0].lower() for c in changes}
    fields = [f for f in fields if f.split(":")[0].lower() not in names] + list(changes)
    return ("\r\n".join([line or PLAIN[0], *fields]) + "\r\n\r\n").encode("latin-1")


ADDRESS = IPv4Address("TCP", "127.0.0.1", 50000)


through_front = connect


def through_autobahn(factory, data: bytes) -> Transport:
    protocol = factory.buildProtocol(ADDRESS)
    transport = Transport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return transport


def opened_here(transport: Transport) -> bool:
    """Whether the front opened the connection itself (Autobahn's handshake
    builds a UTF-8 validator for every connection; this path on first use)."""
    return "utf8validator" not in vars(transport.protocol)


def both_ways(make_front, data: bytes, path_factory=lambda front: front.resource.factory, **kw):
    front = make_front(**kw)
    ours = through_front(front, data)
    other = make_front(**kw)
    theirs = through_autobahn(path_factory(other), data)
    return ours, theirs


# -- which requests the front opens itself --------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        head(),
        head("upgrade: WebSocket", "CONNECTION: upgrade"),  # names and values in any case
        head("Connection: keep-alive, Upgrade"),  # Firefox's
        head("Upgrade: websocket, h2c"),
        head(line="GET /live/x?token=abc&x=1&x=2 HTTP/1.1"),
        head("Host: example.com"),  # no port
        head("Host: [::1]"),
        head("Sec-WebSocket-Protocol: pubsub.json"),
        head("Sec-WebSocket-Protocol: other, pubsub.json"),
        head("Origin: https://app.example.com"),
        head("User-Agent: test", "Accept-Encoding: gzip"),  # anything else is carried along
        head("Host:   127.0.0.1:9000   "),  # Autobahn strips values too
        # What browsers offer; with compression off both sides decline it.
        head("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"),  # Chrome
        head("Sec-WebSocket-Extensions: permessage-deflate"),  # Firefox, Safari
    ],
)
def test_plain_requests_are_opened_by_the_front_as_autobahn_would(make_front, data):
    ours, theirs = both_ways(make_front, data)
    assert opened_here(ours) and not opened_here(theirs)
    assert ours.value() == theirs.value()
    assert ours.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert not ours.disconnecting


@pytest.mark.parametrize(
    "data, status",
    [
        (head(drop=("Host",)), b"400"),
        (head("Sec-WebSocket-Key: c2hvcnQ="), b"400"),  # 5 bytes, not 16
        (head("Sec-WebSocket-Key: " + KEY[:-2] + "AA"), b"400"),  # no == padding
        (head("Sec-WebSocket-Key: " + KEY[:-3] + "!=="), b"400"),  # not base64
        (head(drop=("Sec-WebSocket-Key",)), b"400"),
        (head("Sec-WebSocket-Version: 12"), b"400"),  # answered with the versions spoken
        (head(drop=("Sec-WebSocket-Version",)), b"400"),  # Hixie-76
        (head("Sec-WebSocket-Version: x"), b"400"),
        (head("Connection: keep-alive"), b"400"),
        (head(drop=("Connection",)), b"400"),
        (head("Upgrade: websocketx"), b"400"),  # the front's route takes it, Autobahn does not
        (head("Host: example.com:http"), b"400"),  # a port that is no number
        (head("Sec-WebSocket-Protocol: other"), b"400"),  # pubsub.json or none
        (head("Sec-WebSocket-Protocol: pubsub.json, pubsub.json"), b"400"),
        (head("Origin: null"), b"400"),
        (head("Origin: http://"), b"400"),
        (head(line="GET /#x HTTP/1.1"), b"400"),
        (head(line="GET / HTTP/1.0"), b"505"),
        (head(line="GET / HTTP/1.1 x"), None),  # twisted.web's, not a WebSocket path
    ],
)
def test_every_refusal_is_autobahns_own(make_front, data, status):
    ours, theirs = both_ways(make_front, data)
    if status is None:
        assert not ours.value().startswith(b"HTTP/1.1 101")
        return
    assert not opened_here(ours)
    assert ours.value() == theirs.value()
    assert ours.value().startswith(b"HTTP/1.1 " + status)
    assert ours.disconnecting


@pytest.mark.parametrize(
    "data",
    [
        head("Sec-WebSocket-Version: 8"),  # Autobahn still speaks Hybi-10
        head("Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10"),
        head("Sec-WebSocket-Extensions: x-webkit-deflate-frame"),
        head("Connection: Upgrade", "X-Forwarded-For: 10.0.0.1", "x-forwarded-for: 10.0.0.2"),
        head("Origin: file://"),
        head(line="GET /a;b HTTP/1.1"),
        head(line="GET //x/y HTTP/1.1"),
        head(line="GET /\x85 HTTP/1.1"),  # Autobahn splits lines at NEL too
        head("X-Odd\x0bHeader: 1"),
        head("not a header line"),
    ],
)
def test_unusual_requests_go_to_autobahn_which_answers_as_before(make_front, data):
    ours, theirs = both_ways(make_front, data)
    assert not opened_here(ours)
    assert ours.value() == theirs.value()


def test_extensions_go_to_autobahn_with_compression_on(make_front):
    offer = head("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    ours, theirs = both_ways(make_front, offer, compression=True)
    assert not opened_here(ours)
    assert ours.value() == theirs.value()
    assert b"Sec-WebSocket-Extensions: permessage-deflate" in ours.value()


def test_the_echo_endpoint_opens_the_same_way(make_front):
    data = head(line="GET /echo HTTP/1.1")
    ours, theirs = both_ways(
        make_front, data, path_factory=lambda f: f.resource.echo_factory, echo_endpoint=True
    )
    assert isinstance(ours.protocol, EchoServerProtocol) and opened_here(ours)
    assert ours.value() == theirs.value()
    ours.clear()
    ours.protocol.dataReceived(wsframes.client_frame(b"hello"))
    assert wsframes.parse_frames(ours.value()) == [(TEXT, b"hello")]


# -- the state it leaves ----------------------------------------------------------------------


@pytest.mark.parametrize("offer", ["", "permessage-deflate; client_max_window_bits"])
def test_the_connection_is_left_as_autobahns_handshake_leaves_it(make_front, offer):
    extensions = (f"Sec-WebSocket-Extensions: {offer}",) if offer else ()
    data = head(
        "Sec-WebSocket-Protocol: pubsub.json", *extensions, line="GET /x?token=t&a=1 HTTP/1.1"
    )
    ours, theirs = both_ways(make_front, data)
    mine, autobahns = dict(vars(ours.protocol)), dict(vars(theirs.protocol))
    # The lean reader's notes: who read the head, and who opened the connection.
    assert autobahns.pop("_autobahn_read") and mine.pop("_lean_opened")
    # Built on first use on this path; Autobahn builds them up front.
    lazy = {
        "utf8validator": Utf8Validator,
        "trafficStats": TrafficStats,
        "_transport_details": TransportDetails,
        "is_open": Deferred,
    }
    assert set(autobahns) - set(mine) == set(lazy)
    assert set(mine) - set(autobahns) == set()
    for name, value in autobahns.items():
        if name in lazy:
            assert isinstance(getattr(ours.protocol, name), lazy[name])
        elif value is None or isinstance(value, str | bytes | int | float | list | dict):
            assert mine[name] == value, name
        else:  # objects of each connection's own: timers, futures, the transport, ...
            assert type(mine[name]) is type(value), name
    assert ours.protocol.transport_details.marshal() == theirs.protocol.transport_details.marshal()
    assert ours.protocol.is_open.called and mine["websocket_protocol_in_use"] == "pubsub.json"
    assert mine["http_request_params"] == {"token": ["t"], "a": ["1"]}
    assert ours.protocol.factory.countConnections == 1


def test_a_token_in_the_query_logs_the_client_in(make_front, clock):
    secret = "a shared secret that is long enough for HS256"
    token = jwt.encode({"sub": "alice", "exp": 3600, "subscribe": ["news"]}, secret)
    front = make_front(jwt_secret=secret, ping_interval=0)
    transport = through_front(front, head(line=f"GET /?token={token}&x=1 HTTP/1.1"))
    assert opened_here(transport)
    transport.clear()
    transport.protocol.dataReceived(command("SUBSCRIBE", "news", "other"))
    clock.advance(0)
    assert [json.loads(p) for _, p in wsframes.parse_frames(transport.value())] == [
        ["error", "NOPERM User alice has no permissions to access the 'other' channel"]
    ]
    bad = through_front(front, head(line="GET /?token=nope HTTP/1.1"))
    clock.advance(0)
    ((opcode, payload),) = wsframes.parse_frames(wsframes.split_response(bad.value())[1])
    assert opcode == wsframes.CLOSE and wsframes.close_code(payload) == CLOSE_TOKEN


def test_data_sent_with_the_head_is_read_once_open(make_front, clock):
    front = make_front()
    transport = through_front(front, head() + command("SUBSCRIBE", "a"))
    clock.advance(0)
    _, frames = wsframes.split_response(transport.value())
    assert [json.loads(p) for _, p in wsframes.parse_frames(frames)] == [["subscribe", "a", 1]]


def test_max_connections_is_autobahns_503(make_front):
    front = make_front(max_connections=1)
    first = through_front(front, head())
    second = through_front(front, head())
    assert opened_here(first) and first.value().startswith(b"HTTP/1.1 101")
    assert second.value() == b"HTTP/1.1 503 maximum number of connections reached\r\n\r\n"
    first.protocol.connectionLost(Failure(ConnectionDone()))
    assert front.resource.factory.countConnections == 1  # the refused one, until it goes
    second.protocol.connectionLost(Failure(ConnectionDone()))
    assert front.resource.factory.countConnections == 0
    assert through_front(front, head()).value().startswith(b"HTTP/1.1 101")


def test_a_refused_origin_is_opened_then_closed_with_1008(make_front, clock):
    front = make_front(allowed_origins="https://app.example.com")
    allowed = through_front(front, head("Origin: https://app.example.com"))
    refused = through_front(front, head("Origin: https://evil.example.com"))
    clock.advance(0)
    assert opened_here(refused)
    assert wsframes.split_response(allowed.value())[1] == b""
    response, frames = wsframes.split_response(refused.value())
    assert response.startswith(b"HTTP/1.1 101")
    ((opcode, payload),) = wsframes.parse_frames(frames)
    assert opcode == wsframes.CLOSE and payload[:2] == b"\x03\xf0"
    assert b"origin not allowed" in payload
    assert front.resource.factory.origins.refused == 1


def test_closing_a_connection_opened_here_unregisters_it(make_front):
    front = make_front()
    transport = through_front(front, head())
    factory = front.resource.factory
    assert isinstance(transport.protocol, PubSubServerProtocol)
    assert factory.engine.client_count == 1 and factory.countConnections == 1
    transport.protocol.connectionLost(Failure(ConnectionDone()))
    assert factory.engine.client_count == 0 and factory.countConnections == 0
    assert transport.protocol.is_closed.called


# -- the pieces -------------------------------------------------------------------------------


def test_read_upgrade_reads_the_request_as_autobahn_does():
    data = head(
        "Host: Example.com:9000",
        "Origin: http://localhost:8080",
        "Sec-WebSocket-Protocol: a , pubsub.json",
        line="GET /live/x?token=abc&x=1&x=2 HTTP/1.1",
    )
    upgrade = read_upgrade(data[:-4])
    assert upgrade is not None
    assert upgrade.path == "/live/x" and upgrade.target == "/live/x?token=abc&x=1&x=2"
    assert upgrade.params == {"token": ["abc"], "x": ["1", "2"]}
    assert upgrade.host == "Example.com" and upgrade.origin == "http://localhost:8080"
    assert upgrade.protocols == ["a", "pubsub.json"] and upgrade.key == KEY
    assert upgrade.headers["upgrade"] == "websocket"


def test_accept_response_is_rfc_6455s_example():
    response = accept_response("dGhlIHNhbXBsZSBub25jZQ==", "chat", None)
    assert response == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )


def test_transport_details_are_autobahns(make_front):
    transport = through_front(make_front(), head())
    details = transport.protocol._transport_details
    expected = create_transport_details(transport, True)
    assert details.peer == expected.peer == transport.protocol.peer
    assert details.channel_framing == TransportDetails.CHANNEL_FRAMING_WEBSOCKET
    assert details.is_secure is False
