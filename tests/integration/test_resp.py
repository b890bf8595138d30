"""The RESP port over real sockets on 127.0.0.1: real Redis clients (redis-py's
sync and asyncio clients, redis-cli), a raw Twisted RESP client, and WebSocket
clients on the same engine.

Blocking clients never run on the reactor: redis-py's sync and asyncio clients
run in a thread (``deferToThread``), redis-cli as a child process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import time

import pytest
import pytest_twisted
import redis
import redis.asyncio
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody

from tests.support.resp3 import Push, RespError, SimpleString, Verbatim, command
from tests.support.respclient import CLOSED

#: Every byte value, in order: what "binary-safe" has to carry.
ALL_BYTES = bytes(range(256))
B64_ALL_BYTES = base64.b64encode(ALL_BYTES).decode("ascii")

#: How long any one wait in these tests may take before it counts as a failure.
WAIT = 30


def within(d: defer.Deferred, seconds: float = WAIT) -> defer.Deferred:
    """``d``, failed with TimeoutError if it has not fired after ``seconds``."""
    return d.addTimeout(seconds, reactor)


def server_side(server, client):
    """The server's RespProtocol for a RespClient of this test."""
    port = client.transport.getHost().port
    [connection] = [
        c for c in server.resp_factory.connections if c.transport.getPeer().port == port
    ]
    return connection


# -- threads for the blocking clients ------------------------------------------------------


class Signal:
    """Fired from a worker thread, waited on in the reactor."""

    def __init__(self) -> None:
        self.deferred: defer.Deferred = defer.Deferred()

    def __call__(self, value=None) -> None:
        reactor.callFromThread(self._fire, value)

    def _fire(self, value) -> None:
        if not self.deferred.called:
            self.deferred.callback(value)


def in_thread(function, *args, signal: Signal | None = None) -> defer.Deferred:
    """Run ``function`` off the reactor.  When it raises before firing ``signal``,
    the signal fails with its error, so a test waiting on the signal never hangs."""
    done = deferToThread(function, *args)
    if signal is not None:

        def ended(result):
            if not signal.deferred.called:
                if isinstance(result, Failure):
                    signal.deferred.errback(result)
                else:
                    signal.deferred.errback(AssertionError("the thread ended without signalling"))
            return result

        done.addBoth(ended)
    return done


def redis_py(port: int, protocol_version: int, **options) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        protocol=protocol_version,
        socket_timeout=WAIT,
        socket_connect_timeout=WAIT,
        **options,
    )


def next_message(pubsub, kind: str = "message") -> dict:
    """The next pub/sub message, waiting for it at most WAIT seconds."""
    get = pubsub.get_sharded_message if kind == "smessage" else pubsub.get_message
    message = get(timeout=WAIT)
    assert message is not None, f"no {kind} within {WAIT} s"
    return message


# -- redis-py, sync -------------------------------------------------------------------------


def _sync_connect(port: int, protocol_version: int):
    subscriber = redis_py(port, protocol_version)
    publisher = redis_py(port, protocol_version)
    assert subscriber.ping() is True
    assert publisher.ping() is True
    return subscriber, publisher


def _sync_scenario(subscriber: redis.Redis, publisher: redis.Redis) -> None:
    try:
        assert subscriber.echo(ALL_BYTES) == ALL_BYTES
        assert subscriber.client_setname("tester") is True
        assert subscriber.client_getname() in ("tester", b"tester")
        assert isinstance(subscriber.client_id(), int)
        assert subscriber.client_id() != publisher.client_id()

        pubsub = subscriber.pubsub()
        pubsub.subscribe("news")
        assert next_message(pubsub) == {
            "type": "subscribe",
            "pattern": None,
            "channel": b"news",
            "data": 1,
        }
        pubsub.psubscribe("n*")
        assert next_message(pubsub) == {
            "type": "psubscribe",
            "pattern": None,
            "channel": b"n*",
            "data": 2,
        }
        pubsub.ssubscribe("orders:{42}")
        assert next_message(pubsub, "smessage") == {
            "type": "ssubscribe",
            "pattern": None,
            "channel": b"orders:{42}",
            "data": 1,
        }

        # One channel subscription and one pattern: two deliveries.
        assert publisher.publish("news", ALL_BYTES) == 2
        assert next_message(pubsub) == {
            "type": "message",
            "pattern": None,
            "channel": b"news",
            "data": ALL_BYTES,
        }
        assert next_message(pubsub) == {
            "type": "pmessage",
            "pattern": b"n*",
            "channel": b"news",
            "data": ALL_BYTES,
        }
        assert publisher.spublish("orders:{42}", b"\r\n\x00") == 1
        assert next_message(pubsub, "smessage") == {
            "type": "smessage",
            "pattern": None,
            "channel": b"orders:{42}",
            "data": b"\r\n\x00",
        }

        assert publisher.pubsub_channels() == [b"news"]
        assert publisher.pubsub_numsub("news", "nobody") == [(b"news", 1), (b"nobody", 0)]
        assert publisher.pubsub_numpat() == 1
        assert publisher.pubsub_shardchannels() == [b"orders:{42}"]
        assert publisher.pubsub_shardnumsub("orders:{42}") == [(b"orders:{42}", 1)]

        pubsub.ping()
        assert next_message(pubsub) == {
            "type": "pong",
            "pattern": None,
            "channel": None,
            "data": b"",
        }
        pubsub.ping("hi")
        assert next_message(pubsub)["data"] == b"hi"

        # Many publishes in one pipeline (no MULTI: a plain pipeline).
        pipe = publisher.pipeline(transaction=False)
        for n in range(500):
            pipe.publish("news", b"%d" % n)
        assert pipe.execute() == [2] * 500
        received = [next_message(pubsub) for _ in range(1000)]
        assert [(m["type"], m["data"]) for m in received] == [
            (kind, b"%d" % n) for n in range(500) for kind in ("message", "pmessage")
        ]

        pubsub.unsubscribe()
        assert next_message(pubsub) == {
            "type": "unsubscribe",
            "pattern": None,
            "channel": b"news",
            "data": 1,
        }
        pubsub.close()
    finally:
        subscriber.close()
        publisher.close()


