"""The RESP transport driven byte by byte through StringTransport.

Every expected byte string below is what redis-server 7.0.15 sends for the
same input (checked against a private one), except where a test says this
server differs on purpose: HELLO's ``server`` field, CLIENT SETINFO (Redis
7.2's), CLIENT HELP's list of subcommands, the connection, subscription,
name, size and output buffer limits, and INFO's short field list.
test_the_same_bytes_as_live_redis replays a table of streams against a
private redis-server and compares the answers byte for byte.
"""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from pubsub.core.engine import Engine
from pubsub.operations.config import Settings
from pubsub.resp import protocol as resp
from pubsub.resp.commands import REDIS_VERSION
from pubsub.resp.protocol import RespFactory
from pubsub.resp.reader import INLINE_MAX, split_inline
from tests.support.redis_server import redis_server
from tests.support.tuples import TupleSubscriber

# -- building requests and expected replies ---------------------------------------------


def _b(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def command(*args: bytes | str) -> bytes:
    """One multibulk request, as every client library sends it."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = _b(arg)
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def bulk(data: bytes | str) -> bytes:
    data = _b(data)
    return b"$%d\r\n%s\r\n" % (len(data), data)


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def error(text: str) -> bytes:
    return b"-%s\r\n" % text.encode()


def array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


def confirm(kind: str, name: bytes | str | None, count: int, resp3: bool = False) -> bytes:
    head = b">3\r\n" if resp3 else b"*3\r\n"
    if name is None:
        encoded = b"_\r\n" if resp3 else b"$-1\r\n"
    else:
        encoded = bulk(name)
    return head + bulk(kind) + encoded + integer(count)


def message(channel: bytes | str, payload: bytes | str, resp3: bool = False) -> bytes:
    return (b">3\r\n" if resp3 else b"*3\r\n") + bulk("message") + bulk(channel) + bulk(payload)


def pmessage(pattern: str, channel: str, payload: bytes | str, resp3: bool = False) -> bytes:
    head = b">4\r\n" if resp3 else b"*4\r\n"
    return head + bulk("pmessage") + bulk(pattern) + bulk(channel) + bulk(payload)


def smessage(channel: str, payload: bytes | str, resp3: bool = False) -> bytes:
    return (b">3\r\n" if resp3 else b"*3\r\n") + bulk("smessage") + bulk(channel) + bulk(payload)


def hello_reply(proto: int, client_id: int) -> bytes:
    """HELLO's map: RESP3 ``%7``, a flat 14-element array in RESP2."""
    body = (
        bulk("server")
        + bulk("pubsub")  # Redis says "redis"; this server names itself
        + bulk("version")
        + bulk(REDIS_VERSION)
        + bulk("proto")
        + integer(proto)
        + bulk("id")
        + integer(client_id)
        + bulk("mode")
        + bulk("standalone")
        + bulk("role")
        + bulk("master")
        + bulk("modules")
        + b"*0\r\n"
    )
    return (b"%7\r\n" if proto == 3 else b"*14\r\n") + body


def refused(name: str) -> bytes:
    """Redis's RESP2 subscribed-mode refusal."""
    return error(
        f"ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / "
        "RESET are allowed in this context"
    )


PONG = b"+PONG\r\n"
OK = b"+OK\r\n"
NOT_AN_INTEGER = error("ERR value is not an integer or out of range")
BAD_NAME = error("ERR Client names cannot contain spaces, newlines or special characters.")

# PUBSUB HELP exactly as redis-server 7.0.15 sends it.
PUBSUB_HELP = (
    b"*14\r\n"
    b"+PUBSUB <subcommand> [<arg> [value] [opt] ...]. Subcommands are:\r\n"
    b"+CHANNELS [<pattern>]\r\n"
    b"+    Return the currently active channels matching a <pattern> (default: '*').\r\n"
    b"+NUMPAT\r\n"
    b"+    Return number of subscriptions to patterns.\r\n"
    b"+NUMSUB [<channel> ...]\r\n"
    b"+    Return the number of subscribers for the specified channels, excluding\r\n"
    b"+    pattern subscriptions(default: no channels).\r\n"
    b"+SHARDCHANNELS [<pattern>]\r\n"
    b"+    Return the currently active shard level channels matching a <pattern>"
    b" (default: '*').\r\n"
    b"+SHARDNUMSUB [<shardchannel> ...]\r\n"
    b"+    Return the number of subscribers for the specified shard level channel(s)\r\n"
    b"+HELP\r\n"
    b"+    Prints this help.\r\n"
)


# -- the connection under test ------------------------------------------------------------


class Transport(StringTransport):
    """StringTransport that counts writeSequence calls: one per flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def writeSequence(self, data):
        self.flushes += 1
        super().writeSequence(data)


class Client:
    """One RespProtocol on a StringTransport."""

    def __init__(self, factory: RespFactory) -> None:
        self.factory = factory
        self.clock = factory.reactor
        self.transport = Transport()
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        self.protocol.makeConnection(self.transport)

    @property
    def client_id(self) -> int:
        return self.protocol.session.client_id

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        """Everything sent by the end of this reactor turn (when outboxes flush)."""
        self.clock.advance(0)
        data = self.transport.value()
        self.transport.clear()
        return data

    def call(self, *args: bytes | str) -> bytes:
        self.send(command(*args))
        return self.output()

    def inline(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.output()

    @property
    def closing(self) -> bool:
        """loseConnection or abortConnection was called."""
        return self.transport.disconnecting

    @property
    def aborted(self) -> bool:
        """abortConnection was called (StringTransport sets ``disconnected`` for it)."""
        return self.transport.disconnected

    def lose(self) -> None:
        """What the reactor does once the socket is closed."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def make_factory(clock):
    def make(**settings) -> RespFactory:
        return RespFactory(Engine(), Settings(**settings), reactor=clock)

    return make


@pytest.fixture
def factory(make_factory):
    return make_factory()


@pytest.fixture
def connect(factory):
    return lambda: Client(factory)


def resp3_client(factory: RespFactory) -> Client:
    client = Client(factory)
    assert client.call("HELLO", "3") == hello_reply(3, client.client_id)
    return client


# -- connection life --------------------------------------------------------------------


def test_a_connection_registers_with_the_engine_and_is_its_transports_producer(factory):
    client = Client(factory)
    assert factory.engine.client_count == 1
    assert factory.connections == {client.protocol}
    assert client.transport.producer is client.protocol
    assert client.transport.streaming


def test_connection_lost_unregisters_from_the_engine(factory):
    subscriber, publisher = Client(factory), Client(factory)
    subscriber.call("SUBSCRIBE", "news")
    subscriber.call("PSUBSCRIBE", "n*")
    subscriber.lose()
    assert factory.engine.client_count == 1
    assert factory.connections == {publisher.protocol}
    assert factory.engine.numsub([b"news"]) == [(b"news", 0)]
    assert factory.engine.numpat() == 0
    assert publisher.call("PUBLISH", "news", "x") == integer(0)
    fired = []
    subscriber.protocol.lost.addCallback(fired.append)
    assert fired == [None]


def test_deliveries_to_other_connections_wait_for_the_end_of_the_reactor_turn(connect):
    subscriber, publisher = connect(), connect()
    subscriber.call("SUBSCRIBE", "news")
    publisher.send(command("PUBLISH", "news", "hi"))
    assert publisher.transport.value() == b":1\r\n"
    assert subscriber.transport.value() == b""
    assert subscriber.output() == b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"


# -- reply encodings, RESP2 and RESP3 ------------------------------------------------------


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
@pytest.mark.parametrize("kind", ["subscribe", "psubscribe", "ssubscribe"])
def test_subscribe_and_unsubscribe_confirmations(factory, resp3, kind):
    client = resp3_client(factory) if resp3 else Client(factory)
    head = b">3\r\n" if resp3 else b"*3\r\n"
    assert client.call(kind.upper(), "a", "b") == (
        head + bulk(kind) + b"$1\r\na\r\n:1\r\n" + head + bulk(kind) + b"$1\r\nb\r\n:2\r\n"
    )
    unsubscribe = "un" + kind if kind == "subscribe" else kind[0] + "un" + kind[1:]
    assert client.call(unsubscribe.upper(), "a") == confirm(unsubscribe, "a", 1, resp3)
    assert client.call(unsubscribe.upper()) == confirm(unsubscribe, "b", 0, resp3)


@pytest.mark.parametrize(
    "resp3, null", [(False, b"$-1\r\n"), (True, b"_\r\n")], ids=["resp2", "resp3"]
)
@pytest.mark.parametrize("kind", ["unsubscribe", "punsubscribe", "sunsubscribe"])
def test_unsubscribing_with_nothing_held_confirms_a_null_name(factory, resp3, null, kind):
    client = resp3_client(factory) if resp3 else Client(factory)
    head = b">3\r\n" if resp3 else b"*3\r\n"
    assert client.call(kind.upper()) == head + bulk(kind) + null + b":0\r\n"


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_message_pmessage_and_smessage_deliveries(factory, resp3):
    subscriber = resp3_client(factory) if resp3 else Client(factory)
    publisher = Client(factory)
    subscriber.call("SUBSCRIBE", "news")
    subscriber.call("PSUBSCRIBE", "n*")
    subscriber.call("SSUBSCRIBE", "s")
    assert publisher.call("PUBLISH", "news", "hi") == b":2\r\n"
    assert publisher.call("SPUBLISH", "s", "there") == b":1\r\n"
    head3, head4 = (b">3\r\n", b">4\r\n") if resp3 else (b"*3\r\n", b"*4\r\n")
    assert subscriber.output() == (
        head3
        + b"$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
        + head4
        + b"$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
        + head3
        + b"$8\r\nsmessage\r\n$1\r\ns\r\n$5\r\nthere\r\n"
    )


def test_publish_replies_with_the_number_of_deliveries(connect):
    subscriber, other, publisher = connect(), connect(), connect()
    subscriber.call("SUBSCRIBE", "c")
    subscriber.call("PSUBSCRIBE", "c*", "*")
    other.call("SUBSCRIBE", "c")
    assert publisher.call("PUBLISH", "c", "x") == b":4\r\n"
    assert publisher.call("PUBLISH", "other", "x") == b":1\r\n"  # the "*" pattern only
    assert publisher.call("SPUBLISH", "c", "x") == b":0\r\n"


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_pubsub_introspection_replies(factory, resp3):
    # Redis answers these with the same arrays and integers in both versions.
    client = resp3_client(factory) if resp3 else Client(factory)
    a, b = Client(factory), Client(factory)
    a.call("SUBSCRIBE", "news", "sport")
    b.call("SUBSCRIBE", "news")
    b.call("PSUBSCRIBE", "n*", "s*")
    a.call("PSUBSCRIBE", "n*")
    a.call("SSUBSCRIBE", "s1", "s2")
    assert client.call("PUBSUB", "CHANNELS") == b"*2\r\n$4\r\nnews\r\n$5\r\nsport\r\n"
    assert client.call("PUBSUB", "CHANNELS", "n*") == b"*1\r\n$4\r\nnews\r\n"
    assert client.call("PUBSUB", "CHANNELS", "none*") == b"*0\r\n"
    assert client.call("PUBSUB", "NUMSUB", "news", "sport", "none") == (
        b"*6\r\n$4\r\nnews\r\n:2\r\n$5\r\nsport\r\n:1\r\n$4\r\nnone\r\n:0\r\n"
    )
    assert client.call("PUBSUB", "NUMSUB") == b"*0\r\n"
    assert client.call("PUBSUB", "NUMPAT") == b":2\r\n"
    assert client.call("PUBSUB", "SHARDCHANNELS") == b"*2\r\n$2\r\ns1\r\n$2\r\ns2\r\n"
    assert client.call("PUBSUB", "SHARDCHANNELS", "*2") == b"*1\r\n$2\r\ns2\r\n"
    assert client.call("PUBSUB", "SHARDNUMSUB", "s1", "x") == (
        b"*4\r\n$2\r\ns1\r\n:1\r\n$1\r\nx\r\n:0\r\n"
    )
    assert client.call("PUBSUB", "SHARDNUMSUB") == b"*0\r\n"


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_pubsub_help_is_redis_text_as_simple_strings(factory, resp3):
    client = resp3_client(factory) if resp3 else Client(factory)
    assert client.call("PUBSUB", "HELP") == PUBSUB_HELP
    assert client.call("pubsub", "help") == PUBSUB_HELP


@pytest.mark.parametrize(
    "resp3, subscribed, args, reply",
    [
        (False, False, ["PING"], b"+PONG\r\n"),
        (False, False, ["PING", "hi"], b"$2\r\nhi\r\n"),
        (False, True, ["PING"], b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
        (False, True, ["PING", "hi"], b"*2\r\n$4\r\npong\r\n$2\r\nhi\r\n"),
        (True, False, ["PING"], b"+PONG\r\n"),
        (True, False, ["PING", "hi"], b"$2\r\nhi\r\n"),
        (True, True, ["PING"], b"+PONG\r\n"),
        (True, True, ["PING", "hi"], b"$2\r\nhi\r\n"),
    ],
)
def test_ping_replies(factory, resp3, subscribed, args, reply):
    client = resp3_client(factory) if resp3 else Client(factory)
    if subscribed:
        client.call("SUBSCRIBE", "c")
    assert client.call(*args) == reply


def test_ping_with_too_many_arguments(connect):
    client = connect()
    assert client.call("PING", "a", "b") == error(
        "ERR wrong number of arguments for 'ping' command"
    )


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_echo_is_binary_safe(factory, resp3):
    client = resp3_client(factory) if resp3 else Client(factory)
    payload = b"\x00\xff\r\n"
    assert client.call("ECHO", payload) == b"$4\r\n\x00\xff\r\n\r\n"
    everything = bytes(range(256))
    assert client.call("ECHO", everything) == b"$256\r\n" + everything + b"\r\n"
    assert client.call("ECHO", "") == b"$0\r\n\r\n"


@pytest.mark.parametrize(
    "resp3, null", [(False, b"$-1\r\n"), (True, b"_\r\n")], ids=["resp2", "resp3"]
)
def test_null_replies(factory, resp3, null):
    client = resp3_client(factory) if resp3 else Client(factory)
    assert client.call("CLIENT", "GETNAME") == null


# -- pipelining ----------------------------------------------------------------------------


def test_many_requests_in_one_read_are_answered_in_order_in_one_write_as_it_ends(connect):
    client = connect()
    requests = b"".join(command("ECHO", str(n)) for n in range(200))
    client.send(requests + command("PING") + command("PUBLISH", "c", "m"))
    expected = b"".join(bulk(str(n)) for n in range(200)) + PONG + b":0\r\n"
    assert client.transport.value() == expected
    assert client.transport.flushes == 1


def test_many_inline_requests_in_one_read_are_answered_in_order_in_one_write(connect):
    client = connect()
    client.send(b"".join(b"ECHO %d\r\n" % n for n in range(200)) + b"PING\n")
    assert client.transport.value() == b"".join(bulk(str(n)) for n in range(200)) + PONG
    assert client.transport.flushes == 1


def test_requests_fed_byte_by_byte_are_answered_in_order_each_as_it_completes(connect):
    client = connect()
    stream = (
        command("PING")
        + command("ECHO", b"\x00\r\n")
        + command("SUBSCRIBE", "c")
        + command("PING", "x")
    )
    for i in range(len(stream)):
        client.send(stream[i : i + 1])
    assert client.output() == (
        PONG + bulk(b"\x00\r\n") + confirm("subscribe", "c", 1) + b"*2\r\n$4\r\npong\r\n$1\r\nx\r\n"
    )
    assert client.transport.flushes == 4
    assert not client.closing


def test_inline_requests_fed_byte_by_byte(connect):
    client = connect()
    stream = b"PING x\r\nECHO \"a b\"\n\r\nPING\r\nECHO 'c'\n"
    for i in range(len(stream)):
        client.send(stream[i : i + 1])
    assert client.output() == bulk("x") + bulk("a b") + PONG + bulk("c")
    assert client.transport.flushes == 4


def test_a_request_split_anywhere_gives_the_same_reply(factory):
    request = command("PUBLISH", "c", b"split\r\nme")
    wrong = {}
    for cut in range(1, len(request)):
        client = Client(factory)
        client.send(request[:cut])
        client.send(request[cut:])
        reply = client.output()
        if reply != b":0\r\n":
            wrong[request[:cut]] = reply
    assert wrong == {}


def test_a_payload_split_off_its_request_is_never_run_as_a_command(factory):
    # The read boundary falls after a whole argument: what follows is still
    # part of the same multibulk request, whatever its bytes look like.
    subscriber, publisher = Client(factory), Client(factory)
    subscriber.call("SUBSCRIBE", "c")
    publisher.send(b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n")
    publisher.send(b"$4\r\nQUIT\r\n")
    assert publisher.output() == b":1\r\n"
    assert not publisher.closing
    assert subscriber.output() == message("c", "QUIT")


def test_an_inline_request_then_a_multibulk_one_in_one_read(connect):
    client = connect()
    client.send(b"PING\r\n" + command("ECHO", "x"))
    assert client.output() == PONG + bulk("x")


def test_a_multibulk_request_then_an_inline_one_in_one_read(connect):
    # Redis decides multibulk or inline per request, by its first byte:
    # redis-server 7.0.15 answers this with +PONG twice.
    client = connect()
    client.send(command("PING") + b"PING\r\n")
    assert client.output() == PONG + PONG
    assert not client.closing


def test_a_multibulk_request_then_a_dollar_line_in_one_read(connect):
    # redis-server 7.0.15 takes "$4" as an inline command (unknown), then PINGs.
    client = connect()
    client.send(command("PING") + b"$4\r\nPING\r\n")
    assert client.output() == (
        PONG + error("ERR unknown command '$4', with args beginning with: ") + PONG
    )


# -- inline commands -------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"PING\r\n", b"PING\n", b"ping\r\n", b"  PING  \r\n"])
def test_inline_ping(connect, line):
    client = connect()
    client.send(line)
    assert client.output() == PONG


@pytest.mark.parametrize(
    "line, reply",
    [
        (b'ECHO "a b"', bulk("a b")),
        (b'ECHO "\\x41"', bulk("A")),
        (b"ECHO '\\''", bulk("'")),
        (b'ECHO "\\n"', bulk("\n")),
        (b'ECHO "\\x00\\xff\\r\\n"', bulk(b"\x00\xff\r\n")),
        (b"ECHO 'a\\nb'", bulk("a\\nb")),
        (b'ECHO a"b c"', bulk("ab c")),
        (b'ECHO ""', bulk("")),
        (b"PUBLISH c   'x y'", b":0\r\n"),
    ],
)
def test_inline_quotes_and_escapes(connect, line, reply):
    client = connect()
    assert client.inline(line) == reply


def test_empty_inline_lines_are_ignored(connect):
    client = connect()
    client.send(b"\r\n\n   \r\n\t\nPING\r\n\r\n")
    assert client.output() == PONG
    assert not client.closing


def test_inline_unknown_command(connect):
    client = connect()
    assert client.inline(b"FOO a") == error(
        "ERR unknown command 'FOO', with args beginning with: 'a' "
    )


@pytest.mark.parametrize("line", [b'ECHO "a', b"ECHO 'a", b'ECHO "a"b', b"ECHO 'a'b"])
def test_unbalanced_quotes_are_a_protocol_error(connect, line):
    client = connect()
    client.send(b"PING\r\n" + line + b"\r\nPING\r\n")
    assert client.output() == PONG + error("ERR Protocol error: unbalanced quotes in request")
    assert client.closing
    client.send(b"PING\r\n")
    assert client.output() == b""


def test_an_inline_line_over_64_kib_without_newline_is_a_protocol_error(connect):
    client = connect()
    client.send(b"x" * INLINE_MAX)
    assert client.output() == b""
    assert not client.closing
    client.send(b"x")
    assert client.output() == error("ERR Protocol error: too big inline request")
    assert client.closing


def test_an_inline_line_of_64_kib_is_still_read(connect):
    client = connect()
    client.send(b"ECHO " + b"x" * (INLINE_MAX - 5))
    client.send(b"\r\n")
    assert client.output() == bulk(b"x" * (INLINE_MAX - 5))


@pytest.mark.parametrize(
    "line, args",
    [
        (b"", []),
        (b"   ", []),
        (b"PING", [b"PING"]),
        (b"a b\tc", [b"a", b"b", b"c"]),
        (b"  a   b  ", [b"a", b"b"]),
        (b"a\rb", [b"a", b"b"]),
        (b'"a b"', [b"a b"]),
        (b'"a" b', [b"a", b"b"]),
        (b'"a"\tb', [b"a", b"b"]),
        (b'"a"\vb', [b"a", b"b"]),
        (b'""', [b""]),
        (b"''", [b""]),
        (b'"\\x41"', [b"A"]),
        (b'"\\x4a\\x4B"', [b"JK"]),
        (b'"\\xff\\x00z"', [b"\xff\x00z"]),
        (b'"\\x4"', [b"x4"]),
        (b'"\\xZZ"', [b"xZZ"]),
        (b'"\\n\\r\\t\\b\\a\\z"', [b"\n\r\t\b\az"]),
        (b'"a\\"b"', [b'a"b']),
        (b'"a\'b"', [b"a'b"]),
        (b"'\\''", [b"'"]),
        (b"'it\\'s'", [b"it's"]),
        (b"'a\\nb'", [b"a\\nb"]),
        (b"'a\\b'", [b"a\\b"]),
        (b"'a\"b'", [b'a"b']),
        (b'a"b c"', [b"ab c"]),
        (b"a'b c'", [b"ab c"]),
        (b"\\x41", [b"\\x41"]),
        (b"a\vb", [b"a\vb"]),
        (b"x\fy", [b"x\fy"]),
        (b"\va", [b"a"]),
        (b'"abc', None),
        (b"'abc", None),
        (b'"a"b', None),
        (b"'a'b", None),
        (b'a"b c"d', None),
        (b"'it''s'", None),
        (b'"trailing\\', None),
    ],
)
def test_split_inline_as_sdssplitargs(line, args):
    assert split_inline(line) == args


# -- malformed multibulk requests ----------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        (b"*1\r\n:5\r\n", "ERR Protocol error: expected '$', got ':'"),
        (b"*2\r\n$4\r\nECHO\r\n:5\r\n", "ERR Protocol error: expected '$', got ':'"),
        (b"*1\r\n*0\r\n", "ERR Protocol error: expected '$', got '*'"),
        (b"*1\r\n-ERR\r\n", "ERR Protocol error: expected '$', got '-'"),
        (b"*1\r\n,1.5\r\n", "ERR Protocol error: expected '$', got ','"),
        (b"*1\r\n#t\r\n", "ERR Protocol error: expected '$', got '#'"),
        (b"*1\r\n%0\r\n", "ERR Protocol error: expected '$', got '%'"),
        (b"*1\r\n!3\r\nabc\r\n", "ERR Protocol error: expected '$', got '!'"),
        (b"*x\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*01\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*1\r\n$x\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\n$04\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\n$-1\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\n$-2\r\n", "ERR Protocol error: invalid bulk length"),
    ],
)
def test_malformed_multibulk_is_a_protocol_error_and_closes(connect, data, message):
    client = connect()
    client.send(data)
    assert client.output() == error(message)
    assert client.closing
    assert not client.aborted  # the error is sent first


@pytest.mark.parametrize(
    "data, got",
    [
        (b"*1\r\n+PING\r\n", "+"),
        (b"*1\r\n_\r\n", "_"),
        (b"*1\r\n=5\r\ntxt:a\r\n", "="),
        (b"*1\r\n(12\r\n", "("),
        (b"*1\r\n~0\r\n", "~"),
        (b"*1\r\n>0\r\n", ">"),
    ],
)
def test_every_element_that_is_not_a_bulk_string_is_refused(connect, data, got):
    # redis-server 7.0.15 refuses all of these with the byte it saw.
    client = connect()
    client.send(data)
    assert client.output() == error(f"ERR Protocol error: expected '$', got '{got}'")
    assert client.closing


def test_empty_and_null_multibulk_requests_are_ignored(connect):
    client = connect()
    client.send(b"*0\r\n*-1\r\n" + command("PING"))
    assert client.output() == PONG
    assert not client.closing


def test_a_negative_multibulk_length_is_ignored(connect):
    # Redis skips any multibulk length <= 0, not only -1.
    client = connect()
    client.send(b"*-5\r\n" + command("PING"))
    assert client.output() == PONG
    assert not client.closing


def test_nothing_is_processed_after_a_protocol_error(connect):
    client = connect()
    client.send(command("PING") + b"*1\r\n:5\r\n" + command("SUBSCRIBE", "c") + b"PING\r\n")
    assert client.output() == PONG + error("ERR Protocol error: expected '$', got ':'")
    client.send(command("SUBSCRIBE", "c"))
    assert client.output() == b""
    assert client.factory.engine.channels() == []


def test_a_protocol_error_leaves_the_engine_at_once(connect):
    client = connect()
    client.call("SUBSCRIBE", "c")
    client.send(b"*x\r\n")
    assert client.factory.engine.client_count == 0
    assert client.factory.engine.numsub([b"c"]) == [(b"c", 0)]


LIMIT_ERROR = error("ERR Protocol error: request over the max_message_size limit of 1000 bytes")


def test_a_bulk_longer_than_max_message_size_is_refused_at_its_header(make_factory):
    # As Redis refuses a length over proto-max-bulk-len before the bytes come.
    client = Client(make_factory(max_message_size=1000))
    client.send(b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$1001\r\n")
    assert client.output() == LIMIT_ERROR
    assert client.closing
    client.send(b"x" * 2000)
    assert client.output() == b""


def test_a_bulk_header_arriving_in_pieces_is_checked_once_whole(make_factory):
    client = Client(make_factory(max_message_size=1000))
    client.send(b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$10")
    assert client.output() == b""
    client.send(b"00\r")
    assert client.output() == b""
    client.send(b"\n")
    assert client.output() == b""  # a 1000-byte bulk fits the limit on its own
    client.send(b"x" * 969)
    assert client.output() == b""  # 1000 bytes received
    client.send(b"x")
    assert client.output() == LIMIT_ERROR  # 1001: the request cannot fit any more
    assert client.closing


@pytest.mark.parametrize(
    "header, reply",
    [
        (b"$-1\r\n", "ERR Protocol error: invalid bulk length"),
        (b"$x\r\n", "ERR Protocol error: invalid bulk length"),
        (b":1\r\n", "ERR Protocol error: expected '$', got ':'"),
    ],
)
def test_a_bad_element_is_refused_before_the_request_is_whole(make_factory, header, reply):
    client = Client(make_factory())
    client.send(b"*3\r\n$7\r\nPUBLISH\r\n" + header)
    assert client.output() == error(reply)
    assert client.closing


def test_without_a_size_limit_redis_bulk_length_bound_holds(make_factory):
    client = Client(make_factory(max_message_size=0))
    client.send(b"*2\r\n$4\r\nECHO\r\n$%d\r\n" % (512 * 1024 * 1024 + 1))
    assert client.output() == error("ERR Protocol error: invalid bulk length")


def test_the_size_limit_triggers_as_soon_as_the_unread_bytes_pass_it(make_factory):
    # Many small arguments: no single header is over the limit, their sum is.
    client = Client(make_factory(max_message_size=1000))
    client.send(b"*1000\r\n$7\r\nPUBLISH\r\n")
    client.send(b"$1\r\nx\r\n" * ((1000 - 17) // 7))
    assert client.output() == b""
    assert not client.closing
    client.send(b"$1\r\nx\r\n")
    assert client.output() == LIMIT_ERROR


def test_requests_under_the_size_limit_pipelined_past_it_all_run(make_factory):
    client = Client(make_factory(max_message_size=1000))
    client.send(command("PUBLISH", "c", "x" * 500) * 10)
    assert client.output() == b":0\r\n" * 10
    assert not client.closing


def test_a_request_over_the_size_limit_is_refused_when_it_arrives_whole(make_factory):
    client = Client(make_factory(max_message_size=1000))
    client.send(command("PUBLISH", "c", "x" * 2000))
    assert client.output() == LIMIT_ERROR
    assert client.closing


def test_the_size_limit_holds_for_a_request_behind_a_complete_one(make_factory):
    client = Client(make_factory(max_message_size=1000))
    client.send(command("PING") + b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$100000000\r\n" + b"x" * 2000)
    assert client.output() == PONG + LIMIT_ERROR
    assert client.closing


def test_an_internal_fault_costs_only_that_client_and_is_logged(factory, monkeypatch):
    events = []
    monkeypatch.setattr(resp, "_log", Logger(observer=events.append))
    healthy = Client(factory)
    broken = Client(factory)

    def boom(args, table):
        raise RuntimeError("boom")

    monkeypatch.setattr(resp, "resolve", boom)
    broken.send(command("PING"))
    assert broken.output() == error("ERR internal error")
    assert broken.closing
    failures = [event["log_failure"] for event in events if "log_failure" in event]
    assert len(failures) == 1 and failures[0].check(RuntimeError)
    monkeypatch.undo()
    assert healthy.call("PING") == PONG


# -- the RESP2 subscribed-mode rule ---------------------------------------------------------


@pytest.mark.parametrize(
    "args, name",
    [
        (["PUBLISH", "c", "x"], "publish"),
        (["SPUBLISH", "c", "x"], "spublish"),
        (["ECHO", "a"], "echo"),
        (["PUBSUB", "CHANNELS"], "pubsub|channels"),
        (["pubsub", "numsub", "c"], "pubsub|numsub"),
        (["PUBSUB", "HELP"], "pubsub|help"),
        (["CLIENT", "ID"], "client|id"),
        (["CLIENT", "SETNAME", "n"], "client|setname"),
        (["HELLO", "3"], "hello"),
        (["AUTH", "default", "x"], "auth"),
        (["SELECT", "0"], "select"),
        (["INFO"], "info"),
    ],
)
@pytest.mark.parametrize("subscribe", ["SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"])
def test_resp2_subscribed_mode_refuses_other_commands(connect, subscribe, args, name):
    client = connect()
    client.call(subscribe, "c")
    assert client.call(*args) == refused(name)
    assert not client.closing


@pytest.mark.parametrize(
    "args, reply",
    [
        (["FOO"], error("ERR unknown command 'FOO', with args beginning with: ")),
        (["PUBLISH", "c"], error("ERR wrong number of arguments for 'publish' command")),
        (["CLIENT", "nosuch"], error("ERR unknown subcommand 'nosuch'. Try CLIENT HELP.")),
        (["PUBSUB", "nosuch"], error("ERR unknown subcommand 'nosuch'. Try PUBSUB HELP.")),
        (
            ["PUBSUB", "NUMPAT", "x"],
            error("ERR wrong number of arguments for 'pubsub|numpat' command"),
        ),
        (["CLIENT"], error("ERR wrong number of arguments for 'client' command")),
        (["PING", "a", "b"], error("ERR wrong number of arguments for 'ping' command")),
    ],
)
def test_resp2_subscribed_mode_reports_unknown_commands_and_arity_first(connect, args, reply):
    client = connect()
    client.call("SUBSCRIBE", "c")
    assert client.call(*args) == reply


def test_resp2_subscribed_mode_allows_the_subscribe_family_ping_quit_and_reset(connect):
    client = connect()
    client.call("SUBSCRIBE", "c")
    assert client.call("PSUBSCRIBE", "p") == confirm("psubscribe", "p", 2)
    assert client.call("SSUBSCRIBE", "s") == confirm("ssubscribe", "s", 1)
    assert client.call("SUNSUBSCRIBE") == confirm("sunsubscribe", "s", 0)
    assert client.call("PUNSUBSCRIBE", "p") == confirm("punsubscribe", "p", 1)
    assert client.call("ping") == b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    assert client.call("RESET") == b"+RESET\r\n"
    client.call("SUBSCRIBE", "c")
    assert client.call("QUIT") == OK


@pytest.mark.parametrize(
    "subscribe, unsubscribe",
    [("SUBSCRIBE", "UNSUBSCRIBE"), ("PSUBSCRIBE", "PUNSUBSCRIBE"), ("SSUBSCRIBE", "SUNSUBSCRIBE")],
)
def test_resp2_subscribed_mode_ends_with_the_last_subscription(connect, subscribe, unsubscribe):
    client = connect()
    client.call(subscribe, "a", "b")
    client.call(unsubscribe, "a")
    assert client.call("PUBLISH", "c", "x") == refused("publish")
    client.call(unsubscribe)
    assert client.call("PUBLISH", "c", "x") == b":0\r\n"
    assert client.call("PING") == PONG


def test_resp2_subscribed_mode_lasts_while_any_kind_of_subscription_is_held(connect):
    # As redis-server 7.0.15: shard subscriptions count too.
    client = connect()
    client.call("SSUBSCRIBE", "s")
    client.call("SUBSCRIBE", "c")
    client.call("UNSUBSCRIBE")
    assert client.call("PUBLISH", "c", "x") == refused("publish")
    client.call("SUNSUBSCRIBE")
    assert client.call("PUBLISH", "c", "x") == b":0\r\n"


def test_resp2_subscribed_mode_does_not_start_when_a_subscribe_is_refused(make_factory):
    client = Client(make_factory(max_subscriptions=1))
    assert client.call("SUBSCRIBE", "a", "b").startswith(b"-ERR subscription limit")
    assert client.call("PUBLISH", "c", "x") == b":0\r\n"


def test_resp3_has_no_subscribed_mode(factory):
    client = resp3_client(factory)
    assert client.call("SUBSCRIBE", "c") == confirm("subscribe", "c", 1, resp3=True)
    # The client's own message comes before PUBLISH's reply, as in Redis.
    assert client.call("PUBLISH", "c", "x") == message("c", "x", resp3=True) + b":1\r\n"
    assert client.call("ECHO", "a") == bulk("a")
    assert client.call("PUBSUB", "CHANNELS") == b"*1\r\n$1\r\nc\r\n"
    assert client.call("CLIENT", "ID") == integer(client.client_id)
    assert client.call("SELECT", "0") == OK


# -- HELLO ------------------------------------------------------------------------------------


def test_hello_without_arguments_answers_in_the_current_protocol(connect):
    client = connect()
    assert client.call("HELLO") == hello_reply(2, client.client_id)
    assert client.call("HELLO", "3") == hello_reply(3, client.client_id)
    assert client.call("HELLO") == hello_reply(3, client.client_id)


def test_hello_2_and_hello_3(connect):
    client = connect()
    assert client.call("HELLO", "2") == hello_reply(2, client.client_id)
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"
    assert client.call("HELLO", "3") == hello_reply(3, client.client_id)
    assert client.call("HELLO", "3").startswith(b"%7\r\n")
    assert client.call("CLIENT", "GETNAME") == b"_\r\n"
    assert client.call("HELLO", "2") == hello_reply(2, client.client_id)
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"


@pytest.mark.parametrize(
    "version, reply",
    [
        ("4", error("NOPROTO unsupported protocol version")),
        ("1", error("NOPROTO unsupported protocol version")),
        ("-1", error("NOPROTO unsupported protocol version")),
        ("x", error("ERR Protocol version is not an integer or out of range")),
        ("3_", error("ERR Protocol version is not an integer or out of range")),
        ("", error("ERR Protocol version is not an integer or out of range")),
    ],
)
def test_hello_with_a_bad_version(connect, version, reply):
    client = connect()
    assert client.call("HELLO", version) == reply
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"  # still RESP2


@pytest.mark.parametrize("version", ["03", "+3", " 3", "3 ", "0x3"])
def test_hello_reads_the_version_as_redis_reads_an_integer(connect, version):
    # redis-server 7.0.15 (string2ll): no leading zero, sign '+' or blanks.
    client = connect()
    assert client.call("HELLO", version) == error(
        "ERR Protocol version is not an integer or out of range"
    )
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"


def test_hello_setname(connect):
    client = connect()
    assert client.call("HELLO", "3", "SETNAME", "n") == hello_reply(3, client.client_id)
    assert client.call("CLIENT", "GETNAME") == bulk("n")
    assert client.protocol.name == b"n"
    client.call("HELLO", "3", "setname", "a", "SETNAME", "b")
    assert client.call("CLIENT", "GETNAME") == bulk("b")
    client.call("HELLO", "3", "SETNAME", "")
    assert client.call("CLIENT", "GETNAME") == b"_\r\n"


def test_hello_setname_with_a_bad_name(connect):
    client = connect()
    assert client.call("HELLO", "3", "SETNAME", "a b") == BAD_NAME
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"  # neither named nor RESP3


def test_hello_auth_as_the_default_user(connect):
    client = connect()
    assert client.call("HELLO", "3", "AUTH", "default", "any") == hello_reply(3, client.client_id)
    assert client.call("HELLO", "2", "auth", "default", "pw", "SETNAME", "n") == hello_reply(
        2, client.client_id
    )
    assert client.call("CLIENT", "GETNAME") == bulk("n")


def test_hello_auth_as_another_user(connect):
    client = connect()
    assert client.call("HELLO", "3", "AUTH", "other", "pw") == error(
        "WRONGPASS invalid username-password pair or user is disabled."
    )
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"


@pytest.mark.parametrize(
    "args, option",
    [
        (["x"], "x"),
        (["SETNAME"], "SETNAME"),
        (["AUTH", "a"], "AUTH"),
        (["SETNAME", "n", "extra"], "extra"),
    ],
)
def test_hello_with_a_bad_option(connect, args, option):
    client = connect()
    assert client.call("HELLO", "3", *args) == error(f"ERR Syntax error in HELLO option '{option}'")
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"


def test_hello_3_while_subscribed_in_resp2_is_refused_and_changes_nothing(connect):
    # redis-server 7.0.15: HELLO is not among the commands RESP2 allows then.
    subscriber, publisher = connect(), connect()
    subscriber.call("SUBSCRIBE", "c")
    assert subscriber.call("HELLO", "3") == refused("hello")
    publisher.call("PUBLISH", "c", "x")
    assert subscriber.output() == message("c", "x")


def test_hello_while_subscribed_in_resp3_keeps_subscriptions_and_switches_frames(factory):
    subscriber, publisher = resp3_client(factory), Client(factory)
    subscriber.call("SUBSCRIBE", "c")
    subscriber.call("PSUBSCRIBE", "c*")
    assert subscriber.call("HELLO", "3") == hello_reply(3, subscriber.client_id)
    assert publisher.call("PUBLISH", "c", "1") == b":2\r\n"
    assert subscriber.output() == message("c", "1", True) + pmessage("c*", "c", "1", True)
    assert subscriber.call("HELLO", "2") == hello_reply(2, subscriber.client_id)
    assert publisher.call("PUBLISH", "c", "2") == b":2\r\n"
    assert subscriber.output() == message("c", "2") + pmessage("c*", "c", "2")
    # Back in RESP2, the subscribed-mode rule applies again.
    assert subscriber.call("HELLO", "3") == refused("hello")
    assert subscriber.call("UNSUBSCRIBE") == confirm("unsubscribe", "c", 1)


# -- RESET, QUIT ------------------------------------------------------------------------------


def test_reset_unsubscribes_silently_and_restores_the_connection(factory):
    client = Client(factory)
    client_id = client.call("CLIENT", "ID")
    assert client_id == integer(client.client_id)
    client.call("HELLO", "3", "SETNAME", "nm")
    client.call("SUBSCRIBE", "a", "b")
    client.call("PSUBSCRIBE", "p*")
    client.call("SSUBSCRIBE", "s")
    assert client.call("RESET") == b"+RESET\r\n"  # no confirmations
    engine = factory.engine
    assert engine.subscription_count(client.client_id) == 0
    assert engine.numsub([b"a"]) == [(b"a", 0)] and engine.numpat() == 0
    assert engine.shard_channels() == []
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"  # RESP2, and no name
    assert client.call("CLIENT", "ID") == client_id
    assert client.call("PUBLISH", "a", "x") == b":0\r\n"  # not in subscribed mode


def test_reset_in_resp2_subscribed_mode(connect):
    client = connect()
    client.call("SUBSCRIBE", "c")
    assert client.call("RESET") == b"+RESET\r\n"
    assert client.call("PUBLISH", "c", "x") == b":0\r\n"


def test_quit_replies_ok_then_closes(factory):
    client = Client(factory)
    other = Client(factory)
    client.call("SUBSCRIBE", "c")
    client.send(command("QUIT") + command("PING"))
    assert client.transport.value() == OK  # sent at once, before the close
    client.transport.clear()
    assert client.closing and not client.aborted
    assert factory.engine.client_count == 1
    assert other.call("PUBLISH", "c", "x") == b":0\r\n"
    client.send(command("PING"))
    assert client.output() == b""
    client.lose()
    assert factory.connections == {other.protocol}


def test_quit_sends_what_was_queued_before_it(connect):
    client = connect()
    client.send(b"PING a\r\nPING b\r\nQUIT\r\nPING c\r\n")
    assert client.output() == bulk("a") + bulk("b") + OK
    assert client.transport.flushes == 1


def test_quit_takes_any_arguments(connect):
    client = connect()
    assert client.inline(b"QUIT a b") == OK
    assert client.closing


# -- CLIENT, SELECT, AUTH, INFO ------------------------------------------------------------


def test_client_id(factory):
    first, second = Client(factory), Client(factory)
    assert first.call("CLIENT", "ID") == integer(first.client_id)
    assert second.call("client", "id") == integer(second.client_id)
    assert first.client_id != second.client_id


def test_client_setname_and_getname(connect):
    client = connect()
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"
    assert client.call("CLIENT", "SETNAME", "worker-1") == OK
    assert client.call("CLIENT", "GETNAME") == bulk("worker-1")
    assert client.call("CLIENT", "SETNAME", "") == OK
    assert client.call("CLIENT", "GETNAME") == b"$-1\r\n"


@pytest.mark.parametrize("name", ["a b", "a\n", "tab\t", "\x7f", "é", "a\x00"])
def test_client_setname_refuses_bad_characters(connect, name):
    client = connect()
    client.call("CLIENT", "SETNAME", "good")
    assert client.call("CLIENT", "SETNAME", name) == BAD_NAME
    assert client.call("CLIENT", "GETNAME") == bulk("good")


def test_client_setinfo(connect):
    # Redis 7.2's subcommand (redis-py sends it on connect); texts as 7.2's.
    client = connect()
    assert client.call("CLIENT", "SETINFO", "lib-name", "redis-py") == OK
    assert client.call("CLIENT", "SETINFO", "LIB-VER", "5.0.1") == OK
    assert client.protocol.lib_name == b"redis-py"
    assert client.protocol.lib_ver == b"5.0.1"
    assert client.call("CLIENT", "SETINFO", "x", "y") == error("ERR Unrecognized option 'x'")
    assert client.call("CLIENT", "SETINFO", "lib-name", "a b") == error(
        "ERR lib-name cannot contain spaces, newlines or special characters."
    )
    assert client.call("CLIENT", "SETINFO", "lib-ver", "1\n") == error(
        "ERR lib-ver cannot contain spaces, newlines or special characters."
    )
    assert client.protocol.lib_name == b"redis-py"
    assert client.call("CLIENT", "SETINFO", "lib-name") == error(
        "ERR wrong number of arguments for 'client|setinfo' command"
    )


def test_client_help(connect):
    client = connect()
    reply = client.call("CLIENT", "HELP")
    count, _, body = reply.partition(b"\r\n")
    lines = body.split(b"\r\n")
    assert lines.pop() == b""
    assert count == b"*%d" % len(lines)
    assert all(line.startswith(b"+") for line in lines)
    assert lines[0] == b"+CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"
    for entry in (
        [b"+GETNAME", b"+    Return the name of the current connection."],
        [b"+ID", b"+    Return the ID of the current connection."],
        [b"+SETNAME <name>", b"+    Assign the name <name> to the current connection."],
    ):
        at = lines.index(entry[0])
        assert lines[at : at + 2] == entry
    # Redis's addReplyHelp ends every HELP with these two lines.
    assert lines[-2:] == [b"+HELP", b"+    Prints this help."]


@pytest.mark.parametrize(
    "args, reply",
    [
        (["CLIENT", "nosuch"], error("ERR unknown subcommand 'nosuch'. Try CLIENT HELP.")),
        (["CLIENT"], error("ERR wrong number of arguments for 'client' command")),
        (["CLIENT", "ID", "x"], error("ERR wrong number of arguments for 'client|id' command")),
        (
            ["CLIENT", "SETNAME"],
            error("ERR wrong number of arguments for 'client|setname' command"),
        ),
        (
            ["CLIENT", "GETNAME", "x"],
            error("ERR wrong number of arguments for 'client|getname' command"),
        ),
    ],
)
def test_client_errors(connect, args, reply):
    client = connect()
    assert client.call(*args) == reply


@pytest.mark.parametrize(
    "index, reply",
    [
        ("0", OK),
        ("15", OK),
        ("16", error("ERR DB index is out of range")),
        ("-1", error("ERR DB index is out of range")),
        ("x", NOT_AN_INTEGER),
        ("", NOT_AN_INTEGER),
    ],
)
def test_select(connect, index, reply):
    client = connect()
    assert client.call("SELECT", index) == reply


@pytest.mark.parametrize("index", ["01", "+1", " 1", "1_0", "99999999999999999999"])
def test_select_reads_the_index_as_redis_reads_an_integer(connect, index):
    client = connect()
    assert client.call("SELECT", index) == NOT_AN_INTEGER


@pytest.mark.parametrize(
    "args, reply",
    [
        (
            ["AUTH", "pw"],
            error(
                "ERR AUTH <password> called without any password configured for the default "
                "user. Are you sure your configuration is correct?"
            ),
        ),
        (["AUTH", "default", "pw"], OK),
        (
            ["AUTH", "other", "pw"],
            error("WRONGPASS invalid username-password pair or user is disabled."),
        ),
        (["AUTH", "a", "b", "c"], error("ERR syntax error")),
        (["AUTH"], error("ERR wrong number of arguments for 'auth' command")),
    ],
)
def test_auth(connect, args, reply):
    client = connect()
    assert client.call(*args) == reply


def _info_text(reply: bytes) -> str:
    head, _, rest = reply.partition(b"\r\n")
    assert head.startswith(b"$")
    assert len(rest) == int(head[1:]) + 2 and rest.endswith(b"\r\n")
    return rest[:-2].decode()


def _info_fields(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.split("\r\n") if line and line[0] != "#")


def test_info_in_resp2_is_a_bulk_string_of_every_section(factory, clock):
    client = Client(factory)
    clock.advance(42)
    text = _info_text(client.call("INFO"))
    assert [line for line in text.split("\r\n") if line.startswith("#")] == [
        "# Server",
        "# Clients",
        "# Stats",
    ]
    assert "\r\n\r\n# Clients\r\n" in text and "\r\n\r\n# Stats\r\n" in text
    fields = _info_fields(text)
    assert fields["redis_version"] == "7.0.15"
    assert fields["redis_mode"] == "standalone"
    assert fields["process_id"] == str(os.getpid())
    assert fields["uptime_in_seconds"] == "42"
    assert "pubsub_version" in fields
    assert fields["connected_clients"] == "1"
    assert client.call("INFO", "everything") == client.call("INFO")
    assert client.call("INFO", "all") == client.call("INFO", "default")


def test_info_figures_reflect_the_engine(factory):
    client = Client(factory)
    others = [Client(factory) for _ in range(3)]
    others[0].call("SUBSCRIBE", "a", "b")
    others[1].call("SUBSCRIBE", "a")
    others[1].call("PSUBSCRIBE", "p*", "q*")
    others[2].call("SSUBSCRIBE", "s")
    assert client.call("INFO", "clients") == bulk("# Clients\r\nconnected_clients:4\r\n")
    assert client.call("INFO", "stats") == bulk(
        "# Stats\r\n"
        "pubsub_channels:2\r\n"
        "pubsub_patterns:2\r\n"
        "pubsubshard_channels:1\r\n"
        "client_output_buffer_limit_disconnections:0\r\n"
    )
    others[0].lose()
    fields = _info_fields(_info_text(client.call("INFO")))
    assert fields["connected_clients"] == "3"
    assert fields["pubsub_channels"] == "1"


def test_info_sections_filter(connect):
    client = connect()
    # Any case and order; the sections come in Redis's order.
    assert client.call("INFO", "STATS", "Clients") == bulk(
        "# Clients\r\nconnected_clients:1\r\n"
        "\r\n"
        "# Stats\r\n"
        "pubsub_channels:0\r\n"
        "pubsub_patterns:0\r\n"
        "pubsubshard_channels:0\r\n"
        "client_output_buffer_limit_disconnections:0\r\n"
    )
    assert client.call("INFO", "nosuch") == b"$0\r\n\r\n"


def test_info_in_resp3_is_a_verbatim_string(factory):
    client = resp3_client(factory)
    text = b"# Clients\r\nconnected_clients:1\r\n"
    assert client.call("INFO", "clients") == b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text)


@pytest.mark.parametrize(
    "args, reply",
    [
        (["foo", "a"], "ERR unknown command 'foo', with args beginning with: 'a' "),
        (
            ["FOO", "a", "b", "c"],
            "ERR unknown command 'FOO', with args beginning with: 'a' 'b' 'c' ",
        ),
        (["foo"], "ERR unknown command 'foo', with args beginning with: "),
    ],
)
def test_unknown_command(connect, args, reply):
    client = connect()
    assert client.call(*args) == error(reply)
    assert not client.closing


@pytest.mark.parametrize(
    "args, name",
    [
        (["ECHO"], "echo"),
        (["ECHO", "a", "b"], "echo"),
        (["SELECT"], "select"),
        (["RESET", "x"], "reset"),
    ],
)
def test_wrong_number_of_arguments(connect, args, name):
    client = connect()
    assert client.call(*args) == error(f"ERR wrong number of arguments for '{name}' command")


# -- limits -------------------------------------------------------------------------------------


def test_max_connections(make_factory):
    factory = make_factory(max_connections=1)
    first = Client(factory)
    second = Client(factory)
    assert second.transport.value() == b"-ERR max number of clients reached\r\n"
    assert second.closing
    assert factory.engine.client_count == 1
    assert factory.connections == {first.protocol}
    second.transport.clear()
    second.send(command("PING"))
    assert second.output() == b""
    assert first.call("PING") == PONG
    second.lose()
    first.lose()
    third = Client(factory)
    assert third.call("PING") == PONG


def test_max_subscriptions(make_factory):
    client = Client(make_factory(max_subscriptions=2))
    limit_error = error(
        "ERR subscription limit reached: a client may hold at most 2 channels, patterns and "
        "shard channels"
    )
    assert client.call("SUBSCRIBE", "a", "b", "c") == limit_error
    assert client.call("SUBSCRIBE", "a") == confirm("subscribe", "a", 1)
    assert client.call("PSUBSCRIBE", "p", "q") == limit_error
    assert client.call("SSUBSCRIBE", "s") == confirm("ssubscribe", "s", 1)
    assert client.call("SUBSCRIBE", "a") == confirm("subscribe", "a", 1)  # already held


@pytest.mark.parametrize(
    "args, what",
    [
        (["SUBSCRIBE", "toolong"], "channel name"),
        (["PSUBSCRIBE", "toolong"], "pattern"),
        (["SSUBSCRIBE", "toolong"], "shard channel name"),
        (["PUBLISH", "toolong", "x"], "channel name"),
        (["SPUBLISH", "toolong", "x"], "shard channel name"),
        (["PUBSUB", "CHANNELS", "toolong"], "pattern"),
    ],
)
def test_max_name_length(make_factory, args, what):
    client = Client(make_factory(max_name_length=5))
    assert client.call(*args) == error(f"ERR {what} is longer than the limit of 5 bytes")
    assert client.factory.engine.subscription_count(client.client_id) == 0


def test_a_stalled_subscriber_is_cut_off_past_the_hard_limit(make_factory):
    factory = make_factory(output_buffer_hard=10_000, output_buffer_soft=0)
    stalled, healthy, publisher = Client(factory), Client(factory), Client(factory)
    stalled.call("SUBSCRIBE", "c")
    healthy.call("SUBSCRIBE", "c")
    stalled.protocol.pauseProducing()  # what the transport does past 64 KiB unsent
    payloads = [b"%04d" % n + b"x" * 996 for n in range(30)]
    for payload in payloads:
        publisher.send(command("PUBLISH", "c", payload))
    assert stalled.aborted and stalled.closing
    assert factory.slow_consumers == 1
    assert healthy.output() == b"".join(message("c", p) for p in payloads)
    assert stalled.transport.value() == b""  # the backlog was dropped, not sent
    # Counted until the end of the turn that cut it off, then forgotten.
    assert publisher.output() == b":2\r\n" * 30
    assert factory.engine.client_count == 2
    assert publisher.call("PUBLISH", "c", "later") == b":1\r\n"
    stalled.send(command("PING"))
    assert stalled.output() == b""
    fields = _info_fields(_info_text(publisher.call("INFO", "stats")))
    assert fields["client_output_buffer_limit_disconnections"] == "1"
    stalled.lose()
    assert factory.engine.client_count == 2
    assert factory.connections == {healthy.protocol, publisher.protocol}


def test_a_stalled_subscriber_is_cut_off_after_the_soft_limit_seconds(make_factory, clock):
    factory = make_factory(
        output_buffer_hard=0, output_buffer_soft=5000, output_buffer_soft_seconds=30
    )
    stalled, publisher = Client(factory), Client(factory)
    stalled.call("SUBSCRIBE", "c")
    stalled.protocol.pauseProducing()
    for n in range(10):
        publisher.send(command("PUBLISH", "c", str(n) * 1000))
    assert publisher.output() == b":1\r\n" * 10
    clock.advance(29)
    assert not stalled.closing
    assert factory.slow_consumers == 0
    clock.advance(1)
    assert stalled.aborted
    assert factory.slow_consumers == 1
    assert stalled.output() == b""
    assert publisher.call("PUBLISH", "c", "x") == b":0\r\n"


def test_a_subscriber_that_resumes_in_time_gets_everything_in_order(make_factory, clock):
    factory = make_factory(
        output_buffer_hard=0, output_buffer_soft=5000, output_buffer_soft_seconds=30
    )
    slow, publisher = Client(factory), Client(factory)
    slow.call("SUBSCRIBE", "c")
    slow.protocol.pauseProducing()
    for n in range(10):
        publisher.send(command("PUBLISH", "c", str(n) * 1000))
    assert slow.output() == b""
    clock.advance(29)
    slow.protocol.resumeProducing()
    assert slow.transport.value() == b"".join(message("c", str(n) * 1000) for n in range(10))
    clock.advance(60)
    assert not slow.closing
    assert factory.slow_consumers == 0


def test_replies_queue_behind_waiting_deliveries(connect):
    subscriber, publisher = connect(), connect()
    subscriber.call("SUBSCRIBE", "c")
    publisher.send(command("PUBLISH", "c", "first"))
    subscriber.send(command("PING", "after"))
    assert subscriber.output() == message("c", "first") + b"*2\r\n$4\r\npong\r\n$5\r\nafter\r\n"


# -- one engine, several clients and transports --------------------------------------------


def test_binary_payloads_cross_between_resp_clients_unchanged(factory):
    resp2, resp3, publisher = Client(factory), resp3_client(factory), Client(factory)
    payload = bytes(range(256)) + b"\r\n*1\r\n$3\r\n\x00"
    channel = b"ch\x00\xff\r\n"
    resp2.call("SUBSCRIBE", channel)
    resp3.call("SUBSCRIBE", channel)
    assert publisher.call("PUBLISH", channel, payload) == b":2\r\n"
    assert resp2.output() == message(channel, payload)
    assert resp3.output() == message(channel, payload, resp3=True)


def test_frames_are_built_once_per_publish_per_resp_version(factory, monkeypatch):
    built = []
    original = resp._Frames.message

    def counting(self, channel, payload):
        built.append(self)
        return original(self, channel, payload)

    monkeypatch.setattr(resp._Frames, "message", counting)
    first, second, third = Client(factory), Client(factory), resp3_client(factory)
    for client in (first, second, third):
        client.call("SUBSCRIBE", "c")
    publisher = Client(factory)
    assert publisher.call("PUBLISH", "c", "hi") == b":3\r\n"
    assert built == [resp.RESP2_FRAMES, resp.RESP3_FRAMES]
    assert first.output() == second.output() == message("c", "hi")
    assert third.output() == message("c", "hi", resp3=True)


class OtherTransport(TupleSubscriber):
    """A subscriber of another kind (as WebSocket's), with its own encoder."""


def test_resp_clients_and_another_transport_share_one_engine(factory):
    other = OtherTransport()
    token = factory.engine.register(other)
    factory.engine.subscribe(token, [b"c"])
    resp_client = Client(factory)
    resp_client.call("SUBSCRIBE", "c")
    publisher = Client(factory)
    assert publisher.call("PUBLISH", "c", b"\x00\xff") == b":2\r\n"
    assert other.frames == [("message", b"c", b"\x00\xff")]
    assert factory.engine.publish(b"c", b"from elsewhere") == 2
    assert resp_client.output() == message("c", b"\x00\xff") + message("c", "from elsewhere")


# -- shutting down ------------------------------------------------------------------------------


def test_close_all_sends_what_is_queued_then_closes_every_connection(factory):
    subscriber, pinger = Client(factory), Client(factory)
    subscriber.call("SUBSCRIBE", "c")
    pinger.send(command("PING"))  # queued, not flushed yet
    done = []
    factory.close_all().addCallback(done.append)
    assert pinger.transport.value() == PONG
    assert subscriber.closing and pinger.closing
    assert not subscriber.aborted and not pinger.aborted
    assert factory.engine.client_count == 0
    assert pinger.output() == PONG  # nothing more on the next flush
    assert done == []
    subscriber.lose()
    assert done == []
    pinger.lose()
    assert len(done) == 1 and [ok for ok, _ in done[0]] == [True, True]
    assert factory.connections == set()


def test_close_all_with_no_connections_fires_at_once(factory):
    done = []
    factory.close_all().addCallback(done.append)
    assert done == [[]]


# -- against a live redis-server ---------------------------------------------------------

# Streams whose answers name neither the server nor a client id: (id, HELLO 3 first, bytes).
LIVE_CASES = [
    (
        # Redis turns line breaks inside an error into spaces, so the reply
        # stays one line whatever the client quoted.
        "line-breaks-in-errors",
        False,
        command("HELLO", "3", "a\r\nb") + command("NO\nPE", "x\ry") + b"*1\r\n\n",
    ),
    # Like Redis, whatever two bytes follow a bulk string are taken as its CRLF.
    ("bulk-end-skipped", False, b"*2\r\n$4\r\nECHO\r\n$3\r\nabcde*1\r\n$4\r\nPING\r\n"),
    ("bulk-end-then-inline", False, b"*2\r\n$4\r\nECHO\r\n$3\r\nabcdef\r\n"),
    ("nested-aggregate", False, command("PING") + b"*2\r\n$1\r\na\r\n*x\r\n"),
    ("bad-bulk-length-after-a-good-one", False, b"*3\r\n$1\r\na\r\n$x\r\n"),
    (
        "confirmations",
        False,
        (
            # One channel left for UNSUBSCRIBE: Redis confirms in its hash order.
            b"SUBSCRIBE a b\r\nPSUBSCRIBE p*\r\nSSUBSCRIBE s\r\nUNSUBSCRIBE b\r\n"
            b"UNSUBSCRIBE\r\nPUNSUBSCRIBE\r\nSUNSUBSCRIBE\r\nUNSUBSCRIBE\r\nPUNSUBSCRIBE x\r\n"
        ),
    ),
    (
        "subscribed-mode",
        False,
        (
            b"SUBSCRIBE c\r\nPUBLISH c x\r\nECHO a\r\nPUBSUB CHANNELS\r\nCLIENT ID\r\n"
            b"HELLO 3\r\nFOO\r\nPUBLISH c\r\nCLIENT nosuch\r\nPING\r\nPING x\r\nRESET\r\n"
            b"PUBLISH c x\r\nPING\r\n"
        ),
    ),
    (
        "shard-subscribed-mode",
        False,
        (
            b"SSUBSCRIBE s\r\nSUBSCRIBE c\r\nUNSUBSCRIBE\r\nPUBLISH c x\r\nSUNSUBSCRIBE\r\n"
            b"PUBLISH c x\r\n"
        ),
    ),
    (
        "resp3",
        True,
        (
            b"SUBSCRIBE c\r\nPING\r\nPING x\r\nPUBLISH c x\r\nUNSUBSCRIBE\r\nUNSUBSCRIBE\r\n"
            b"CLIENT GETNAME\r\nPUBSUB NUMSUB c\r\nINFO nosuch\r\nRESET\r\nCLIENT GETNAME\r\n"
        ),
    ),
    (
        "introspection",
        False,
        (
            b"PUBSUB HELP\r\nPUBSUB NUMSUB a b\r\nPUBSUB NUMPAT\r\nPUBSUB SHARDNUMSUB s\r\n"
            b"PUBSUB CHANNELS\r\nPUBSUB SHARDCHANNELS\r\nPUBSUB NUMSUB\r\n"
        ),
    ),
    (
        "inline",
        False,
        (
            b'ECHO "a b"\r\nECHO "\\x41"\r\nECHO \'\\\'\'\r\nECHO "\\n"\r\n\r\n\n   \r\nPING\n'
            b'ECHO "\\x00\\xff\\r\\n"\r\nFOO a\r\n'
        ),
    ),
    ("unbalanced-quotes", False, b'PING\r\nECHO "a\r\nPING\r\n'),
    ("expected-dollar", False, b"*1\r\n:5\r\n"),
    ("bad-multibulk-length", False, b"*x\r\n"),
    ("bad-bulk-length", False, b"*1\r\n$x\r\n"),
    ("negative-bulk-length", False, b"*1\r\n$-1\r\n"),
    ("empty-and-null-multibulk", False, b"*0\r\n*-1\r\n"),
    (
        "select-auth",
        False,
        (
            b"SELECT 0\r\nSELECT 15\r\nSELECT 16\r\nSELECT x\r\nSELECT -1\r\nAUTH pw\r\n"
            b"AUTH default pw\r\nAUTH other pw\r\nAUTH a b c\r\n"
        ),
    ),
    (
        "hello-errors",
        False,
        (
            b"HELLO 4\r\nHELLO x\r\nHELLO 3 x\r\nHELLO 3 SETNAME\r\nHELLO 3 AUTH a\r\n"
            b'HELLO 3 AUTH other pw\r\nHELLO 3 SETNAME "a b"\r\nCLIENT GETNAME\r\n'
        ),
    ),
    (
        "client-and-errors",
        False,
        (
            b"FOO a b c\r\nfoo\r\nECHO\r\nPING a b\r\nPUBSUB NUMPAT x\r\nCLIENT\r\n"
            b'CLIENT SETNAME "a b"\r\nCLIENT SETNAME n\r\nCLIENT GETNAME\r\nCLIENT SETNAME ""\r\n'
            b"CLIENT GETNAME\r\nRESET x\r\n"
        ),
    ),
    ("quit", False, b"PING a\r\nQUIT\r\nPING b\r\n"),
]

_END = b"end-of-case"


@pytest.fixture(scope="module")
def live_redis():
    with redis_server() as port:
        yield port


def _redis_answer(port: int, resp3: bool, stream: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        received = b""
        if resp3:
            sock.sendall(command("HELLO", "3"))
            while not received.endswith(b"$7\r\nmodules\r\n*0\r\n"):
                received += sock.recv(65536)
            received = b""
        sock.sendall(stream + command("PING", _END))
        while not received.endswith(_END + b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break  # Redis closed the connection (QUIT, protocol error)
            received += chunk
    return received


@pytest.mark.parametrize(
    "resp3, stream", [case[1:] for case in LIVE_CASES], ids=[case[0] for case in LIVE_CASES]
)
def test_the_same_bytes_as_live_redis(live_redis, factory, resp3, stream):
    client = resp3_client(factory) if resp3 else Client(factory)
    client.send(stream + command("PING", _END))
    assert client.output() == _redis_answer(live_redis, resp3, stream)
