"""The WebSocket protocol driven byte by byte through StringTransport."""

from __future__ import annotations

import base64
import json
import zlib

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from pubsub.websocket import framing, json_codec
from pubsub.websocket import protocol as websocket
from pubsub.websocket.protocol import PubSubServerFactory, PubSubServerProtocol
from tests.support import wsframes
from tests.support.wsframes import BINARY, CLOSE, TEXT, client_frame, command


class Transport(StringTransport):
    """StringTransport, tolerant of Autobahn unregistering a producer it never set."""

    def unregisterProducer(self):
        self.producer = None


class Connection:
    """One protocol instance on a StringTransport, past its opening handshake."""

    def __init__(
        self,
        factory: PubSubServerFactory,
        protocols: list[str] | None = None,
        extra: str = "",
        path: str = "/",
    ) -> None:
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        self.transport = Transport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(wsframes.handshake(path, protocols, extra))
        self.response, rest = wsframes.split_response(self.transport.value())
        self.transport.clear()
        self.transport.write(rest)  # frames sent right after the handshake, if any

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def frames(self) -> list[tuple[int, bytes]]:
        self.protocol.factory.reactor.advance(0)  # the end of this reactor turn: outboxes flush
        frames = wsframes.parse_frames(self.transport.value())
        self.transport.clear()
        return frames

    def messages(self) -> list:
        frames = self.frames()
        assert all(opcode == TEXT for opcode, _ in frames), frames
        return [json.loads(payload) for _, payload in frames]

    def call(self, *args: object) -> list:
        self.send(command(*args))
        return self.messages()


@pytest.fixture
def factory(make_factory):
    return make_factory()


def test_open_registers_with_the_engine_and_close_unregisters(factory):
    connection = Connection(factory)
    assert connection.response.startswith(b"HTTP/1.1 101")
    assert factory.engine.client_count == 1
    connection.call("SUBSCRIBE", "news")
    connection.protocol.connectionLost(Failure(ConnectionLost()))
    assert factory.engine.client_count == 0
    assert factory.engine.numsub([b"news"]) == [(b"news", 0)]


def test_subprotocol_is_chosen_only_when_asked_for(factory):
    asked = Connection(factory, protocols=["other", "pubsub.json"])
    assert b"Sec-WebSocket-Protocol: pubsub.json" in asked.response
    plain = Connection(factory)
    assert b"Sec-WebSocket-Protocol" not in plain.response


def test_subscribe_publish_and_every_frame_kind(factory):
    alice, bob = Connection(factory), Connection(factory)
    assert alice.call("SUBSCRIBE", "news") == [["subscribe", "news", 1]]
    assert alice.call("PSUBSCRIBE", "n*") == [["psubscribe", "n*", 2]]
    assert alice.call("SSUBSCRIBE", "s") == [["ssubscribe", "s", 1]]
    assert bob.call("PUBLISH", "news", "hi") == [["reply", 2]]
    assert bob.call("SPUBLISH", "s", "there") == [["reply", 1]]
    assert alice.messages() == [
        ["message", "news", "hi"],
        ["pmessage", "n*", "news", "hi"],
        ["smessage", "s", "there"],
    ]
    assert bob.call("PING") == [["pong", ""]]
    assert bob.call("PING", "x") == [["pong", "x"]]
    assert bob.call("PUBSUB", "NUMSUB", "news", "none") == [["reply", ["news", 1, "none", 0]]]
    assert alice.call("UNSUBSCRIBE") == [["unsubscribe", "news", 1]]
    assert alice.call("UNSUBSCRIBE") == [["unsubscribe", None, 1]]


@pytest.mark.parametrize(
    "frame, error",
    [
        (b"{not json", "the frame is not valid JSON"),
        (b'{"a": 1}', "a command is a non-empty JSON array of strings"),
        (b"[]", "a command is a non-empty JSON array of strings"),
        (b'"PING"', "a command is a non-empty JSON array of strings"),
        (b"[1]", "the command name must be a string"),
        (b'["PUBLISH", "ch", 5]', "argument 2 must be a string"),
        (b'["PUBLISH", "ch", NaN]', "argument 2 must be a string"),
        (b'["PUBLISH", "ch", 123456789012345678901234567890]', "argument 2 must be a string"),
        (b'["PUBLISH", 5, "x"]', "argument 1 must be a string"),
        (b'["SUBSCRIBE", {"base64": "YQ=="}]', "argument 1 must be a string"),
        (b'["PUBLISH", "ch", {"base64": "not base64!"}]', "argument 2 is not valid base64"),
        (b'["PUBLISH", "ch", {"base64": "YQ==", "x": 1}]', 'must be a string or {"base64": ...}'),
        (b'["PUBLISH", "ch", null]', 'must be a string or {"base64": ...}'),
        (b'["PUBLISH", "\\ud800", "x"]', "argument 1 is not valid Unicode text"),
        (b"[" * 100_000 + b"]" * 100_000, "the frame is not valid JSON"),
        (b'["NOPE", "a"]', "ERR unknown command 'NOPE', with args beginning with: 'a' "),
        (b'["PUBLISH", "ch"]', "ERR wrong number of arguments for 'publish' command"),
    ],
)
def test_bad_input_costs_one_error_frame_and_the_connection_stays_usable(factory, frame, error):
    connection = Connection(factory)
    connection.send(client_frame(frame))
    replies = connection.messages()
    assert len(replies) == 1
    assert replies[0][0] == "error"
    assert replies[0][1].startswith("ERR ")
    assert error in replies[0][1]
    assert connection.call("PING") == [["pong", ""]]