@pytest.mark.parametrize("protocol_version", [2, 3])
@pytest_twisted.inlineCallbacks
def test_redis_py_sync_client(resp_server, protocol_version):
    subscriber, publisher = yield in_thread(_sync_connect, resp_server.resp_port, protocol_version)
    connections = list(resp_server.resp_factory.connections)
    assert len(connections) == 2
    for connection in connections:
        # redis-py sent CLIENT SETINFO on connect; the server took both attributes.
        assert connection.lib_name == b"redis-py"
        assert connection.lib_ver == redis.__version__.encode()
        assert connection.resp3 is (protocol_version == 3)
    yield in_thread(_sync_scenario, subscriber, publisher)


def _hello_3(port: int) -> dict:
    with redis_py(port, 3) as client:
        connection = client.connection_pool.get_connection()
        try:
            return connection.handshake_metadata
        finally:
            client.connection_pool.release(connection)


@pytest_twisted.inlineCallbacks
def test_redis_py_resp3_handshake(resp_server):
    hello = yield in_thread(_hello_3, resp_server.resp_port)
    assert hello[b"proto"] == 3
    assert hello[b"version"] == b"7.0.15"
    assert hello[b"mode"] == b"standalone"
    assert hello[b"role"] == b"master"
    assert hello[b"modules"] == []


def _push_handler_scenario(port: int, signal: Signal) -> list:
    """RESP3 pushes handed to a push handler, as redis-py's RESP3 users do."""
    received = []

    def until(count: int) -> None:
        deadline = time.monotonic() + WAIT
        while len(received) < count:
            assert time.monotonic() < deadline, f"only {received!r} within {WAIT} s"
            pubsub.get_message(timeout=1)

    with redis_py(port, 3) as client:
        pubsub = client.pubsub(push_handler_func=received.append)
        pubsub.subscribe("pushes")
        until(1)  # the confirmation: now the others may publish
        signal()
        until(3)  # two messages
        pubsub.close()
    return received


@pytest_twisted.inlineCallbacks
def test_redis_py_resp3_push_handler_gets_messages_from_a_websocket(resp_server, connect):
    signal = Signal()
    done = in_thread(_push_handler_scenario, resp_server.resp_port, signal, signal=signal)
    yield within(signal.deferred)
    ws = yield connect(resp_server.port)
    assert (yield ws.call("PUBLISH", "pushes", "text")) == [["reply", 1]]
    assert (yield ws.call("PUBLISH", "pushes", {"base64": B64_ALL_BYTES})) == [["reply", 1]]
    assert (yield within(done)) == [
        [b"subscribe", b"pushes", 1],
        [b"message", b"pushes", b"text"],
        [b"message", b"pushes", ALL_BYTES],
    ]


# -- redis.asyncio --------------------------------------------------------------------------


def _asyncio_scenario(port: int, protocol_version: int, signal: Signal) -> list:
    async def main() -> list:
        client = redis.asyncio.Redis(host="127.0.0.1", port=port, protocol=protocol_version)
        publisher = redis.asyncio.Redis(host="127.0.0.1", port=port, protocol=protocol_version)
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(WAIT):
                await pubsub.subscribe("news")
                await pubsub.psubscribe("n*")
                confirmations = [await pubsub.get_message(timeout=WAIT) for _ in range(2)]
                assert [(m["type"], m["channel"], m["data"]) for m in confirmations] == [
                    ("subscribe", b"news", 1),
                    ("psubscribe", b"n*", 2),
                ]
                signal()  # others publish now: a RESP client, then a WebSocket client
                received = []
                while len(received) < 4:
                    message = await pubsub.get_message(timeout=WAIT)
                    assert message is not None, f"only {received!r}"
                    received.append(message)
                assert await publisher.publish("news", b"from asyncio") == 2
                while len(received) < 6:
                    message = await pubsub.get_message(timeout=WAIT)
                    assert message is not None, f"only {received!r}"
                    received.append(message)
                assert await publisher.pubsub_numsub("news") == [(b"news", 1)]
                return [(m["type"], m["pattern"], m["channel"], m["data"]) for m in received]
        finally:
            await pubsub.aclose()
            await client.aclose()
            await publisher.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize("protocol_version", [2, 3])
