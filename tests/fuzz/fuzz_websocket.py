#!/usr/bin/env python3
"""Fuzz the WebSocket reader: what a client sends after (or as) its opening handshake.

Each input opens one fresh connection through the port's front door
(``pubsub.web.front.FrontFactory``), as the unit tests do, on a StringTransport
with every timer on a ``Clock``: a pub/sub connection (``PubSubServerProtocol``)
or an echo connection (``EchoServerProtocol``, the conformance suite's
target), under one of two sets of settings (the defaults; compression on
with small limits). The rest of the input is fed with ``dataReceived`` in
chunks split where the fuzzer chooses, with the clock moved between them.

The contract held here: anything Autobahn does with bad input (a close
frame, dropping the connection) is fine. A crash is an exception escaping
``dataReceived`` (or ``connectionLost``, or a timer), or any log event
carrying a failure (the server logs "internal fault ..." with
``_log.failure`` when it catches a bug of its own), a connection that
is still registered with the engine after it was lost, or a frame sent after
the server's close frame.

Input layout (see ``_Input``): a mode byte (settings, endpoint, handshake),
a count of cuts, per cut two bytes of offset (little-endian) and one of clock
advance in seconds (64 and over: none),
then the bytes the client sends. With the "raw" handshake the client's
bytes include its HTTP request head.

Run: ``python tests/fuzz/fuzz_websocket.py [libFuzzer options] CORPUS_DIR``
(``make fuzz`` runs it on a copy of tests/fuzz/corpus/websocket);
``python tests/fuzz/fuzz_websocket.py --write-seeds DIR`` writes the seeds.
The corpus keeps the inputs of what it found so far (a reply sent, or
refused by Autobahn, after the server's own close frame), as regression seeds.
"""

from __future__ import annotations

import base64
import importlib
import json
import struct
import sys
import zlib
from pathlib import Path

_UNINSTRUMENTED = (
    "autobahn.wamp.message",
    "autobahn.wamp.protocol",
    "autobahn.rawsocket.util",
    "automat",
    "cbor2",
    "cffi",
    "cryptography.x509",
    "hiredis",
    "importlib.metadata",
    "jwt",
    "OpenSSL",
    "prometheus_client",
    "pycparser",
    "sortedcontainers",
    "tomllib",
    "twisted.application.internet",
    "twisted.application.strports",
    "twisted.internet.endpoints",
    "twisted.python.logfile",
    "twisted.python.usage",
    "twisted.trial.unittest",
    "twisted.web.server",
    "twisted.web.template",
    "txaio",
)

import atheris

# What the reader does not reach (or only through the code under test) is
# imported uninstrumented: instrumenting all of it takes a minute.
for _name in _UNINSTRUMENTED:
    importlib.import_module(_name)

with atheris.instrument_imports():
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.logger import globalLogPublisher
    from twisted.python.failure import Failure
    from twisted.web.server import Site

    from pubsub.core.engine import Engine
    from pubsub.operations.config import Settings
    from pubsub.web.front import FrontFactory
    from pubsub.web.site import PubSubResource
    from pubsub.websocket.protocol import EchoServerFactory, PubSubServerFactory

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
KEY = base64.b64encode(b"0123456789abcdef").decode("ascii")

#: The settings of the two front doors.
SETTINGS = [
    Settings(echo_endpoint=True),
    Settings(
        echo_endpoint=True,
        compression=True,
        compression_min_size=0,
        max_message_size=4096,
        max_subscriptions=4,
        max_name_length=64,
        publish_rate=5.0,
        idle_timeout=20.0,
        ping_interval=10.0,
        ping_timeout=5.0,
        open_handshake_timeout=5.0,
    ),
]
PATHS = ["/", "/echo"]
#: Handshakes: the lean path, a subprotocol, a deflate offer (Autobahn's
#: path; compression where it is on), and None: the input holds the head.
HEADS: list[str | None] = [
    "",
    "Sec-WebSocket-Protocol: pubsub.json\r\n",
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    None,
]
MAX_CUTS = 8