def test_binary_frame_gets_an_error_frame(factory):
    connection = Connection(factory)
    connection.send(client_frame(b'["PING"]', opcode=BINARY))
    [[kind, text]] = connection.messages()
    assert kind == "error"
    assert "binary frames are not accepted" in text
    assert connection.call("PING") == [["pong", ""]]


def test_base64_payloads_cross_without_losing_a_byte(factory):
    subscriber, publisher = Connection(factory), Connection(factory)
    subscriber.call("SUBSCRIBE", "bin")
    raw = bytes(range(256))
    encoded = base64.b64encode(raw).decode()
    assert publisher.call("PUBLISH", "bin", {"base64": encoded}) == [["reply", 1]]
    assert publisher.call("PUBLISH", "bin", {"base64": base64.b64encode(b"text").decode()}) == [
        ["reply", 1]
    ]
    assert subscriber.messages() == [
        ["message", "bin", {"base64": encoded}],
        ["message", "bin", "text"],
    ]


def test_message_over_the_size_limit_closes_with_1009(make_factory):
    factory = make_factory(max_message_size=100)
    connection = Connection(factory)
    assert connection.call("PUBLISH", "c", "x" * 50) == [["reply", 0]]
    connection.send(command("PUBLISH", "c", "x" * 200))
    [(opcode, payload)] = connection.frames()
    assert opcode == CLOSE
    assert wsframes.close_code(payload) == 1009


def test_a_publish_frames_its_message_once_for_all_subscribers(factory, monkeypatch):
    subscribers = [Connection(factory) for _ in range(5)]
    for subscriber in subscribers:
        subscriber.call("SUBSCRIBE", "news")
        subscriber.call("PSUBSCRIBE", "n*")
    prepared = []
    original = framing.text_frame

    def counting_prepare(payload, *args, **kwargs):
        prepared.append(payload)
        return original(payload, *args, **kwargs)

    monkeypatch.setattr(factory.frames, "_frame", counting_prepare)
    publisher = Connection(factory)
    assert publisher.call("PUBLISH", "news", "hi") == [["reply", 10]]
    assert prepared == [
        b'["message","news","hi"]',
        b'["pmessage","n*","news","hi"]',
    ]
    for subscriber in subscribers:
        assert subscriber.messages() == [
            ["message", "news", "hi"],
            ["pmessage", "n*", "news", "hi"],
        ]


def test_nothing_is_sent_after_the_close_handshake_began(factory):
    subscriber, publisher = Connection(factory), Connection(factory)
    subscriber.call("SUBSCRIBE", "news")
    subscriber.protocol.sendClose(1000)
    subscriber.frames()
    publisher.call("PUBLISH", "news", "late")
    assert subscriber.frames() == []


@pytest.mark.parametrize("compression", [False, True])
def test_a_command_that_comes_after_our_close_frame_is_not_run(make_factory, compression):
    # Found by the WebSocket fuzzer: a reply was sent after the close frame,
    # or, compressed, Autobahn refused to send it and the server logged a fault.
    factory = make_factory(compression=compression)
    extra = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if compression else ""
    connection = Connection(factory, extra=extra)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        connection.protocol.sendClose(1000)
        connection.send(wsframes.command("PUBLISH", "c", "late"))
        connection.send(wsframes.client_frame(b"binary", opcode=wsframes.BINARY))
        frames = connection.frames()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [opcode for opcode, _ in frames] == [wsframes.CLOSE]
    assert not [event for event in events if "log_failure" in event]
    assert factory.engine.publishes == 0