@pytest_twisted.inlineCallbacks
def test_redis_asyncio_subscriber(resp_server, resp_connect, connect, protocol_version):
    publisher = yield resp_connect(resp_server.resp_port)
    ws = yield connect(resp_server.port)
    signal = Signal()
    done = in_thread(
        _asyncio_scenario, resp_server.resp_port, protocol_version, signal, signal=signal
    )
    yield within(signal.deferred)
    assert (yield publisher.call("PUBLISH", "news", ALL_BYTES)) == [2]
    assert (yield ws.call("PUBLISH", "news", "from websocket")) == [["reply", 2]]
    assert (yield within(done)) == [
        ("message", None, b"news", ALL_BYTES),
        ("pmessage", b"n*", b"news", ALL_BYTES),
        ("message", None, b"news", b"from websocket"),
        ("pmessage", b"n*", b"news", b"from websocket"),
        ("message", None, b"news", b"from asyncio"),
        ("pmessage", b"n*", b"news", b"from asyncio"),
    ]


# -- redis-cli -------------------------------------------------------------------------------


class CliProcess(protocol.ProcessProtocol):
    """redis-cli as a child: stdin written then closed, stdout read as it comes."""

    def __init__(self, stdin: bytes = b"") -> None:
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred]] = []

    def connectionMade(self) -> None:
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for text, d in list(self._waiting):
            if text in self.out:
                self._waiting.remove((text, d))
                d.callback(self.out)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def output(self, text: bytes) -> defer.Deferred:
        """Fires with stdout so far once it holds ``text``."""
        if text in self.out:
            return defer.succeed(self.out)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((text, d))
        return within(d)

    def processEnded(self, reason) -> None:
        for text, d in self._waiting:
            d.errback(AssertionError(f"redis-cli ended before printing {text!r}: {self.out!r}"))
        self._waiting = []
        self.ended.callback(reason.value.exitCode)


def spawn_cli(redis_cli: str, port: int, *args: str, stdin: bytes = b"") -> CliProcess:
    process = CliProcess(stdin)
    # No REDISCLI_AUTH or the like from the caller's environment.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"}
    argv = [redis_cli, "-h", "127.0.0.1", "-p", str(port), *args]
    reactor.spawnProcess(process, redis_cli, argv, env=env)
    return process


@defer.inlineCallbacks
def run_cli(redis_cli: str, port: int, *args: str, stdin: bytes = b""):
    """redis-cli to completion; fires with its stdout after checking it exited 0."""
    process = spawn_cli(redis_cli, port, *args, stdin=stdin)
    code = yield within(process.ended)
    assert code == 0, (code, process.out, process.err)
    return process.out


@pytest_twisted.inlineCallbacks
def test_redis_cli_ping_and_publish(resp_server, resp_connect, redis_cli):
    port = resp_server.resp_port
    subscriber = yield resp_connect(port)
    yield subscriber.call("SUBSCRIBE", "ch")
    assert (yield run_cli(redis_cli, port, "PING")) == b"PONG\n"
    assert (yield run_cli(redis_cli, port, "PUBLISH", "ch", "msg")) == b"1\n"
    assert (yield run_cli(redis_cli, port, "--no-raw", "PUBLISH", "ch", "two")) == b"(integer) 1\n"
    assert (yield run_cli(redis_cli, port, "PUBLISH", "nobody", "x")) == b"0\n"
    assert (yield subscriber.drain()) == [[b"message", b"ch", b"msg"], [b"message", b"ch", b"two"]]


@pytest_twisted.inlineCallbacks
def test_redis_cli_raw_is_binary_safe(resp_server, resp_connect, redis_cli):
    port = resp_server.resp_port
    listener = yield resp_connect(port)
    yield listener.call("SUBSCRIBE", "bin")
    cli_subscriber = spawn_cli(redis_cli, port, "--raw", "SUBSCRIBE", "bin")
    try:
        yield cli_subscriber.output(b"subscribe\nbin\n1\n")
        # -x: the last argument is all of stdin, byte for byte.
        out = yield run_cli(redis_cli, port, "-x", "PUBLISH", "bin", stdin=ALL_BYTES)
        assert out == b"2\n"
        assert (yield within(listener.next_value())) == [b"message", b"bin", ALL_BYTES]
        expected = b"subscribe\nbin\n1\nmessage\nbin\n" + ALL_BYTES + b"\n"
        assert (yield cli_subscriber.output(expected)) == expected
    finally:
        if not cli_subscriber.ended.called:
            cli_subscriber.transport.signalProcess("TERM")
    yield within(cli_subscriber.ended)
    out = yield run_cli(redis_cli, port, "--raw", "-x", "ECHO", stdin=ALL_BYTES)
    assert out == ALL_BYTES + b"\n"