def handshake(path: str, extra: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode("ascii")


class Transport(StringTransport):
    """StringTransport, tolerant of Autobahn unregistering a producer it never set."""

    def unregisterProducer(self) -> None:
        self.producer = None


class Fault(Exception):
    """What the server logged as a failure, raised where libFuzzer sees it."""


_failures: list[dict] = []


def _observe(event: dict) -> None:
    if event.get("log_failure") is not None:
        _failures.append(event)


globalLogPublisher.addObserver(_observe)

_clock = Clock()


def _front(settings: Settings) -> FrontFactory:
    factory = PubSubServerFactory(Engine(), settings, reactor=_clock)
    resource = PubSubResource(factory, _clock)
    # The echo factory the resource makes runs on the global reactor; this
    # one is the same but for its clock, so no timer outlives an input.
    resource.echo_factory = EchoServerFactory(settings, reactor=_clock)
    site = Site(resource, timeout=settings.open_handshake_timeout, reactor=_clock)
    return FrontFactory(site, _clock)


FRONTS = [_front(settings) for settings in SETTINGS]


def _mode(byte: int) -> tuple[int, int, int]:
    """The front, path and handshake a mode byte selects."""
    return byte % 2, (byte >> 1) % 2, (byte >> 2) % len(HEADS)


def _server_frames(output: bytes) -> list[int]:
    """The opcodes of the frames the server wrote after its 101 response."""
    head, _, data = output.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        return []
    opcodes = []
    while len(data) >= 2:
        size, offset = data[1] & 0x7F, 2
        if size == 126:
            (size,), offset = struct.unpack("!H", data[2:4]), 4
        elif size == 127:
            (size,), offset = struct.unpack("!Q", data[2:10]), 10
        opcodes.append(data[0] & 0x0F)
        data = data[offset + size :]
    return opcodes


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    front_index, path_index, head_index = _mode(provider.ConsumeUInt(1))
    cuts = []
    for _ in range(provider.ConsumeUInt(1) % (MAX_CUTS + 1)):
        cuts.append((provider.ConsumeUInt(2), provider.ConsumeUInt(1)))
    body = provider.ConsumeBytes(provider.remaining_bytes())
    front = FRONTS[front_index]
    extra = HEADS[head_index]
    if extra is not None:
        body = handshake(PATHS[path_index], extra) + body
    points = sorted({(offset % (len(body) + 1), delay) for offset, delay in cuts})
    _failures.clear()

    transport = Transport()
    protocol = front.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport.protocol = protocol
    protocol.makeConnection(transport)
    start = 0
    for offset, delay in [*points, (len(body), 0)]:
        if transport.disconnecting:
            break  # a real transport stops reading once it is closing
        if offset > start:
            transport.protocol.dataReceived(body[start:offset])
            start = offset
        # Most cuts are one reactor turn apart; a few let timers fire.
        _clock.advance(delay if delay < 64 else 0)
    _clock.advance(0)
    transport.protocol.connectionLost(Failure(ConnectionDone()))
    # Every timer left fires now: none may fail, nor outlive the connection.
    while _clock.getDelayedCalls():
        _clock.advance(max(call.getTime() for call in _clock.getDelayedCalls()) - _clock.seconds())
    failures = list(_failures)
    _failures.clear()
    if failures:
        event = failures[0]
        print(f"logged failure: {event.get('log_format')!r}", file=sys.stderr)
        raise Fault(event["log_failure"].getTraceback())
    factory = front.resource.factory
    if factory.engine.client_count or factory.connections or front.heads:
        raise AssertionError(
            "a lost connection left state behind: "
            f"{factory.engine.client_count} clients, {len(factory.connections)} connections, "
            f"{len(front.heads or ())} heads"
        )
    opcodes = _server_frames(transport.value())
    if CLOSE in opcodes:
        after = opcodes[opcodes.index(CLOSE) + 1 :]
        if after:
            raise AssertionError(f"frames sent after the server's close frame: {opcodes}")


def frame(payload: bytes, opcode: int = TEXT, fin: bool = True, rsv: int = 0) -> bytes:
    """A client frame with the zero mask, so the fuzzer sees its payload as is."""
    header = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    size = len(payload)
    if size < 126:
        header += bytes([0x80 | size])
    elif size < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return header + b"\0\0\0\0" + payload


def command(*args: object) -> bytes:
    return frame(json.dumps(list(args)).encode("utf-8"))


def deflated(payload: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return frame(data[:-4], rsv=4)


def seed(mode: int, body: bytes, cuts: tuple[tuple[int, int], ...] = ()) -> bytes:
    """An input in this harness's layout (ConsumeUInt reads from the front, little-endian)."""
    head = bytes([mode, len(cuts)])
    for offset, delay in cuts:
        head += struct.pack("<HB", offset, delay)
    return head + body


def seeds() -> dict[str, bytes]:
    session = (
        command("SUBSCRIBE", "news")
        + command("PSUBSCRIBE", "n*")
        + command("PUBLISH", "news", "hi")
        + command("PUBLISH", "news", {"base64": "AAEC"})
        + command("PING")
        + command("PUBSUB", "NUMSUB", "news")
        + command("UNSUBSCRIBE")
    )
    bad = (
        frame(b"{not json")
        + frame(b"[]")
        + frame(b'["PUBLISH", "ch", 5]')
        + frame(b"\xff\xfe")
        + frame(b"ping", PING)
        + frame(b"x", BINARY)
    )
    fragmented = (
        frame(b'["PUB', fin=False)
        + frame(b"x", PING)
        + frame(b'LISH","a",', CONT, fin=False)
        + frame(b'"b"]', CONT)
    )
    close = frame(struct.pack("!H", 1000) + b"bye", CLOSE)
    seeds = {
        "session": seed(0, session),
        "session-split": seed(0, session, ((3, 0), (17, 0), (40, 70))),
        "subprotocol": seed(4, command("PING", "x") + close),
        "bad": seed(0, bad),
        "bad-compressing-front": seed(1, bad),
        "fragmented": seed(0, fragmented, ((5, 0),)),
        "close": seed(0, close),
        "long": seed(0, command("PUBLISH", "c", "x" * 300)),
        "too-big": seed(1, command("PUBLISH", "c", "x" * 5000)),
        "deflate": seed(9, deflated(b'["SUBSCRIBE","news"]') + deflated(b'["PING"]')),
        "echo": seed(2, frame(b"hello") + frame(b"\x00\x01", BINARY) + close),
        "echo-deflate": seed(11, deflated(b"hello" * 50) + fragmented),
        "timers": seed(1, command("PING"), ((0, 30), (0, 50))),
        "raw": seed(12, handshake("/?token=x", "Origin: http://127.0.0.1:9000\r\n") + bad),
        "raw-echo": seed(14, handshake("/echo", "") + frame(b"hi")),
        "raw-http": seed(12, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        "raw-bad-version": seed(
            12, handshake("/", "").replace(b"Version: 13", b"Version: 8") + frame(b"[]")
        ),
    }
    return seeds


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (directory / name).write_bytes(data)


def main() -> None:
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
