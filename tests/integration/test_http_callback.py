"""The middleware_url callback against a real HTTP backend the test runs."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from pubsub.operations.config import ConfigError
from pubsub.policy.http_callback import HttpCallback
from tests.integration.test_auth import SECRET, token


class Backend(Resource):
    """Answers each POST with ``decide(document)``: a dict (JSON, 200), a
    (status, body) pair, or a Deferred of either (held until it fires)."""

    isLeaf = True

    def __init__(self, decide):
        super().__init__()
        self.decide = decide
        self.documents = []
        self.in_flight = 0
        self.most_in_flight = 0

    def render_POST(self, request):
        document = json.loads(request.content.read())
        assert request.getHeader(b"content-type") == b"application/json"
        self.documents.append(document)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        answer = defer.maybeDeferred(self.decide, document)

        def write(answer):
            self.in_flight -= 1
            status, body = answer if isinstance(answer, tuple) else (200, json.dumps(answer))
            request.setResponseCode(status)
            request.write(body.encode("utf-8"))
            request.finish()

        answer.addCallback(write)
        return NOT_DONE_YET


@pytest.fixture
def backend():
    """``backend(decide)``: the Backend, listening; its URL is ``backend.url``."""
    ports = []

    @defer.inlineCallbacks
    def start(decide):
        resource = Backend(decide)
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(resource))
        ports.append(port)
        resource.url = f"http://127.0.0.1:{port.getHost().port}/decide"
        return resource

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def rules(document):
    event, client = document["event"], document["client"]
    if event == "connect":
        if client["params"].get("user") == ["mallory"]:
            return {"allow": False, "reason": "mallory is banned"}
        return {"allow": True, "identity": {"user": client["params"].get("user", ["?"])[0]}}
    if event == "subscribe":
        if document["channel"] == "secret":
            return {"allow": False, "reason": f"{client['identity']['user']} may not"}
        return {"allow": True}
    if document["channel"] == "broken":
        return (500, "oops")
    if document["channel"] == "shout":
        return {"allow": True, "payload": document["payload"].upper()}
    return {"allow": True}


@pytest_twisted.inlineCallbacks
def test_the_backend_decides_connect_subscribe_and_publish(make_server, backend, connect):
    decider = yield backend(rules)
    server = yield make_server(middleware_url=decider.url)
    ann = yield connect(server.port, "/?user=ann")
    assert (yield ann.call("SUBSCRIBE", "news", "shout")) == [
        ["subscribe", "news", 1],
        ["subscribe", "shout", 2],
    ]
    assert (yield ann.call("SUBSCRIBE", "secret")) == [["error", "NOPERM ann may not"]]
    assert (yield ann.call("PUBLISH", "shout", "hello")) == [
        ["message", "shout", "HELLO"],
        ["reply", 1],
    ]
    assert (yield ann.call("PUBLISH", "broken", "x")) == [
        ["error", "ERR the server's middleware failed; publish refused"]
    ]
    mallory = yield connect(server.port, "/?user=mallory")
    _, code, reason = yield mallory.closed
    assert (code, reason) == (1008, "mallory is banned")
    connect_document = decider.documents[0]
    assert connect_document["event"] == "connect"
    assert connect_document["client"]["transport"] == "websocket"
    assert connect_document["client"]["params"] == {"user": ["ann"]}
    publish = next(d for d in decider.documents if d["event"] == "publish")
    assert (publish["kind"], publish["channel"], publish["payload"]) == (
        "channel",
        "shout",
        "hello",
    )
    assert publish["client"]["identity"] == {"user": "ann"}


@pytest_twisted.inlineCallbacks
def test_a_slow_backend_is_timed_out_and_the_concurrency_is_bounded(make_server, backend, connect):
    held = []

    def slowly(document):
        if document["event"] == "publish":
            held.append(defer.Deferred())
            return held[-1]
        return {"allow": True}

    decider = yield backend(slowly)
    server = yield make_server(
        middleware_url=decider.url, middleware_concurrency=1, middleware_timeout=2
    )
    first = yield connect(server.port)
    second = yield connect(server.port)
    first.send("PUBLISH", "a", "1")
    second.send("PUBLISH", "a", "2")
    late = "ERR the server's middleware did not answer in time; publish refused"
    assert (yield first.next_frame()) == ["error", late]
    assert (yield second.next_frame()) == ["error", late]
    assert decider.most_in_flight == 1  # the second waited its turn, then timed out
    for answer in held:
        answer.callback({"allow": True})
    assert server.factory.middleware.failures == 2


@pytest_twisted.inlineCallbacks
def test_subscribe_decisions_are_cached_per_subject(make_server, backend, connect):
    decider = yield backend(lambda d: {"allow": d.get("channel") != "no", "reason": "not this one"})
    server = yield make_server(middleware_url=decider.url, middleware_cache=60, jwt_secret=SECRET)
    claims = {"subscribe": ["*"], "publish": ["*"]}
    alice = yield connect(server.port, "/?token=" + token("alice", **claims))
    again = yield connect(server.port, "/?token=" + token("alice", **claims))
    bob = yield connect(server.port, "/?token=" + token("bob", **claims))
    for client in (alice, again, alice):
        assert (yield client.call("SUBSCRIBE", "yes")) == [["subscribe", "yes", 1]]
        assert (yield client.call("SUBSCRIBE", "no")) == [["error", "NOPERM not this one"]]
    assert (yield bob.call("SUBSCRIBE", "yes")) == [["subscribe", "yes", 1]]
    asked = [
        (d["client"]["subject"], d["channel"])
        for d in decider.documents
        if d["event"] == "subscribe"
    ]
    assert asked == [("alice", "yes"), ("alice", "no"), ("bob", "yes")]


@pytest_twisted.inlineCallbacks
def test_bytes_go_as_base64_and_answers_it_cannot_follow_refuse(make_server, backend, connect):
    answers = {
        "raw": {"allow": True, "payload": {"base64": "AP8="}},
        "text": (200, "not json"),
        "vague": {"allow": "yes"},
        "silent": {"allow": False},
        "badb64": {"allow": True, "payload": {"base64": "!!"}},
        "number": {"allow": True, "payload": 5},
    }
    decider = yield backend(lambda d: answers.get(d.get("channel"), {"allow": True}))
    server = yield make_server(middleware_url=decider.url)
    client = yield connect(server.port)
    assert (yield client.call("SUBSCRIBE", "raw")) == [["subscribe", "raw", 1]]
    assert (yield client.call("PUBLISH", "raw", {"base64": "/w=="})) == [
        ["message", "raw", {"base64": "AP8="}],
        ["reply", 1],
    ]
    assert decider.documents[-1]["payload"] == {"base64": "/w=="}
    failed = ["error", "ERR the server's middleware failed; publish refused"]
    for channel in ("text", "vague", "badb64", "number"):
        assert (yield client.call("PUBLISH", channel, "x")) == [failed]
    assert (yield client.call("PUBLISH", "silent", "x")) == [["error", "NOPERM refused"]]
    assert server.factory.middleware.failures == 4


@pytest_twisted.inlineCallbacks
def test_an_answer_past_its_bound_is_not_read_and_refuses(make_server, backend, connect):
    # max_message_size 1,000: an answer may hold 64 KiB and twice that.
    big = {"allow": True, "padding": "x" * 200_000}
    decider = yield backend(lambda d: big if d.get("channel") == "big" else {"allow": True})
    server = yield make_server(middleware_url=decider.url, max_message_size=1000)
    client = yield connect(server.port)
    assert (yield client.call("PUBLISH", "big", "x")) == [
        ["error", "ERR the server's middleware failed; publish refused"]
    ]
    assert (yield client.call("PUBLISH", "small", "x")) == [["reply", 0]]


@pytest.mark.parametrize(
    "url, concurrency, message",
    [
        ("ftp://x/", 1, "must be an http:// or https:// URL"),
        ("http:///nohost", 1, "must be an http:// or https:// URL"),
        ("http://x/", 0, "middleware_concurrency must be at least 1"),
    ],
)
def test_a_bad_url_or_concurrency_stops_the_start_up(url, concurrency, message):
    with pytest.raises(ConfigError, match=message):
        HttpCallback(url, reactor, concurrency)


def test_cached_decisions_expire_and_the_oldest_go_first(monkeypatch):
    from twisted.internet.task import Clock

    from pubsub.policy import http_callback
    from pubsub.policy.middleware import Client

    monkeypatch.setattr(http_callback, "CACHE_SIZE", 2)
    clock = Clock()
    callback = HttpCallback("http://127.0.0.1:1/", clock, cache=10)
    asked = []

    def post(body):
        asked.append(json.loads(body)["channel"])
        return defer.succeed({"allow": True})

    monkeypatch.setattr(callback, "_post", post)
    client = Client("resp", 1, "127.0.0.1:5000")
    for name in (b"a", b"a", b"b", b"c", b"a"):
        callback.on_subscribe(client, "channel", name)
    assert asked == ["a", "b", "c", "a"]  # a was the oldest when c came
    clock.advance(11)
    callback.on_subscribe(client, "channel", b"c")
    assert asked[-1] == "c" and len(callback._cache) == 2
