"""permessage-deflate and the echo endpoint, over real sockets with Autobahn clients."""

from __future__ import annotations

import zlib

import pytest
import pytest_twisted
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)

from pubsub.websocket import framing


def deflate_options(**offer):
    """Client options that offer permessage-deflate and accept the server's answer."""

    def accept(response):
        assert isinstance(response, PerMessageDeflateResponse)
        return PerMessageDeflateResponseAccept(response)

    return {
        "perMessageCompressionOffers": [PerMessageDeflateOffer(**offer)],
        "perMessageCompressionAccept": accept,
    }


@pytest.fixture
def count_deflates(monkeypatch):
    """How many compressors the server's shared framer creates."""
    calls = []
    original = zlib.compressobj

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(framing.zlib, "compressobj", counting)
    return calls


@pytest_twisted.inlineCallbacks
def test_one_compression_per_group_serves_every_subscriber(make_server, connect, count_deflates):
    server = yield make_server(compression=True, compression_min_size=64)
    compressed = []
    for _ in range(3):
        client = yield connect(server.port, **deflate_options())
        assert client._perMessageCompress is not None
        assert client._perMessageCompress.server_no_context_takeover
        compressed.append(client)
    plain = yield connect(server.port)
    assert plain._perMessageCompress is None
    for client in [*compressed, plain]:
        yield client.call("SUBSCRIBE", "big")
    payload = "all work and no play " * 100
    del count_deflates[:]
    assert server.engine.publish("big", payload) == 4
    assert len(count_deflates) == 1  # one deflate for the three compressed connections
    for client in [*compressed, plain]:
        assert (yield client.next_frame()) == ["message", "big", payload]


@pytest_twisted.inlineCallbacks
def test_different_window_sizes_make_different_groups(make_server, connect, count_deflates):
    server = yield make_server(compression=True, compression_min_size=0)
    default = yield connect(server.port, **deflate_options())
    small = yield connect(server.port, **deflate_options(request_max_window_bits=10))
    assert small._perMessageCompress.server_max_window_bits == 10
    for client in (default, small):
        yield client.call("SUBSCRIBE", "c")
    del count_deflates[:]
    assert server.engine.publish("c", "x" * 5000) == 2
    assert sorted(args[2] for args in count_deflates) == [-15, -10]
    for client in (default, small):
        assert (yield client.next_frame()) == ["message", "c", "x" * 5000]


@pytest_twisted.inlineCallbacks
def test_small_messages_and_replies_cross_compressed_connections(make_server, connect):
    server = yield make_server(compression=True, compression_min_size=1000)
    subscriber = yield connect(server.port, **deflate_options())
    publisher = yield connect(server.port, **deflate_options())
    assert (yield subscriber.call("PSUBSCRIBE", "*")) == [["psubscribe", "*", 1]]
    for size in (1, 999, 1000, 50_000):
        assert (yield publisher.call("PUBLISH", "c", "y" * size)) == [["reply", 1]]
        assert (yield subscriber.next_frame()) == ["pmessage", "*", "c", "y" * size]


@pytest_twisted.inlineCallbacks
def test_a_decompression_bomb_is_refused_with_1009(make_server, connect):
    server = yield make_server(compression=True, max_message_size=100_000)
    bomb = yield connect(server.port, **deflate_options())
    bystander = yield connect(server.port, **deflate_options())
    # A few kilobytes on the wire, ten megabytes once inflated.
    bomb.sendMessage(b'["PUBLISH","c","' + b"0" * 10_000_000 + b'"]')
    _, code, reason = yield bomb.closed
    assert code == 1009
    assert "100000" in reason
    assert (yield bystander.call("PING", "ok")) == [["pong", "ok"]]


@pytest_twisted.inlineCallbacks
def test_without_the_setting_compression_is_not_negotiated(server, connect):
    client = yield connect(server.port, **deflate_options())
    assert client._perMessageCompress is None
    assert (yield client.call("PING")) == [["pong", ""]]


@pytest_twisted.inlineCallbacks
def test_the_echo_endpoint_exists_only_when_switched_on(server, connect):
    with pytest.raises(ConnectionError):
        yield connect(server.port, path="/echo")


@pytest_twisted.inlineCallbacks
def test_the_echo_endpoint_echoes_under_the_same_limits(make_server, connect):
    server = yield make_server(echo_endpoint=True, compression=True, max_message_size=4096)
    echo = yield connect(server.port, path="/echo", **deflate_options())
    assert echo._perMessageCompress is not None
    echo.sendMessage('"héllo"'.encode())
    assert (yield echo.frames.get()) == "héllo"
    echo.sendMessage(b"\x00\xff", isBinary=True)
    assert (yield echo.frames.get()) == b"\x00\xff"
    echo.sendMessage(b"z" * 5000)
    _, code, _ = yield echo.closed
    assert code == 1009
    assert server.engine.client_count == 0  # echo clients never join the engine
