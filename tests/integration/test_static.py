"""The demo page and /pubsub.js over real HTTP: types, caching, and where they are served."""

from __future__ import annotations

from importlib import resources

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from pubsub.core.engine import Engine
from pubsub.operations.config import Settings
from pubsub.operations.service import build_resource
from tests.support import wsframes

SCRIPT = resources.files("pubsub").joinpath("static/pubsub.js").read_bytes()


def get(url: bytes, headers: dict[bytes, list[bytes]] | None = None, method: bytes = b"GET"):
    return Agent(reactor).request(method, url, Headers(headers or {}))


@pytest_twisted.inlineCallbacks
def test_pubsub_js_is_served_as_a_javascript_module_with_an_etag(server):
    url = b"http://127.0.0.1:%d/pubsub.js" % server.port
    response = yield get(url)
    body = yield readBody(response)
    assert response.code == 200
    assert body == SCRIPT
    headers = response.headers
    assert headers.getRawHeaders(b"content-type") == [b"text/javascript; charset=utf-8"]
    assert headers.getRawHeaders(b"cache-control") == [b"no-cache"]
    [etag] = headers.getRawHeaders(b"etag")
    # Revalidating an unchanged file costs no body.
    again = yield get(url, {b"if-none-match": [etag]})
    assert again.code == 304
    assert (yield readBody(again)) == b""
    stale = yield get(url, {b"if-none-match": [b'"something-else"']})
    assert stale.code == 200 and (yield readBody(stale)) == SCRIPT
    head = yield get(url, method=b"HEAD")
    assert head.code == 200
    assert head.headers.getRawHeaders(b"content-length") == [b"%d" % len(SCRIPT)]


@pytest_twisted.inlineCallbacks
def test_the_demo_page_loads_the_client_beside_it(server):
    response = yield get(b"http://127.0.0.1:%d/" % server.port)
    page = yield readBody(response)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert response.headers.getRawHeaders(b"etag")
    assert b'new URL("pubsub.js"' in page and b"PubSubClient" in page
    # Message text is only ever set as text.
    assert b"innerHTML" not in page and b"insertAdjacentHTML" not in page


class _Raw(Protocol):
    """Collects a response until it ends with the script (or the connection ends)."""

    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(SCRIPT) and not self.done.called:
            self.done.callback(self.received)

    def connectionLost(self, reason=connectionDone) -> None:
        if not self.done.called:
            self.done.callback(self.received)


@pytest_twisted.inlineCallbacks
def test_an_upgrade_request_for_pubsub_js_gets_the_script(server):
    """A reserved path: never a pub/sub connection, even when asked to upgrade."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    raw = yield endpoint.connect(Factory.forProtocol(_Raw))
    raw.transport.write(wsframes.handshake("/pubsub.js"))
    received = yield raw.done
    raw.transport.loseConnection()
    assert received.startswith(b"HTTP/1.1 200")
    assert received.endswith(SCRIPT)
    assert server.engine.client_count == 0


class _Root(Resource):
    """An application's root with nothing else on it."""

    def getChild(self, path: bytes, request) -> Resource:
        return notFound()


@pytest_twisted.inlineCallbacks
def test_mounted_under_a_path_the_client_is_below_it():
    root = _Root()
    root.putChild(b"pubsub", build_resource(Engine(), Settings()))
    listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(root))
    try:
        base = b"http://127.0.0.1:%d/pubsub" % listening.getHost().port
        for page_url in (base, base + b"/"):
            response = yield get(page_url)
            assert b"PubSubClient" in (yield readBody(response))
        response = yield get(base + b"/pubsub.js")
        assert response.code == 200
        assert (yield readBody(response)) == SCRIPT
        response = yield get(b"http://127.0.0.1:%d/pubsub.js" % listening.getHost().port)
        yield readBody(response)
        assert response.code == 404  # nothing of pubsub's outside its mount point
    finally:
        yield listening.stopListening()