def test_an_internal_fault_closes_with_1011_and_is_logged(factory, monkeypatch):
    events = []
    monkeypatch.setattr(websocket, "_log", Logger(observer=events.append))

    def broken(session, args, table):
        raise RuntimeError("boom")

    monkeypatch.setattr(websocket, "execute", broken)
    connection = Connection(factory)
    connection.send(command("PING"))
    [(opcode, payload)] = connection.frames()
    assert opcode == CLOSE
    assert wsframes.close_code(payload) == 1011
    assert any(event.get("log_failure") is not None for event in events)
    failure = next(event["log_failure"] for event in events if "log_failure" in event)
    assert failure.check(RuntimeError)


def test_compressed_deliveries_on_the_wire(make_factory):
    factory = make_factory(compression=True, compression_min_size=100)
    connection = Connection(factory, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert (
        b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover"
        in connection.response
    )
    factory.engine.subscribe(connection.protocol.session.client_id, [b"c"])
    big, small = "b" * 500, "s"
    factory.engine.publish("c", big)
    factory.engine.publish("c", small)
    factory.reactor.advance(0)
    [(first, compressed), (second, plain)] = [
        (data[0], data) for data in _raw_frames(connection.transport.value())
    ]
    assert first == 0xC1  # FIN, RSV1 (compressed), text
    inflated = zlib.decompressobj(-15).decompress(_payload(compressed) + b"\x00\x00\xff\xff")
    assert json.loads(inflated) == ["message", "c", big]
    assert second == 0x81  # FIN, text, not compressed: under compression_min_size
    assert json.loads(_payload(plain)) == ["message", "c", small]


def _raw_frames(data: bytes) -> list[bytes]:
    """Whole server frames, header included (payloads under 64 KiB)."""
    frames = []
    while data:
        size = data[1] & 0x7F
        header = 2
        if size == 126:
            size, header = int.from_bytes(data[2:4], "big"), 4
        frames.append(data[: header + size])
        data = data[header + size :]
    return frames


def _payload(frame: bytes) -> bytes:
    return frame[4:] if frame[1] & 0x7F == 126 else frame[2:]


def test_the_connection_is_its_transports_streaming_producer(factory):
    connection = Connection(factory)
    assert connection.transport.producer is connection.protocol
    assert connection.transport.streaming


def test_replies_queue_behind_waiting_deliveries(factory):
    subscriber, publisher = Connection(factory), Connection(factory)
    subscriber.call("SUBSCRIBE", "c")
    publisher.send(command("PUBLISH", "c", "first"))
    subscriber.send(command("PING", "after"))
    assert subscriber.messages() == [["message", "c", "first"], ["pong", "after"]]


def test_the_replies_to_one_read_go_out_in_one_write_as_it_ends(factory):
    subscriber, publisher = Connection(factory), Connection(factory)
    subscriber.call("SUBSCRIBE", "c")
    writes = []
    publisher.transport.writeSequence = lambda frames: writes.append(b"".join(frames))
    publisher.send(command("PING", "1") + command("PUBLISH", "c", "m") + command("PING", "2"))
    assert [json.loads(p) for _, p in wsframes.parse_frames(b"".join(writes))] == [
        ["pong", "1"],
        ["reply", 1],
        ["pong", "2"],
    ]
    assert len(writes) == 1
    # Deliveries to other connections go out at the end of the reactor turn.
    assert subscriber.transport.value() == b""
    assert subscriber.messages() == [["message", "c", "m"]]


def test_a_stalled_subscriber_is_cut_off_past_the_hard_limit(make_factory):
    factory = make_factory(output_buffer_hard=10_000, output_buffer_soft=0)
    stalled, healthy, publisher = Connection(factory), Connection(factory), Connection(factory)
    stalled.call("SUBSCRIBE", "c")
    healthy.call("SUBSCRIBE", "c")
    stalled.protocol.pauseProducing()  # what the transport does past 64 KiB unsent
    payloads = [f"{n:04d}" + "x" * 996 for n in range(30)]
    for payload in payloads:
        publisher.send(command("PUBLISH", "c", payload))
    assert healthy.messages() == [["message", "c", p] for p in payloads]
    [(opcode, payload)] = stalled.frames()  # the close frame; the backlog was dropped
    assert opcode == CLOSE
    assert wsframes.close_code(payload) == 1008
    assert payload[2:] == b"output buffer over its hard limit of 10000 bytes"
    assert factory.slow_consumers == 1
    # Counted until the end of the turn that cut it off (publisher.messages
    # ends it), then forgotten although its close handshake is still open.
    assert publisher.messages() == [["reply", 2]] * 30
    assert publisher.call("PUBLISH", "c", "later") == [["reply", 1]]
    assert factory.engine.client_count == 2
    stalled.protocol.connectionLost(Failure(ConnectionLost()))
    assert factory.engine.client_count == 2


def test_a_subscriber_that_resumes_in_time_gets_everything_in_order(make_factory):
    factory = make_factory(output_buffer_hard=0, output_buffer_soft=5000)
    slow, publisher = Connection(factory), Connection(factory)
    slow.call("SUBSCRIBE", "c")
    slow.protocol.pauseProducing()
    for n in range(20):
        publisher.send(command("PUBLISH", "c", str(n) * 500))
    assert slow.frames() == []
    factory.reactor.advance(29)
    slow.protocol.resumeProducing()
    assert slow.messages() == [["message", "c", str(n) * 500] for n in range(20)]
    factory.reactor.advance(60)
    assert factory.slow_consumers == 0


def test_a_fault_while_opening_closes_with_1011_and_is_logged(factory, monkeypatch):
    events = []
    monkeypatch.setattr(websocket, "_log", Logger(observer=events.append))
    monkeypatch.setattr(factory, "encoder_for", None)  # calling it raises TypeError
    connection = Connection(factory)
    [(opcode, payload)] = connection.frames()
    assert opcode == CLOSE and wsframes.close_code(payload) == 1011
    assert any(event.get("log_failure") is not None for event in events)
    assert factory.engine.client_count == 0


# -- the lean reading path (whole text frames taken without Autobahn's frame machine) --


def test_pipelined_commands_split_at_every_byte_are_all_answered_in_order(factory):
    connection = Connection(factory)
    stream = b"".join(command("PING", str(n)) for n in range(5)) + command("PING", "x" * 300)
    for index in range(len(stream)):
        connection.send(stream[index : index + 1])
    assert connection.messages() == [["pong", str(n)] for n in range(5)] + [["pong", "x" * 300]]


def test_control_frames_between_text_frames_keep_their_place(factory):
    connection = Connection(factory)
    connection.send(
        command("PING", "a")
        + client_frame(b"hb", opcode=wsframes.PING)
        + command("PING", "b")
        + client_frame(json.dumps(["PING", "c"]).encode()[:5], fin=False)
        + client_frame(json.dumps(["PING", "c"]).encode()[5:], opcode=0)
        + command("PING", "d")
    )
    frames = connection.frames()
    assert [(opcode, payload) for opcode, payload in frames] == [
        (TEXT, b'["pong","a"]'),
        (wsframes.PONG, b"hb"),
        (TEXT, b'["pong","b"]'),
        (TEXT, b'["pong","c"]'),
        (TEXT, b'["pong","d"]'),
    ]


def test_invalid_utf8_fails_as_soon_as_it_arrives_not_once_the_frame_is_whole(factory):
    connection = Connection(factory)
    frame = client_frame(b'["PING", "' + b"\xff" + b'"]' + b" " * 100)
    connection.send(frame[:20])  # the header, the mask and the bad byte, not the rest
    [(opcode, payload)] = connection.frames()
    assert opcode == CLOSE and wsframes.close_code(payload) == 1007


def test_frames_the_lean_path_leaves_to_autobahn_are_judged_by_it(make_factory):
    factory = make_factory(max_message_size=100)
    too_big = Connection(factory)
    too_big.send(command("PING", "x" * 200))
    [(opcode, payload)] = too_big.frames()
    assert opcode == CLOSE and wsframes.close_code(payload) == 1009
    not_minimal = Connection(factory)  # a 5-byte payload with a 16-bit length
    not_minimal.send(b"\x81\xfe\x00\x05" + b"\x00" * 4 + b"[1,2]")
    [(opcode, payload)] = not_minimal.frames()
    assert opcode == CLOSE and wsframes.close_code(payload) == 1002


def test_frames_are_utf8_json_and_undecodable_bytes_in_an_error_become_question_marks(factory):
    connection = Connection(factory)
    [error] = connection.call("NO\u00e9PE", "\u2028")
    assert error == [
        "error",
        "ERR unknown command 'NO\u00e9PE', with args beginning with: '\u2028' ",
    ]
    # Error texts keep a client's undecodable bytes as lone surrogates.
    assert json_codec._frame(["error", "bad \udcff byte"]) == b'["error","bad ? byte"]'


def test_protocol_options_are_read_from_the_class_not_copied_into_each_connection(factory):
    connection = Connection(factory)
    copied = set(vars(connection.protocol)) & set(PubSubServerProtocol.CONFIG_ATTRS)
    assert copied == set()
    assert connection.protocol.maxMessagePayloadSize == factory.settings.max_message_size
    factory.setProtocolOptions(maxMessagePayloadSize=10)
    later = Connection(factory)
    assert later.protocol.maxMessagePayloadSize == 10
    later.send(command("PING", "x" * 20))
    [(opcode, payload)] = later.frames()
    assert opcode == CLOSE and wsframes.close_code(payload) == 1009
