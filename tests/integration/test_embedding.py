"""The embedding API, and the runnable example in docs/ run as its own process."""

from __future__ import annotations

import sys
from io import BytesIO
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

import pubsub
from tests.support.processes import ServerProcess

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "embedded.py"


@pytest_twisted.inlineCallbacks
def test_mounted_beside_other_resources_and_publishing_from_code(connect):
    engine = pubsub.Engine()
    root = Resource()
    root.putChild(b"pubsub", pubsub.build_resource(engine))
    port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(root))
    try:
        number = port.getHost().port
        client = yield connect(number, path="/pubsub")
        other = yield connect(number, path="/pubsub/")
        assert (yield client.call("SUBSCRIBE", "app")) == [["subscribe", "app", 1]]
        assert (yield other.call("PSUBSCRIBE", "a*")) == [["psubscribe", "a*", 1]]
        assert engine.publish("app", "from code") == 2
        assert engine.publish(b"app", b"\xff") == 2
        assert (yield client.drain()) == [
            ["message", "app", "from code"],
            ["message", "app", {"base64": "/w=="}],
        ]
        assert (yield other.drain()) == [
            ["pmessage", "a*", "app", "from code"],
            ["pmessage", "a*", "app", {"base64": "/w=="}],
        ]
        response = yield Agent(reactor).request(
            b"GET", b"http://127.0.0.1:%d/pubsub/healthz" % number
        )
        assert response.code == 200 and b'"connections": 2' in (yield readBody(response))
    finally:
        yield port.stopListening()


def test_build_factory_shares_the_engine():
    engine = pubsub.Engine()
    factory = pubsub.build_factory(engine, pubsub.Settings(max_message_size=10))
    assert factory.engine is engine
    assert factory.maxMessagePayloadSize == 10


@pytest_twisted.inlineCallbacks
def test_the_documented_example_runs(connect):
    process = ServerProcess(rb"embedded app on http://127.0.0.1:(\d+)/")
    args = [sys.executable, str(EXAMPLE), "--port", "0"]
    transport = reactor.spawnProcess(process, sys.executable, args, env=None)
    try:
        port = yield process.listening
        client = yield connect(port, path="/pubsub")
        assert (yield client.call("SUBSCRIBE", "ticks", "announcements"))[0] == [
            "subscribe",
            "ticks",
            1,
        ]
        kind, channel, _ = yield client.next_frame()
        assert (kind, channel) == ("message", "ticks")
        agent = Agent(reactor)
        response = yield agent.request(b"GET", b"http://127.0.0.1:%d/hello" % port)
        assert (yield readBody(response)) == b"hello from the app\n"
        response = yield agent.request(
            b"POST",
            b"http://127.0.0.1:%d/announce" % port,
            Headers(),
            FileBodyProducer(BytesIO(b"release 1.0")),
        )
        assert (yield readBody(response)) == b"1\n"
        frames = yield client.drain()
        assert ["message", "announcements", "release 1.0"] in frames
    finally:
        transport.signalProcess("TERM")
        yield process.ended