@pytest_twisted.inlineCallbacks
def test_redis_cli_resp3_hello(resp_server, redis_cli):
    out = yield run_cli(redis_cli, resp_server.resp_port, "-3", "HELLO")
    lines = out.decode().splitlines()
    assert "version 7.0.15" in lines
    assert "proto 3" in lines
    assert "mode standalone" in lines
    assert "role master" in lines
    assert any(re.fullmatch(r"id \d+", line) for line in lines), lines
    out = yield run_cli(redis_cli, resp_server.resp_port, "-3", "PING")
    assert out == b"PONG\n"


@pytest_twisted.inlineCallbacks
def test_redis_cli_subscriber_receives_then_is_terminated(
    resp_server, resp_connect, connect, redis_cli
):
    port = resp_server.resp_port
    publisher = yield resp_connect(port)
    ws = yield connect(resp_server.port)
    before = set(resp_server.resp_factory.connections)
    cli = spawn_cli(redis_cli, port, "SUBSCRIBE", "ch")
    try:
        yield cli.output(b"subscribe\nch\n1\n")
        [cli_connection] = set(resp_server.resp_factory.connections) - before
        assert (yield publisher.call("PUBLISH", "ch", "hello")) == [1]
        yield cli.output(b"message\nch\nhello\n")
        assert (yield ws.call("PUBLISH", "ch", "from the web")) == [["reply", 1]]
        out = yield cli.output(b"message\nch\nfrom the web\n")
        assert out == b"subscribe\nch\n1\nmessage\nch\nhello\nmessage\nch\nfrom the web\n"
    finally:
        if not cli.ended.called:
            cli.transport.signalProcess("TERM")
    yield within(cli.ended)
    yield within(cli_connection.lost)
    assert (yield publisher.call("PUBSUB", "NUMSUB", "ch")) == [[b"ch", 0]]
    assert (yield publisher.call("PUBLISH", "ch", "anyone?")) == [0]


@pytest_twisted.inlineCallbacks
def test_redis_cli_pipe_sends_many_inline_commands(resp_server, resp_connect, redis_cli):
    port = resp_server.resp_port
    subscriber = yield resp_connect(port)
    yield subscriber.call("SUBSCRIBE", "piped")
    commands = b"".join(b"PUBLISH piped %d\r\n" % n for n in range(1000))
    out = yield run_cli(redis_cli, port, "--pipe", stdin=commands)
    assert b"errors: 0, replies: 1000" in out, out
    received = yield subscriber.drain()
    assert received == [[b"message", b"piped", b"%d" % n] for n in range(1000)]


@pytest_twisted.inlineCallbacks
def test_redis_cli_reads_commands_from_stdin(resp_server, resp_connect, redis_cli):
    port = resp_server.resp_port
    subscriber = yield resp_connect(port)
    yield subscriber.call("SUBSCRIBE", "lines")
    stdin = b'PUBLISH lines "two words"\nPING\nECHO hello\nPUBLISH lines "\\x00\\xff"\n'
    out = yield run_cli(redis_cli, port, stdin=stdin)
    assert out == b"1\nPONG\nhello\n1\n"
    assert (yield subscriber.drain()) == [
        [b"message", b"lines", b"two words"],
        [b"message", b"lines", b"\x00\xff"],
    ]


# -- the protocol, through a raw Twisted client ---------------------------------------------


@pytest_twisted.inlineCallbacks
def test_resp2_subscribed_mode(resp_server, resp_connect):
    client = yield resp_connect(resp_server.resp_port)
    other = yield resp_connect(resp_server.resp_port)
    assert (yield client.call("PING")) == [SimpleString("PONG")]
    assert (yield client.call("SUBSCRIBE", "a", "b")) == [
        [b"subscribe", b"a", 1],
        [b"subscribe", b"b", 2],
    ]
    assert (yield client.call("PUBLISH", "a", "x")) == [
        RespError(
            "ERR Can't execute 'publish': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / "
            "QUIT / RESET are allowed in this context"
        )
    ]
    values = yield client.call("PING")
    assert values == [[b"pong", b""]] and type(values[0]) is list
    assert (yield other.call("PUBLISH", "a", "hello")) == [1]
    [message] = yield client.drain()
    assert message == [b"message", b"a", b"hello"] and type(message) is list
    assert (yield client.call("RESET")) == [SimpleString("RESET")]
    assert (yield other.call("PUBLISH", "a", "gone")) == [0]
    assert (yield client.call("ECHO", "free again")) == [b"free again"]


@pytest_twisted.inlineCallbacks
def test_resp3_pushes(resp_server, resp_connect, connect):
    client = yield resp_connect(resp_server.resp_port, protocol_version=3)
    ws = yield connect(resp_server.port)
    [confirmation] = yield client.call("SUBSCRIBE", "a")
    assert confirmation == [b"subscribe", b"a", 1] and type(confirmation) is Push
    # RESP3 lets a subscribed client run anything, its own messages come as pushes.
    [message, count] = yield client.call("PUBLISH", "a", "self")
    assert (message, count) == ([b"message", b"a", b"self"], 1)
    assert type(message) is Push
    assert (yield client.call("PING")) == [SimpleString("PONG")]
    assert (yield client.call("PUBSUB", "NUMSUB", "a")) == [[b"a", 1]]
    assert (yield client.call("CLIENT", "GETNAME")) == [None]
    assert (yield ws.call("PUBLISH", "a", "from the web")) == [["reply", 1]]
    [push] = yield client.drain()
    assert push == [b"message", b"a", b"from the web"] and type(push) is Push
    [info] = yield client.call("INFO", "server")
    assert type(info) is Verbatim and b"redis_version:7.0.15" in info


