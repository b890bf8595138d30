"""Fixtures shared by every suite: an in-process server on a free loopback port."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.server import Site

from pubsub.config import Settings
from pubsub.engine import Engine
from pubsub.service import build_resource
from tests.support import wsclient


class RunningServer:
    """A pub/sub site listening on 127.0.0.1:<port>, built as make_service builds it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = Engine()
        self.resource = build_resource(self.engine, settings)
        self.factory = self.resource.factory
        self.listening = None

    @property
    def port(self) -> int:
        return self.listening.getHost().port

    def start(self):
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        d = endpoint.listen(Site(self.resource))
        d.addCallback(lambda port: setattr(self, "listening", port))
        return d


@pytest.fixture
def make_server():
    """Start servers with chosen settings; every one stops after the test."""
    servers = []

    @defer.inlineCallbacks
    def start(**settings):
        server = RunningServer(Settings(**settings))
        yield server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        pytest_twisted.blockon(server.listening.stopListening())


@pytest.fixture
def server(make_server):
    """One server with default settings."""
    return pytest_twisted.blockon(make_server())


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
