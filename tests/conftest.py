"""Fixtures shared by every suite: an in-process server on a free loopback port,
and clients for it: WebSocket (``connect``), RESP (``resp_connect``), redis-cli."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.server import Site

from pubsub.core.engine import Engine
from pubsub.operations.config import Settings
from pubsub.operations.service import build_resource, configured_middleware
from pubsub.resp.protocol import RespFactory
from pubsub.web.front import FrontFactory
from tests.support import respclient, wsclient
from tests.support.redis_server import RedisServer, required


class RunningServer:
    """A pub/sub site listening on 127.0.0.1:<port>, built as make_service builds it.

    With ``resp=True`` a RESP port (``resp_port``) shares the engine, the
    settings and /healthz with the WebSocket port, as ``make_service`` does
    when ``resp_port`` is set.
    """

    def __init__(self, settings: Settings, resp: bool = False, middleware=()) -> None:
        self.settings = settings
        self.engine = Engine()
        middleware = [*middleware, *configured_middleware(settings, reactor)]
        self.resource = build_resource(self.engine, settings, middleware)
        self.factory = self.resource.factory
        self.listening = None
        self.resp_factory: RespFactory | None = None
        self.resp_listening = None
        if resp:
            self.resp_factory = RespFactory(self.engine, settings, reactor, middleware)
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
        # As make_service serves it: upgrades go straight to Autobahn.
        site = Site(self.resource, timeout=self.settings.open_handshake_timeout or None)
        self.listening = yield endpoint.listen(FrontFactory(site))
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
    def start(resp=False, middleware=(), **settings):
        server = RunningServer(Settings(**settings), resp=resp, middleware=middleware)
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


def _remembering(connect_client, clients: list):
    """``connect_client``, with every client it opens appended to ``clients``."""

    def open_client(*args, **kwargs):
        d = connect_client(*args, **kwargs)
        d.addCallback(lambda client: clients.append(client) or client)
        return d

    return open_client


@pytest.fixture
def connect():
    """wsclient.connect, with every client it opened dropped after the test."""
    clients: list = []
    yield _remembering(wsclient.connect, clients)
    for client in clients:
        if client.close_info is None:
            client.dropConnection(abort=True)
            pytest_twisted.blockon(client.closed)


@pytest.fixture
def resp_connect():
    """respclient.connect(port, protocol_version=2), a RespClient on the reactor
    (RESP3 with ``protocol_version=3``), with every client it opened dropped
    after the test."""
    clients: list = []
    yield _remembering(respclient.connect, clients)
    for client in clients:
        if not client.closed.called:
            pytest_twisted.blockon(client.abort())


# -- redis-cli ----------------------------------------------------------------------------


@pytest.fixture
def redis(tmp_path):
    """A private redis-server on a free loopback port (tests/support/redis_server.py)
    that a test may kill and start again."""
    server = RedisServer(str(tmp_path))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cli() -> str:
    """The path of redis-cli; a skip (a failure under PUBSUB_REQUIRE_REDIS) without it."""
    return required("redis-cli", "redis-tools")


@pytest.fixture
def redis_cluster(tmp_path):
    """A private Redis Cluster, three primaries with a replica each, on free loopback
    ports (tests/support/redis_cluster.py); every node stops after the test."""
    from tests.support.redis_cluster import RedisCluster

    cluster = RedisCluster(str(tmp_path))
    cluster.start()  # stops every node itself if the cluster does not form
    yield cluster
    cluster.stop()