@pytest_twisted.inlineCallbacks
def test_hello_switches_protocols_both_ways(resp_server, resp_connect):
    client = yield resp_connect(resp_server.resp_port)
    [hello] = yield client.call("HELLO", "3", "SETNAME", "me")
    assert type(hello) is dict
    assert hello[b"proto"] == 3 and hello[b"server"] == b"pubsub"
    assert (yield client.call("CLIENT", "GETNAME")) == [b"me"]
    [confirmation] = yield client.call("SUBSCRIBE", "a")
    assert type(confirmation) is Push
    [hello] = yield client.call("HELLO", "2")
    assert type(hello) is list and hello[hello.index(b"proto") + 1] == 2
    values = yield client.call("UNSUBSCRIBE")
    assert values == [[b"unsubscribe", b"a", 0]] and type(values[0]) is list
    assert (yield client.call("HELLO", "4")) == [RespError("NOPROTO unsupported protocol version")]


@pytest_twisted.inlineCallbacks
def test_quit_answers_then_closes(resp_server, resp_connect):
    client = yield resp_connect(resp_server.resp_port)
    client.write(b"QUIT\r\nPING\r\n")
    assert (yield within(client.next_value())) == SimpleString("OK")
    assert (yield within(client.next_value())) is CLOSED


@pytest_twisted.inlineCallbacks
def test_inline_commands_pipelined_in_one_write(resp_server, resp_connect):
    port = resp_server.resp_port
    subscriber = yield resp_connect(port)
    yield subscriber.call("SUBSCRIBE", "inline", "two words")
    client = yield resp_connect(port)
    lines = [b"PUBLISH inline %d\r\n" % n for n in range(1000)]
    lines += [
        b'PUBLISH "two words" "tab\\there\\x00\\xff"\r\n',
        b"publish 'two words' 'it\\'s'\n",  # a bare LF ends a line too
        b"   \r\n",  # blank lines are skipped
        b"PING\r\n",
    ]
    client.write(b"".join(lines))
    values = yield client.drain()
    assert values == [1] * 1002 + [SimpleString("PONG")]
    received = yield subscriber.drain()
    assert received == [[b"message", b"inline", b"%d" % n] for n in range(1000)] + [
        [b"message", b"two words", b"tab\there\x00\xff"],
        [b"message", b"two words", b"it's"],
    ]


@pytest_twisted.inlineCallbacks
def test_multibulk_commands_pipelined_in_one_write(resp_server, resp_connect):
    port = resp_server.resp_port
    subscriber = yield resp_connect(port)
    yield subscriber.call("SUBSCRIBE", "bulk")
    client = yield resp_connect(port)
    payloads = [ALL_BYTES[n:] + b"\r\n" * (n % 3) for n in range(256)]
    client.write(b"".join(command("PUBLISH", "bulk", p) for p in payloads))
    assert (yield client.drain()) == [1] * 256
    assert (yield subscriber.drain()) == [[b"message", b"bulk", p] for p in payloads]


@pytest_twisted.inlineCallbacks
def test_inline_then_multibulk_in_one_write(resp_server, resp_connect):
    client = yield resp_connect(resp_server.resp_port)
    client.write(b"PING\r\nECHO a\r\n*2\r\n$4\r\nECHO\r\n$1\r\nb\r\n*1\r\n$4\r\nPING\r\n")
    assert (yield client.drain()) == [SimpleString("PONG"), b"a", b"b", SimpleString("PONG")]


@pytest_twisted.inlineCallbacks
def test_multibulk_then_inline_in_one_write(resp_server, resp_connect):
    # Redis picks the form of each request by its first byte, wherever it starts.
    client = yield resp_connect(resp_server.resp_port)
    client.write(b"*1\r\n$4\r\nPING\r\nECHO inline\r\n*2\r\n$4\r\nECHO\r\n$1\r\nb\r\n\r\nPING\r\n")
    assert (yield client.drain()) == [SimpleString("PONG"), b"inline", b"b", SimpleString("PONG")]


def next_read(connection) -> defer.Deferred:
    """Fires once the server-side ``connection`` has handled its next read."""
    done: defer.Deferred = defer.Deferred()

    def hooked(data: bytes) -> None:
        del connection.dataReceived  # back to the class's method
        type(connection).dataReceived(connection, data)
        done.callback(data)

    connection.dataReceived = hooked
    return within(done, 10)


