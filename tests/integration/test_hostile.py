"""Hostile clients against a real server: floods, oversized and fragmented frames,
slowloris handshakes, thousands of connections from one address, junk bytes on
both ports and abrupt disconnects in the middle of frames.

After each, the server answers a fresh client, well-behaved clients have seen
every message, and what the server held for the hostile ones is released
(connections, engine clients, per-address counts; the process's memory in the
twistd test).  Waits are on events (a connection closing, a reply arriving),
never on the clock.
"""

from __future__ import annotations

import os
import re
import struct

import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests.integration.test_twistd import TWISTD, clean_environment
from tests.support import wsframes
from tests.support.processes import ServerProcess
from tests.support.wsframes import CLOSE, client_frame, close_code, command

WAIT = 60


class Raw(protocol.Protocol):
    """A client that writes what it is told and keeps every byte it receives."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()
        self._waiting: list[tuple[bytes, int, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for entry in list(self._waiting):
            marker, count, waiting = entry
            if self.received.count(marker) >= count:
                self._waiting.remove(entry)
                waiting.callback(self.received)

    def connectionLost(self, reason=None) -> None:
        for _, _, waiting in self._waiting:
            waiting.errback(ConnectionError(f"closed; received {self.received[:200]!r}"))
        self._waiting = []
        self.closed.callback(self.received)

    def until(self, marker: bytes, count: int = 1) -> defer.Deferred:
        """Fires once ``marker`` has been received ``count`` times."""
        if self.received.count(marker) >= count:
            return defer.succeed(self.received)
        waiting: defer.Deferred = defer.Deferred()
        self._waiting.append((marker, count, waiting))
        return waiting.addTimeout(WAIT, reactor)


class _RawFactory(protocol.Factory):
    protocol = Raw
    noisy = False


def raw(port: int, source: str = "127.0.0.1") -> defer.Deferred:
    """A connected :class:`Raw` client from ``source`` (any 127.x.y.z is loopback)."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30, bindAddress=(source, 0))
    return endpoint.connect(_RawFactory())


@defer.inlineCallbacks
def raw_websocket(port: int, source: str = "127.0.0.1"):
    """A raw client past the WebSocket handshake."""
    client = yield raw(port, source)
    client.transport.write(wsframes.handshake())
    yield client.until(b"\r\n\r\n")
    assert client.received.startswith(b"HTTP/1.1 101"), client.received
    client.received = b""
    return client


def gather(deferreds) -> defer.Deferred:
    """The results of ``deferreds``, in order; fails if any fails."""
    return defer.gatherResults(list(deferreds), consumeErrors=True)


def answered(clients, marker: bytes) -> defer.Deferred:
    """Fires once each client has received ``marker`` or been closed."""
    return defer.DeferredList(
        [
            defer.DeferredList(
                [c.until(marker), c.closed], fireOnOneCallback=True, consumeErrors=True
            )
            for c in clients
        ],
        consumeErrors=True,
    )


def close_frames(data: bytes) -> list[int]:
    return [
        close_code(payload) for opcode, payload in wsframes.parse_frames(data) if opcode == CLOSE
    ]


@defer.inlineCallbacks
def still_serving(server, connect):
    """The server answers a fresh client on each port and holds nothing for the
    clients that are gone."""
    fresh = yield connect(server.port)
    assert (yield fresh.call("PING", "after")) == [["pong", "after"]]
    fresh.sendClose()
    yield fresh.closed
    if server.resp_factory is not None:
        client = yield raw(server.resp_port)
        client.transport.write(b"PING\r\n")
        assert (yield client.until(b"\r\n")) == b"+PONG\r\n"
        client.transport.loseConnection()
        yield client.closed
        yield defer.DeferredList([c.lost for c in list(server.resp_factory.connections)])
    yield defer.DeferredList([c.is_closed for c in list(server.factory.connections)])
    assert server.engine.client_count == 0


def server_closes(server) -> defer.Deferred:
    """Fires once every connection the server now holds has ended on its side."""
    waiting = [c.is_closed for c in list(server.factory.connections)]
    if server.resp_factory is not None:
        waiting += [c.lost for c in list(server.resp_factory.connections)]
    return defer.DeferredList(waiting).addTimeout(WAIT, reactor)


