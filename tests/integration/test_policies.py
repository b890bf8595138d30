"""The connection policies over real sockets: origins, keepalive pings, idle
clients, and their counters in /metrics."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from tests.integration.test_hostile import gather, raw, raw_websocket
from tests.integration.test_metrics import figure, scrape
from tests.support import wsframes
from tests.support.wsframes import CLOSE, PING, close_code, command


@pytest_twisted.inlineCallbacks
def test_a_browser_from_a_refused_origin_sees_1008_and_why(make_server, connect):
    server = yield make_server(allowed_origins="https://app.example.com")
    browser = yield raw(server.port)
    browser.transport.write(wsframes.handshake(extra="Origin: https://evil.example\r\n"))
    received = yield browser.closed
    head, frames = wsframes.split_response(received)
    assert head.startswith(b"HTTP/1.1 101")  # accepted, so a browser sees why it closes
    [(opcode, payload)] = wsframes.parse_frames(frames)
    assert opcode == CLOSE and close_code(payload) == 1008
    assert payload[2:] == b"origin not allowed: https://evil.example"
    allowed = yield raw(server.port)
    allowed.transport.write(
        wsframes.handshake(extra="Origin: https://app.example.com\r\n") + command("PING")
    )
    yield allowed.until(b'["pong",""]')
    allowed.transport.loseConnection()
    samples = yield scrape(server.port)
    assert figure(samples, "pubsub_origin_refusals_total") == 1


@pytest_twisted.inlineCallbacks
def test_pings_keep_answering_clients_and_drop_silent_ones(make_server, connect):
    # Autobahn's timers round to whole seconds (they may fire up to 1 s early):
    # a timeout of 2 s gives the answering client at least one second.
    server = yield make_server(ping_interval=1, ping_timeout=2)
    answering = yield connect(server.port)  # Autobahn answers pings by itself
    silent = yield raw_websocket(server.port)  # reads, never answers
    yield silent.closed
    assert PING in [opcode for opcode, _ in wsframes.parse_frames(silent.received)]
    assert answering.close_info is None
    assert (yield answering.call("PING")) == [["pong", ""]]
    samples = yield scrape(server.port)
    assert figure(samples, "pubsub_ping_timeouts_total") == 1


@pytest_twisted.inlineCallbacks
def test_idle_clients_are_closed_on_both_ports_but_subscribers_stay(make_server, connect):
    server = yield make_server(resp=True, idle_timeout=0.3)
    subscriber = yield connect(server.port)
    yield subscriber.call("SUBSCRIBE", "news")
    idle = yield connect(server.port)
    resp_idle = yield raw(server.resp_port)
    _, code, reason = yield idle.closed
    assert (code, reason) == (1008, "idle for 0.3 s (idle_timeout)")
    assert (yield resp_idle.closed) == b""  # as Redis: closed without a word
    assert subscriber.close_info is None
    assert (yield subscriber.call("PING")) == [["pong", ""]]
    samples = yield scrape(server.port)
    assert figure(samples, "pubsub_idle_disconnects_total", transport="websocket") == 1
    assert figure(samples, "pubsub_idle_disconnects_total", transport="resp") == 1


@pytest_twisted.inlineCallbacks
def test_metrics_count_refused_publishes_and_connections(make_server, connect):
    server = yield make_server(resp=True, publish_rate=1, publish_burst=1, max_connections_per_ip=3)
    publisher = yield connect(server.port)
    replies = yield publisher.call("PUBLISH", "a", "1")
    replies += yield publisher.call("PUBLISH", "a", "2")
    assert replies[0] == ["reply", 0] and replies[1][0] == "error"
    resp = yield gather(raw(server.resp_port) for _ in range(4))
    yield resp[3].closed
    samples = yield scrape(server.port)
    assert figure(samples, "pubsub_publishes_rate_limited_total", transport="websocket") == 1
    assert figure(samples, "pubsub_publishes_rate_limited_total", transport="resp") == 0
    assert figure(samples, "pubsub_connections_refused_per_ip_total", transport="resp") == 1
    assert figure(samples, "pubsub_connections_refused_per_ip_total", transport="websocket") == 0
    for client in resp:
        client.transport.loseConnection()
    yield defer.DeferredList([client.closed for client in resp])