@pytest_twisted.inlineCallbacks
def test_a_request_split_across_reads_anywhere(resp_server, resp_connect):
    """TCP may cut a request anywhere: each cut gives the same single PUBLISH,
    and no part of it ever runs as a command of its own."""
    port = resp_server.resp_port
    subscriber = yield resp_connect(port)
    yield subscriber.call("SUBSCRIBE", "c")
    request = command("PUBLISH", "c", "SUBSCRIBE x")
    wrong = {}
    for cut in range(1, len(request)):
        client = yield resp_connect(port)
        first = next_read(server_side(resp_server, client))
        client.write(request[:cut])
        yield first
        client.write(request[cut:])
        try:
            values = yield within(client.drain(), 5)
        except Exception as error:  # noqa: BLE001 - collected, reported below
            values = [repr(error)]
        if values != [1]:
            wrong[request[:cut]] = values
        client.abort()
    assert not wrong, "\n".join(f"cut after {k!r}: {v!r}" for k, v in wrong.items())
    assert (yield subscriber.drain()) == [[b"message", b"c", b"SUBSCRIBE x"]] * (len(request) - 1)
    asker = yield resp_connect(port)
    assert (yield asker.call("PUBSUB", "NUMSUB", "x")) == [[b"x", 0]]


@pytest.mark.parametrize("empty", [b"*0\r\n", b"*-1\r\n", b"*-5\r\n"])
@pytest_twisted.inlineCallbacks
def test_empty_multibulk_requests_are_ignored(resp_server, resp_connect, empty):
    # Redis's processMultibulkBuffer skips a multibulk length <= 0.
    client = yield resp_connect(resp_server.resp_port)
    client.write(empty + b"*1\r\n$4\r\nPING\r\n")
    assert (yield within(client.drain())) == [SimpleString("PONG")]


MALFORMED = [
    pytest.param(b"*x\r\n", "invalid multibulk length", id="multibulk-length-not-a-number"),
    pytest.param(b"*99999999999\r\n", "invalid multibulk length", id="multibulk-length-huge"),
    pytest.param(b"*1\r\n$x\r\n", "invalid bulk length", id="bulk-length-not-a-number"),
    pytest.param(b"*1\r\n$-5\r\n", "invalid bulk length", id="bulk-length-negative"),
    pytest.param(b"*1\r\n$99999999999\r\n", "invalid bulk length", id="bulk-length-over-512mb"),
    pytest.param(b"*1\r\n:1\r\n", "expected '$', got ':'", id="integer-element"),
    pytest.param(b"*1\r\n+PING\r\n", "expected '$', got '+'", id="simple-string-element"),
    pytest.param(b"*2\r\n$4\r\nECHO\r\n*1\r\n$1\r\nx\r\n", "expected '$', got '*'", id="nested"),
    pytest.param(b'PING "unbalanced\r\n', "unbalanced quotes in request", id="open-quote"),
    pytest.param(b'ECHO "a"b\r\n', "unbalanced quotes in request", id="text-after-quote"),
    pytest.param(b"x" * (64 * 1024 + 100), "too big inline request", id="inline-over-64k"),
]


@pytest.mark.parametrize(("data", "error"), MALFORMED)
@pytest_twisted.inlineCallbacks
def test_malformed_input_gets_a_protocol_error_then_the_connection_closes(
    resp_server, resp_connect, data, error
):
    port = resp_server.resp_port
    bystander = yield resp_connect(port)
    yield bystander.call("SUBSCRIBE", "c")
    bad = yield resp_connect(port)
    bad.write(b"PING\r\n" + data)
    assert (yield within(bad.next_value(), 10)) == SimpleString("PONG")
    assert (yield within(bad.next_value(), 10)) == RespError("ERR Protocol error: " + error)
    assert (yield within(bad.next_value(), 10)) is CLOSED
    # Nobody else noticed.
    publisher = yield resp_connect(port)
    assert (yield publisher.call("PUBLISH", "c", "still here")) == [1]
    assert (yield bystander.drain()) == [[b"message", b"c", b"still here"]]


@pytest_twisted.inlineCallbacks
def test_nothing_after_a_protocol_error_runs(resp_server, resp_connect):
    port = resp_server.resp_port
    subscriber = yield resp_connect(port)
    yield subscriber.call("SUBSCRIBE", "c")
    bad = yield resp_connect(port)
    bad.write(b"PUBLISH c before\r\n*1\r\n:1\r\nPUBLISH c after\r\n")
    assert (yield within(bad.next_value())) == 1
    assert (yield within(bad.next_value())) == RespError(
        "ERR Protocol error: expected '$', got ':'"
    )
    assert (yield within(bad.next_value())) is CLOSED
    assert (yield subscriber.drain()) == [[b"message", b"c", b"before"]]