# -- floods -------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_a_publish_flood_reaches_every_well_behaved_subscriber(make_server, connect, resp_connect):
    server = yield make_server(resp=True)
    subscribers = []
    for _ in range(2):
        subscriber = yield connect(server.port)
        yield subscriber.call("SUBSCRIBE", "news")
        subscribers.append(subscriber)
    resp_subscriber = yield resp_connect(server.resp_port)
    yield resp_subscriber.call("SUBSCRIBE", "news")
    flooder = yield raw_websocket(server.port)
    count = 5000
    # Every publish in one write: the server reads them as fast as it can.
    flooder.transport.write(b"".join(command("PUBLISH", "news", str(n)) for n in range(count)))
    for subscriber in subscribers:
        got = []
        for _ in range(count):
            got.append((yield subscriber.next_frame()))
        assert got == [["message", "news", str(n)] for n in range(count)]
    got = []
    for _ in range(count):
        got.append((yield resp_subscriber.next_value()))
    assert got == [[b"message", b"news", str(n).encode()] for n in range(count)]
    yield flooder.until(b'["reply",3]', count)
    flooder.transport.abortConnection()
    yield flooder.closed
    for subscriber in subscribers:
        subscriber.sendClose()
        yield subscriber.closed
    yield resp_subscriber.close()
    yield still_serving(server, connect)


@pytest_twisted.inlineCallbacks
def test_a_flood_past_the_publish_rate_is_refused_and_never_delivered(make_server, connect):
    server = yield make_server(publish_rate=50, publish_burst=20)
    subscriber = yield connect(server.port)
    yield subscriber.call("SUBSCRIBE", "news")
    flooder = yield connect(server.port)
    count = 500
    for n in range(count):
        flooder.send("PUBLISH", "news", str(n))
    replies = yield flooder.drain()
    delivered = [n for n, reply in enumerate(replies) if reply == ["reply", 1]]
    refused = [reply for reply in replies if reply[0] == "error"]
    assert len(replies) == count
    assert 20 <= len(delivered) < count and len(delivered) + len(refused) == count
    assert all("publish rate limit exceeded" in message for _, message in refused)
    # Exactly the accepted publishes arrive, in order; a well-behaved publisher
    # (its own bucket) is not held back by the flooder.
    polite = yield connect(server.port)
    assert (yield polite.call("PUBLISH", "news", "polite")) == [["reply", 1]]
    got = yield subscriber.drain()
    assert got == [["message", "news", str(n)] for n in delivered] + [["message", "news", "polite"]]
    assert server.factory.publish_limit.refused == len(refused)


# -- frames ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_an_oversized_frame_closes_its_sender_with_1009_only(make_server, connect):
    server = yield make_server(max_message_size=1024)
    subscriber = yield connect(server.port)
    yield subscriber.call("SUBSCRIBE", "news")
    hostile = yield raw_websocket(server.port)
    hostile.transport.write(command("PUBLISH", "news", "x" * 4096))
    assert close_frames((yield hostile.closed)) == [1009]
    # A length header claiming 2**62 bytes is refused the same way, unread.
    liar = yield raw_websocket(server.port)
    liar.transport.write(b"\x81\xff" + struct.pack("!Q", 2**62) + os.urandom(4) + b"x" * 100)
    assert close_frames((yield liar.closed)) == [1009]
    publisher = yield connect(server.port)
    assert (yield publisher.call("PUBLISH", "news", "fine")) == [["reply", 1]]
    assert (yield subscriber.drain()) == [["message", "news", "fine"]]
    subscriber.sendClose()
    publisher.sendClose()
    yield defer.DeferredList([subscriber.closed, publisher.closed])
    yield still_serving(server, connect)


def fragments(payload: bytes, size: int) -> bytes:
    """``payload`` as one text message in fragments of ``size`` bytes."""
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
    frames = [
        client_frame(piece, opcode=wsframes.TEXT if i == 0 else 0, fin=i == len(pieces) - 1)
        for i, piece in enumerate(pieces)
    ]
    return b"".join(frames)


@pytest_twisted.inlineCallbacks
def test_many_small_fragments_work_until_the_message_passes_the_limit(make_server, connect):
    server = yield make_server(max_message_size=2048)
    subscriber = yield connect(server.port)
    yield subscriber.call("SUBSCRIBE", "news")
    client = yield raw_websocket(server.port)
    message = b'["PUBLISH","news","' + b"y" * 1500 + b'"]'
    client.transport.write(fragments(message, 3))  # ~500 continuation frames
    yield client.until(b'["reply",1]')
    assert (yield subscriber.next_frame()) == ["message", "news", "y" * 1500]
    # Fragments small enough each, but adding up past the limit: 1009.
    client.transport.write(fragments(b'["PUBLISH","news","' + b"z" * 4000 + b'"]', 7))
    assert close_frames((yield client.closed)) == [1009]
    assert (yield subscriber.drain()) == []
    subscriber.sendClose()
    yield subscriber.closed
    yield still_serving(server, connect)


