"""Server-side Python cost of one WebSocket connect, in-process, without a client.

The idle scenario's connects/s depends on the load generator and the kernel as
much as on the server; this measures only what the server's own code spends to
open a connection the way the front door does and answer its SUBSCRIBE: the
front's head reading, the handshake, ``onOpen``, the command, the reply's
send() and the reactor turn that ends it. Twisted's accept (``Port.doRead``)
and the epoll loop are not in it. Then every connection is lost at once and
the cost of a close is reported too.

Each connection has a real socket (one end of a ``socketpair``) so the two
send() calls are real; the reactor's timers are real too (``runUntilCurrent``
runs the end-of-turn flush).

    .venv/bin/python bench/connect_cost.py             # min and median of 15 batches of 1,000
    .venv/bin/python bench/connect_cost.py --profile   # and where the time goes (cProfile)
    .venv/bin/python bench/connect_cost.py --trickle 60000   # instead: one frame a byte per read
    .venv/bin/python bench/connect_cost.py --trickle 60000 --autobahn   # read by Autobahn's reader
    .venv/bin/python bench/connect_cost.py --publishes 5000   # instead: PUBLISH to 10 subscribers
    .venv/bin/python bench/connect_cost.py --policies   # any of these, with every built-in policy on
    .venv/bin/python bench/connect_cost.py --publishes 5000 --history   # the channel keeps a history

With ``--trickle N`` it opens one connection instead and feeds it one masked
PUBLISH text frame with an N-byte payload, one byte per ``dataReceived``, as
the hostile scenario's trickle does over a socket, and reports the CPU per
read. With ``--publishes N`` it opens ten subscribers of one channel and a
publisher, sends N PUBLISH frames one read each, and reports the CPU per
publish: its command, its reply and its ten deliveries, each turn's writes
included.

With ``--policies`` the server runs with every built-in policy on (tokens
required, an origin allow-list, a publish rate and a per-address limit, none
of them reached) and each client connects with a token in its URL and an
allowed ``Origin``: what those policies cost on the way. With ``--history``
the channels keep a history (``history_channels``) and the subscribers
RESUME instead of SUBSCRIBE, so each delivery carries its position: what
recovery costs a publish.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import os
import pstats
import resource
import socket
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# This checkout's pubsub, not the copy installed in the venv.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from pubsub.core.engine import Engine
from pubsub.operations.config import Settings
from pubsub.operations.service import make_service, tune_collector

_CLIENT = IPv4Address("TCP", "127.0.0.1", 50000)
_SERVER = IPv4Address("TCP", "127.0.0.1", 9000)

#: With --policies: the server's secret, and what each client's head adds.
_SECRET = "connect-cost-benchmark-secret-of-32-bytes"
_POLICIES = {
    "jwt_secret": _SECRET,
    "allowed_origins": "https://app.example",
    "publish_rate": 1e9,
    "max_connections_per_ip": 1_000_000,
}
_query = b""
_origin = b""


class _Transport:
    """The parts of Twisted's TCP ``Server`` transport a connect touches, on a real socket."""

    connected = 1
    disconnecting = False
    dataBuffer = b""
    offset = 0
    producer = None

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self._tempDataBuffer: list[bytes] = []  # as Twisted's FileDescriptor sets it
        self.protocol: Any = None

    def getPeer(self) -> IPv4Address:
        return _CLIENT

    def getHost(self) -> IPv4Address:
        return _SERVER

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        raise AssertionError("the benchmark's socket never fills")

    writeSequence = write

    def loseConnection(self) -> None:
        self.disconnecting = True

    abortConnection = loseConnection


#: SUBSCRIBE, or with --history RESUME (one channel at a time, positions on).
_subscribe = b"SUBSCRIBE"


def _subscribe_frame(channel: str) -> bytes:
    return _command_frame(b'["%s","%s"]' % (_subscribe, channel.encode()))