@pytest_twisted.inlineCallbacks
def test_a_request_over_max_message_size_is_refused(make_server, resp_connect):
    server = yield make_server(resp=True, max_message_size=1024)
    ok = yield resp_connect(server.resp_port)
    assert (yield ok.call("PUBLISH", "c", "x" * 900)) == [0]
    big = yield resp_connect(server.resp_port)
    big.write(b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$5000\r\n" + b"x" * 2000)
    assert (yield within(big.next_value())) == RespError(
        "ERR Protocol error: request over the max_message_size limit of 1024 bytes"
    )
    assert (yield within(big.next_value())) is CLOSED
    assert (yield ok.call("PING")) == [SimpleString("PONG")]


@pytest_twisted.inlineCallbacks
def test_a_malformed_request_from_a_plain_socket(resp_server):
    """A blocking socket in a thread: the error, then the end of the stream."""

    def exchange(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"*1\r\n$x\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return data

    data = yield in_thread(exchange, resp_server.resp_port)
    assert data == b"-ERR Protocol error: invalid bulk length\r\n"


# -- across transports ---------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_resp_publishes_reach_websocket_as_text_or_base64(resp_server, resp_connect, connect):
    ws = yield connect(resp_server.port)
    assert (yield ws.call("SUBSCRIBE", "bin")) == [["subscribe", "bin", 1]]
    publisher = yield resp_connect(resp_server.resp_port)
    assert (yield publisher.call("PUBLISH", "bin", ALL_BYTES)) == [1]
    assert (yield publisher.call("PUBLISH", "bin", "héllo ✓")) == [1]
    assert (yield publisher.call("PUBLISH", "bin", b"\xc3")) == [1]  # cut UTF-8
    assert (yield ws.drain()) == [
        ["message", "bin", {"base64": B64_ALL_BYTES}],
        ["message", "bin", "héllo ✓"],
        ["message", "bin", {"base64": "ww=="}],
    ]


@pytest_twisted.inlineCallbacks
def test_websocket_publishes_reach_resp_as_the_original_bytes(resp_server, resp_connect, connect):
    resp2 = yield resp_connect(resp_server.resp_port)
    resp3 = yield resp_connect(resp_server.resp_port, protocol_version=3)
    yield resp2.call("SUBSCRIBE", "bin")
    yield resp3.call("SUBSCRIBE", "bin")
    ws = yield connect(resp_server.port)
    assert (yield ws.call("PUBLISH", "bin", {"base64": B64_ALL_BYTES})) == [["reply", 2]]
    assert (yield ws.call("PUBLISH", "bin", "héllo ✓")) == [["reply", 2]]
    expected = [[b"message", b"bin", ALL_BYTES], [b"message", b"bin", "héllo ✓".encode()]]
    assert (yield resp2.drain()) == expected
    pushes = yield resp3.drain()
    assert pushes == expected and {type(p) for p in pushes} == {Push}


@pytest_twisted.inlineCallbacks
def test_patterns_and_shard_channels_across_transports(resp_server, resp_connect, connect):
    ws = yield connect(resp_server.port)
    resp = yield resp_connect(resp_server.resp_port)
    assert (yield ws.call("PSUBSCRIBE", "news.*")) == [["psubscribe", "news.*", 1]]
    assert (yield ws.call("SSUBSCRIBE", "orders:{42}")) == [["ssubscribe", "orders:{42}", 1]]
    assert (yield resp.call("PSUBSCRIBE", "news.*")) == [[b"psubscribe", b"news.*", 1]]
    assert (yield resp.call("SSUBSCRIBE", "orders:{42}")) == [[b"ssubscribe", b"orders:{42}", 1]]
    ws_publisher = yield connect(resp_server.port)
    resp_publisher = yield resp_connect(resp_server.resp_port)
    assert (yield resp_publisher.call("PUBLISH", "news.uk", b"tea\xff")) == [2]
    assert (yield ws_publisher.call("PUBLISH", "news.fr", "vin")) == [["reply", 2]]
    assert (yield resp_publisher.call("SPUBLISH", "orders:{42}", "shipped")) == [2]
    assert (yield ws_publisher.call("SPUBLISH", "orders:{42}", {"base64": "AP8="})) == [
        ["reply", 2]
    ]
    # Patterns never match shard channels; PUBLISH never reaches them.
    assert (yield resp_publisher.call("PUBLISH", "orders:{42}", "x")) == [0]
    assert (yield ws_publisher.call("SPUBLISH", "news.uk", "x")) == [["reply", 0]]
    assert (yield ws.drain()) == [
        ["pmessage", "news.*", "news.uk", {"base64": base64.b64encode(b"tea\xff").decode()}],
        ["pmessage", "news.*", "news.fr", "vin"],
        ["smessage", "orders:{42}", "shipped"],
        ["smessage", "orders:{42}", {"base64": "AP8="}],
    ]
    assert (yield resp.drain()) == [
        [b"pmessage", b"news.*", b"news.uk", b"tea\xff"],
        [b"pmessage", b"news.*", b"news.fr", b"vin"],
        [b"smessage", b"orders:{42}", b"shipped"],
        [b"smessage", b"orders:{42}", b"\x00\xff"],
    ]


@pytest_twisted.inlineCallbacks
def test_pubsub_counts_subscribers_of_both_transports(resp_server, resp_connect, connect):
    ws = yield connect(resp_server.port)
    resp = yield resp_connect(resp_server.resp_port)
    yield ws.call("SUBSCRIBE", "news", "sport")
    yield ws.call("PSUBSCRIBE", "n*")
    yield ws.call("SSUBSCRIBE", "orders")
    yield resp.call("SUBSCRIBE", "news", b"\xff")
    yield resp.call("PSUBSCRIBE", "s*")
    yield resp.call("SSUBSCRIBE", "orders")
    asker = yield resp_connect(resp_server.resp_port)
    assert (yield asker.call("PUBSUB", "NUMSUB", "news", "sport", b"\xff", "x")) == [
        [b"news", 2, b"sport", 1, b"\xff", 1, b"x", 0]
    ]
    assert (yield asker.call("PUBSUB", "NUMPAT")) == [2]
    assert (yield asker.call("PUBSUB", "SHARDNUMSUB", "orders")) == [[b"orders", 2]]
    assert sorted((yield asker.call("PUBSUB", "CHANNELS"))[0]) == [b"news", b"sport", b"\xff"]
    assert (yield ws.call("PUBSUB", "NUMSUB", "news", "sport")) == [
        ["reply", ["news", 2, "sport", 1]]
    ]
    [[kind, channels]] = yield ws.call("PUBSUB", "CHANNELS")
    assert kind == "reply"
    assert sorted(channels, key=json.dumps) == sorted(
        ["news", "sport", {"base64": "/w=="}], key=json.dumps
    )
    # A publish counts deliveries on both: a channel each, plus the RESP pattern.
    assert (yield asker.call("PUBLISH", "sport", "goal")) == [2]
    assert (yield ws.drain()) == [["message", "sport", "goal"]]
    assert (yield resp.call("UNSUBSCRIBE", "news")) == [
        [b"pmessage", b"s*", b"sport", b"goal"],
        [b"unsubscribe", b"news", 2],
    ]
    assert (yield asker.call("PUBSUB", "NUMSUB", "news")) == [[b"news", 1]]
    assert (yield ws.call("PUBSUB", "NUMSUB", "news")) == [["reply", ["news", 1]]]


# -- disconnects ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_abrupt_disconnect_of_a_resp_subscriber(resp_server, resp_connect, connect):
    watcher = yield resp_connect(resp_server.resp_port)
    ws = yield connect(resp_server.port)
    doomed = yield resp_connect(resp_server.resp_port)
    yield doomed.call("SUBSCRIBE", "news")
    yield doomed.call("PSUBSCRIBE", "n*")
    yield doomed.call("SSUBSCRIBE", "orders")
    assert (yield watcher.call("PUBSUB", "NUMSUB", "news")) == [[b"news", 1]]
    gone = server_side(resp_server, doomed).lost
    doomed.abort()  # no QUIT, no FIN: a vanished peer
    yield within(gone)
    assert (yield watcher.call("PUBSUB", "NUMSUB", "news")) == [[b"news", 0]]
    assert (yield watcher.call("PUBSUB", "NUMPAT")) == [0]
    assert (yield watcher.call("PUBSUB", "SHARDNUMSUB", "orders")) == [[b"orders", 0]]
    assert (yield ws.call("PUBSUB", "NUMSUB", "news")) == [["reply", ["news", 0]]]
    assert (yield watcher.call("PUBLISH", "news", "anyone?")) == [0]
    assert resp_server.engine.client_count == 2


@pytest_twisted.inlineCallbacks
def test_a_resp_reader_that_stops_is_cut_off_and_the_others_get_everything(
    make_server, resp_connect, connect
):
    server = yield make_server(resp=True, output_buffer_hard=1024 * 1024, output_buffer_soft=0)
    stalled = yield resp_connect(server.resp_port)
    healthy = yield resp_connect(server.resp_port)
    publisher = yield resp_connect(server.resp_port)
    yield stalled.call("SUBSCRIBE", "flood")
    yield healthy.call("SUBSCRIBE", "flood")
    gone = server_side(server, stalled).lost
    stalled.transport.pauseProducing()  # the client stops reading its socket
    payloads: list[bytes] = []
    received = []

    def publish_round():
        # 32 messages (512 KB), read by the healthy subscriber before the
        # next round, so only the stalled one can fall behind.
        assert len(payloads) < 16_000, "256 MB published and the stalled reader still served"
        for _ in range(32):
            payloads.append(b"%05d" % len(payloads) + b"z" * 16_000)
            publisher.send("PUBLISH", "flood", payloads[-1])
        while len(received) < len(payloads):
            received.append((yield within(healthy.next_value())))

    # How much the kernel buffers for the stalled reader varies by machine:
    # publish until it is cut off, then one round more, which must count the
    # healthy subscriber only.
    while not gone.called:
        yield from publish_round()
    yield from publish_round()
    assert server.resp_factory.slow_consumers == 1
    assert server.factory.slow_consumers == 0
    assert received == [[b"message", b"flood", p] for p in payloads]
    counts = yield publisher.drain()
    assert len(counts) == len(payloads)
    assert counts == sorted(counts, reverse=True) and set(counts) == {2, 1}
    assert counts[-32:] == [1] * 32
    assert (yield publisher.call("PUBSUB", "NUMSUB", "flood")) == [[b"flood", 1]]
    agent = Agent(reactor)
    response = yield agent.request(b"GET", b"http://127.0.0.1:%d/healthz" % server.port)
    health = json.loads((yield readBody(response)))
    assert health["slow_consumers_disconnected"] == 1
    assert health["connections"] == 2
    stalled.transport.resumeProducing()
