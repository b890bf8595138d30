"""Fixtures shared by every suite: an in-process server on a free loopback port,
and clients for it: WebSocket (``connect``), RESP (``resp_connect``), redis-cli."""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.web.server import Site

from pubsub.config import Settings
from pubsub.engine import Engine
from pubsub.resp import RespFactory
from pubsub.service import build_resource
from tests.support import wsclient


class RunningServer:
    """A pub/sub site listening on 127.0.0.1:<port>, built as make_service builds it.

    With ``resp=True`` a RESP port (``resp_port``) shares the engine, the
    settings and /healthz with the WebSocket port, as ``make_service`` does
    when ``resp_port`` is set.
    """

    def __init__(self, settings: Settings, resp: bool = False) -> None:
        self.settings = settings
        self.engine = Engine()
        self.resource = build_resource(self.engine, settings)
        self.factory = self.resource.factory
        self.listening = None
        self.resp_factory: RespFactory | None = None
        self.resp_listening = None
        if resp:
            self.resp_factory = RespFactory(self.engine, settings, reactor)
            self.resource.health.factories.append(self.resp_factory)

    @property
    def port(self) -> int:
        return self.listening.getHost().port

    @property
    def resp_port(self) -> int:
        return self.resp_listening.getHost().port

    @defer.inlineCallbacks
    def start(self):
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self.listening = yield endpoint.listen(Site(self.resource))
        if self.resp_factory is not None:
            endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
            self.resp_listening = yield endpoint.listen(self.resp_factory)

    @defer.inlineCallbacks
    def stop(self):
        yield self.listening.stopListening()
        if self.resp_listening is not None:
            yield self.resp_listening.stopListening()
            # Whatever a test left open (a stalled reader too) goes at once.
            connections = list(self.resp_factory.connections)
            for connection in connections:
                connection.transport.abortConnection()
            yield defer.DeferredList([connection.lost for connection in connections])


@pytest.fixture
def make_server():
    """Start servers with chosen settings (``resp=True``: a RESP port too);
    every one stops after the test."""
    servers = []

    @defer.inlineCallbacks
    def start(resp=False, **settings):
        server = RunningServer(Settings(**settings), resp=resp)
        yield server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        pytest_twisted.blockon(server.stop())


@pytest.fixture
def server(make_server):
    """One server with default settings."""
    return pytest_twisted.blockon(make_server())


@pytest.fixture
def resp_server(make_server):
    """One server with default settings and a RESP port on the same engine."""
    return pytest_twisted.blockon(make_server(resp=True))


@pytest.fixture
def connect():
    """wsclient.connect, with every client it opened dropped after the test."""
    clients = []

    def open_client(port, *args, **kwargs):
        d = wsclient.connect(port, *args, **kwargs)
        d.addCallback(lambda client: clients.append(client) or client)
        return d

    yield open_client
    for client in clients:
        if client.close_info is None:
            client.dropConnection(abort=True)
            pytest_twisted.blockon(client.closed)


# -- a RESP client on the reactor ---------------------------------------------------------


class Status(str):
    """A RESP simple string (``+OK``); bulk strings arrive as bytes."""


class Verbatim(bytes):
    """A RESP3 verbatim string (``=``), without its ``txt:`` format prefix."""


class Push(list):
    """A RESP3 push (``>``).  It compares equal to a list with the same items,
    so tests that care check ``type(value) is Push``."""


@dataclass(frozen=True)
class Err:
    """A RESP error reply (``-`` or ``!``)."""

    message: str


#: Put in a client's queue once the connection has closed.
CLOSED = object()


class _Incomplete(Exception):
    pass


def _line(buffer: bytearray, position: int) -> tuple[bytes, int]:
    end = buffer.find(b"\r\n", position)
    if end < 0:
        raise _Incomplete
    return bytes(buffer[position:end]), end + 2