# -- slowloris ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_half_open_handshakes_are_dropped_after_the_handshake_timeout(make_server, connect):
    server = yield make_server(open_handshake_timeout=0.5)
    head = wsframes.handshake()
    # Some send part of a head and stop; others trickle a byte at a time,
    # which must not keep them alive past the timeout either.
    stalled = yield gather(raw(server.port) for _ in range(20))
    for client in stalled:
        client.transport.write(head[:30])
    tricklers = yield gather(raw(server.port) for _ in range(5))
    position = [0]

    def trickle():
        position[0] += 1
        for client in tricklers:
            if client.transport.connected:
                client.transport.write(head[position[0] - 1 : position[0]])

    trickling = task.LoopingCall(trickle)
    trickling.start(0.05)
    try:
        yield defer.DeferredList([c.closed for c in stalled + tricklers]).addTimeout(WAIT, reactor)
    finally:
        trickling.stop()
    assert position[0] < len(head)  # they were cut off before finishing
    assert all(client.received == b"" for client in stalled + tricklers)
    yield still_serving(server, connect)


# -- many connections from one address -------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_thousands_of_connections_from_one_address_are_refused_cleanly(make_server, connect):
    limit, count = 300, 2000
    server = yield make_server(resp=True, max_connections_per_ip=limit)
    subscriber = yield connect(server.port)  # one of the 300 on the WebSocket port
    yield subscriber.call("SUBSCRIBE", "news")
    websocket, resp = [], []
    # In batches within the listen backlog (50), each answered before the
    # next: past the backlog the kernel, not the server, holds connections back.
    for _ in range(count // 40):
        batch = yield gather(raw(server.port) for _ in range(40))
        for client in batch:
            client.transport.write(wsframes.handshake())
        yield answered(batch, b"\r\n\r\n")
        websocket += batch
        batch = yield gather(raw(server.resp_port) for _ in range(40))
        for client in batch:
            client.transport.write(b"PING\r\n")
        yield answered(batch, b"\r\n")
        resp += batch
    # A refused client that wrote before it read may see a reset instead of
    # the answer (the server closes without reading), so: refused = the rest.
    answers = [client.received.split(b"\r\n", 1)[0] for client in websocket]
    assert answers.count(b"HTTP/1.1 101 Switching Protocols") == limit - 1  # + the subscriber
    assert set(answers) - {b"HTTP/1.1 101 Switching Protocols"} <= {
        b"HTTP/1.1 503 Service Unavailable",
        b"",
    }
    assert answers.count(b"HTTP/1.1 503 Service Unavailable") > (count - limit) / 2
    answers = [client.received for client in resp]
    assert answers.count(b"+PONG\r\n") == limit
    assert set(answers) - {b"+PONG\r\n"} <= {
        b"-ERR max number of clients reached for this address\r\n",
        b"",
    }
    assert server.factory.peers.refused == count - limit + 1
    assert server.resp_factory.peers.refused == count - limit
    clients = websocket + resp
    # Another address is served meanwhile, and so is the subscriber.
    other = yield raw(server.port, source="127.0.0.2")
    other.transport.write(wsframes.handshake() + command("PUBLISH", "news", "still here"))
    yield other.until(b'["reply",1]')
    assert (yield subscriber.next_frame()) == ["message", "news", "still here"]
    for client in clients + [other]:
        client.transport.abortConnection()
    yield defer.DeferredList([c.closed for c in clients + [other]])
    subscriber.sendClose()
    yield subscriber.closed
    yield server_closes(server)
    yield still_serving(server, connect)  # from 127.0.0.1 again: the slots came back
    assert server.factory.peers.open_from("127.0.0.1") == 0
    assert server.resp_factory.peers.open_from("127.0.0.1") == 0


# -- junk ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_junk_bytes_on_both_ports_cost_only_their_sender(make_server, connect):
    server = yield make_server(resp=True, open_handshake_timeout=2)
    subscriber = yield connect(server.port)
    yield subscriber.call("SUBSCRIBE", "news")
    junk = os.urandom(64 * 1024)
    http = yield raw(server.port)
    http.transport.write(junk)  # no request line at all
    framed = yield raw_websocket(server.port)
    framed.transport.write(b"\x00\x01" + junk)  # after the handshake: not a frame
    crlf = yield raw(server.port)
    crlf.transport.write(b"\r\n" * 20_000)
    resp = yield raw(server.resp_port)
    resp.transport.write(b"*" + junk)
    resp_inline = yield raw(server.resp_port)
    resp_inline.transport.write(junk.replace(b"\n", b"") * 2)  # one line past 64 KiB
    results = yield defer.DeferredList(
        [c.closed for c in (http, framed, crlf, resp, resp_inline)]
    ).addTimeout(WAIT, reactor)
    http_answer = results[0][1]
    assert http_answer == b"" or http_answer.startswith(b"HTTP/1.1 400"), http_answer[:100]
    assert close_frames(results[1][1]) == [1002]
    assert results[3][1].startswith(b"-ERR Protocol error")
    assert results[4][1] == b"-ERR Protocol error: too big inline request\r\n"
    publisher = yield connect(server.port)
    assert (yield publisher.call("PUBLISH", "news", "after junk")) == [["reply", 1]]
    assert (yield subscriber.drain()) == [["message", "news", "after junk"]]
    for client in (subscriber, publisher):
        client.sendClose()
        yield client.closed
    yield still_serving(server, connect)


# -- abrupt disconnects ------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_abrupt_disconnects_in_the_middle_of_frames_leave_nothing_behind(make_server, connect):
    server = yield make_server(resp=True)
    subscriber = yield connect(server.port)
    yield subscriber.call("SUBSCRIBE", "news")
    publisher = yield connect(server.port)
    frame = command("SUBSCRIBE", "news", "x" * 200)
    resp_request = b"*3\r\n$9\r\nSUBSCRIBE\r\n$4\r\nnews\r\n$300\r\nabc"
    rounds = 10
    for n in range(rounds):
        doomed = yield gather(raw_websocket(server.port) for _ in range(10))
        halves = yield gather(raw(server.port) for _ in range(5))
        resps = yield gather(raw(server.resp_port) for _ in range(10))
        for i, client in enumerate(doomed):
            client.transport.write(frame * i + frame[: 7 + 13 * i])
        for i, client in enumerate(halves):
            client.transport.write(wsframes.handshake()[: 20 + 30 * i])
        for i, client in enumerate(resps):
            client.transport.write(b"SUBSCRIBE news\r\n" * i + resp_request[: 5 + 3 * i])
        # Traffic for the subscribers while they vanish.
        assert (yield publisher.call("PUBLISH", "news", str(n))) != []
        for client in doomed + halves + resps:
            client.transport.abortConnection()
        yield defer.DeferredList([c.closed for c in doomed + halves + resps])
    got = yield subscriber.drain()
    assert got == [["message", "news", str(n)] for n in range(rounds)]
    for client in (subscriber, publisher):
        client.sendClose()
        yield client.closed
    yield server_closes(server)
    yield still_serving(server, connect)
    assert server.engine.numsub([b"news"]) == [(b"news", 0)]


# -- a real process: memory ----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1))


@pytest_twisted.inlineCallbacks
def test_the_server_process_memory_stays_bounded_under_a_flood(tmp_path, connect):
    process = ServerProcess(rb"Site starting on (\d+)")
    args = [TWISTD, "-n", "--pidfile=", "pubsub", "--port", "tcp:0:interface=127.0.0.1"]
    transport = reactor.spawnProcess(
        process, TWISTD, args, env=clean_environment(), path=str(tmp_path)
    )
    try:
        port = yield process.listening.addTimeout(30, reactor)
        # Warm up: the code paths run once before the first reading.
        warm = yield connect(port)
        yield warm.call("PUBLISH", "news", "x" * 60_000)
        before = rss_kib(transport.pid)
        # A subscriber that never reads, and 120 MB published to it: the output
        # buffer limit (8 MiB) cuts it off instead of the server holding it all.
        stalled = yield raw_websocket(port)
        stalled.transport.write(command("SUBSCRIBE", "news"))
        yield stalled.until(b'"subscribe"')
        stalled.transport.pauseProducing()
        publisher = yield raw_websocket(port)
        publish = command("PUBLISH", "news", "x" * 60_000)
        for round in range(1, 21):
            publisher.transport.write(publish * 100)
            # Every reply back before the next round: the server keeps up.
            yield publisher.until(b'"reply"', 100 * round)
        peak = rss_kib(transport.pid)
        assert peak - before < 80 * 1024, (before, peak)
        stalled.transport.resumeProducing()
        yield stalled.closed
        assert (yield warm.call("PING")) == [["pong", ""]]
    finally:
        if not process.ended.called:
            transport.signalProcess("TERM")
    assert (yield process.ended.addTimeout(30, reactor)) == 0
    assert b"output buffer over its hard limit" in process.output