def _command_frame(payload: bytes) -> bytes:
    """A masked client text frame carrying ``payload`` (under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def _head() -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET /%s HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nUpgrade: websocket\r\n%s"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (_query, _origin, key)
    )


def batch(front: Any, n: int, start: int) -> tuple[float, list[Any]]:
    """Open ``n`` connections; the CPU seconds their server side took."""
    pairs = [socket.socketpair() for _ in range(n)]
    for ours, _ in pairs:
        ours.setblocking(False)
    heads = [_head() for _ in range(n)]
    frames = [_subscribe_frame(f"idle.{start + i}") for i in range(n)]
    opened = []
    t0 = time.process_time()
    for i in range(n):
        transport = _Transport(pairs[i][0])
        protocol = front.buildProtocol(_CLIENT)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        transport.protocol.dataReceived(heads[i])
        transport.protocol.dataReceived(frames[i])
        reactor.runUntilCurrent()
        opened.append(transport)
    elapsed = time.process_time() - t0
    for _, theirs in pairs:
        answer = theirs.recv(4096)
        if not answer.startswith(b"HTTP/1.1 101 ") or b'["subscribe",' not in answer:
            raise SystemExit(f"unexpected answer: {answer!r}")
    for pair in pairs:  # the connections stay open in the engine; the sockets can go
        for sock in pair:
            sock.close()
    return elapsed, opened


def trickle(front: Any, size: int, autobahn: bool = False) -> None:
    """Feed one connection a PUBLISH frame of ``size`` payload bytes a byte per
    read: to the lean reader, or with ``autobahn`` to Autobahn's (its length
    in 64 bits, an encoding only Autobahn's reader judges)."""
    _, [transport] = batch(front, 1, 0)
    # batch() closed the client's socket: what the server answers goes nowhere.
    transport.write = transport.writeSequence = lambda data: None
    payload = b'["PUBLISH","c","%s"]' % (b"x" * size)
    if len(payload) > 0xFFFF:
        raise SystemExit("--trickle takes at most 65,000 bytes: one frame the lean reader reads")
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    # The 16-bit length of a frame under 64 KiB, as clients send it (and as
    # the lean reader takes it; Autobahn judges any other encoding).
    if autobahn:
        header = b"\x81\xff" + len(payload).to_bytes(8, "big")
    else:
        header = b"\x81\xfe" + len(payload).to_bytes(2, "big")
    frame = header + mask + masked
    reads = [frame[i : i + 1] for i in range(len(frame))]
    t0 = time.process_time()
    for data in reads:
        transport.protocol.dataReceived(data)
    elapsed = time.process_time() - t0
    print(f"server Python per 1-byte read: {elapsed / len(reads) * 1e6:.2f} us")


def _subscribers(front: Any, n: int, channel: str) -> list[tuple[_Transport, socket.socket]]:
    """``n`` open connections subscribed to ``channel``, each with the client's socket."""
    opened = []
    for _ in range(n):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        transport = _Transport(ours)
        transport.protocol = front.buildProtocol(_CLIENT)
        transport.protocol.makeConnection(transport)
        transport.protocol.dataReceived(_head())
        transport.protocol.dataReceived(_subscribe_frame(channel))
        reactor.runUntilCurrent()
        theirs.recv(65536)
        opened.append((transport, theirs))
    return opened


def publishes(front: Any, n: int) -> None:
    """Send ``n`` PUBLISH frames from one connection to a channel ten others hold;
    each client's socket is read after each, so no send() ever waits."""
    subscribers = _subscribers(front, 10, "news")
    [(publisher, answers)] = _subscribers(front, 1, "replies")
    frame = _command_frame(b'["PUBLISH","news","hello"]')
    sockets = [answers] + [theirs for _, theirs in subscribers]
    t0 = time.process_time()
    for _ in range(n):
        publisher.protocol.dataReceived(frame)
        reactor.runUntilCurrent()
        for theirs in sockets:
            theirs.recv(65536)
    elapsed = time.process_time() - t0
    print(f"server Python per publish to 10 subscribers: {elapsed / n * 1e6:.2f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--trickle", type=int, metavar="N", help="see above")
    parser.add_argument("--autobahn", action="store_true", help="--trickle to Autobahn's reader")
    parser.add_argument("--publishes", type=int, metavar="N", help="see above")
    parser.add_argument("--policies", action="store_true", help="see above")
    parser.add_argument("--history", action="store_true", help="see above")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two sockets a connection
    settings = Settings(port="tcp:0", max_connections=100_000)
    global _query, _origin, _subscribe
    if args.history:
        settings = replace(settings, history_channels="*")
        _subscribe = b"RESUME"
    if args.policies:
        settings = replace(settings, **_POLICIES)
        claims = {"sub": "bench", "exp": time.time() + 86400, "subscribe": ["*"], "publish": ["*"]}
        _query = b"?token=" + jwt.encode(claims, _SECRET, algorithm="HS256").encode()
        _origin = b"Origin: https://app.example\r\n"
    service = make_service(settings, Engine(), reactor)
    front = next(s.factory for s in service if hasattr(s, "factory"))
    tune_collector()  # as twistd's process has it
    gc.freeze()
    if args.trickle is not None:
        trickle(front, args.trickle, args.autobahn)
        return
    if args.publishes is not None:
        publishes(front, args.publishes)
        return
    kept = []
    batch(front, 200, 10**6)  # warm-up: first-use costs
    times = []
    profiler = cProfile.Profile() if args.profile else None
    for b in range(args.batches):
        if profiler is not None and b == args.batches - 1:
            profiler.enable()
        elapsed, held = batch(front, args.size, b * args.size)
        if profiler is not None:
            profiler.disable()
        kept.append(held)
        times.append(elapsed / args.size * 1e6)
    print(
        f"server Python per connect: min {min(times):.1f} us, "
        f"median {statistics.median(times):.1f} us "
        f"(batches: {', '.join(f'{t:.1f}' for t in times)})"
    )
    # Then every client goes at once, as after a network failure.
    lost = Failure(ConnectionDone())
    t0 = time.process_time()
    closed = 0
    for held in kept:
        for transport in held:
            transport.protocol.connectionLost(lost)
            closed += 1
    reactor.runUntilCurrent()
    print(f"server Python per close: {(time.process_time() - t0) / closed * 1e6:.1f} us")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