def parse_resp(buffer: bytearray, position: int = 0) -> tuple[Any, int]:
    """One RESP2/RESP3 value from ``buffer`` at ``position``, and where it ends.

    Raises _Incomplete when the buffer does not hold all of it yet.
    """
    line, position = _line(buffer, position)
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return Status(rest.decode("utf-8", "surrogateescape")), position
    if kind == b"-":
        return Err(rest.decode("utf-8", "surrogateescape")), position
    if kind in (b":", b"("):
        return int(rest), position
    if kind in (b"$", b"=", b"!"):
        size = int(rest)
        if size < 0:
            return None, position
        if len(buffer) < position + size + 2:
            raise _Incomplete
        data = bytes(buffer[position : position + size])
        if buffer[position + size : position + size + 2] != b"\r\n":
            raise ValueError(f"bulk string of {size} bytes not followed by CRLF")
        position += size + 2
        if kind == b"=":
            return Verbatim(data[4:]), position
        if kind == b"!":
            return Err(data.decode("utf-8", "surrogateescape")), position
        return data, position
    if kind == b"_":
        return None, position
    if kind == b"#":
        return rest == b"t", position
    if kind == b",":
        return float(rest), position
    if kind in (b"*", b">", b"~", b"%"):
        size = int(rest)
        if size < 0:
            return None, position
        items = []
        for _ in range(size * 2 if kind == b"%" else size):
            item, position = parse_resp(buffer, position)
            items.append(item)
        if kind == b"%":
            return dict(zip(items[::2], items[1::2], strict=True)), position
        return (Push(items) if kind == b">" else items), position
    raise ValueError(f"not a RESP value: {line!r}")


def _argument(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return b"%d" % value
    return value.encode("utf-8")


def resp_command(*args: Any) -> bytes:
    """A request as every client library sends it: a multibulk of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in map(_argument, args):
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


_markers = itertools.count(1)


class RespClient(protocol.Protocol):
    """A Twisted RESP client for tests: every value received goes, parsed, into
    ``values`` (then :data:`CLOSED` once the connection ends).

    :meth:`call` sends a command and collects everything up to a PING marker,
    so a test sees exactly what that command produced.
    """

    def __init__(self) -> None:
        self.values: defer.DeferredQueue = defer.DeferredQueue()
        self.closed: defer.Deferred = defer.Deferred()
        self._buffer = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        position = 0
        while True:
            try:
                value, position = parse_resp(self._buffer, position)
            except _Incomplete:
                break
            self.values.put(value)
        del self._buffer[:position]

    def connectionLost(self, reason: Any = None) -> None:
        self.values.put(CLOSED)
        # Fires with why (ConnectionDone, ConnectionLost, ...), as a value.
        self.closed.callback(getattr(reason, "value", reason))

    def send(self, *args: Any) -> None:
        self.transport.write(resp_command(*args))

    def write(self, data: bytes) -> None:
        """Raw bytes, exactly as given."""
        self.transport.write(data)

    def next_value(self) -> defer.Deferred:
        return self.values.get()

    @defer.inlineCallbacks
    def drain(self):
        """Every value received and not yet read, up to a fresh PING marker."""
        marker = b"#sync-%d" % next(_markers)
        self.send("PING", marker)
        values = []
        while True:
            value = yield self.next_value()
            if value is CLOSED:
                raise ConnectionError(f"connection closed; received before that: {values!r}")
            # PING's answer is the marker, or ["pong", marker] in RESP2 subscribed mode.
            if value == marker or value == [b"pong", marker]:
                return values
            values.append(value)

    def call(self, *args: Any) -> defer.Deferred:
        """Send one command; fires with the values it produced."""
        self.send(*args)
        return self.drain()

    def abort(self) -> None:
        self.transport.abortConnection()


class _RespClientFactory(protocol.Factory):
    protocol = RespClient
    noisy = False


@pytest.fixture
def resp_connect():
    """Open a RespClient to 127.0.0.1:port; every one is dropped after the test."""
    clients = []

    @defer.inlineCallbacks
    def open_client(port, protocol_version=2):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
        client = yield endpoint.connect(_RespClientFactory())
        clients.append(client)
        if protocol_version == 3:
            [hello] = yield client.call("HELLO", "3")
            assert hello[b"proto"] == 3, hello
        return client

    yield open_client
    for client in clients:
        if not client.closed.called:
            client.abort()
            pytest_twisted.blockon(client.closed)


# -- redis-cli ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cli() -> str:
    """The path of redis-cli; a skip (a failure under PUBSUB_REQUIRE_REDIS) without it."""
    binary = shutil.which("redis-cli")
    if binary is None:
        message = "redis-cli is not installed (Debian: apt-get install redis-tools)"
        if os.environ.get("PUBSUB_REQUIRE_REDIS"):
            pytest.fail(message)
        pytest.skip(message)
    return binary
