"""Fixtures the integration test modules share."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from pubsub.backplane import RedisBackplane, RedisClusterBackplane, is_cluster_url
from pubsub.backplane.history import RedisHistory
from tests.integration.test_backplane import (
    nodes,  # noqa: F401 - the twistd nodes of a backplane
    wait_for,
)


@pytest.fixture
def make_node(make_server):
    """make_node(backplane URL, **settings): a server in this process (RESP
    port too) whose engine has a backplane on that Redis or Redis Cluster,
    and its history there for ``chat.*``; fires once the backplane is connected."""
    backplanes: list = []

    @defer.inlineCallbacks
    def start(url: str, **settings):
        settings = {"history_channels": "chat.*", **settings}
        server = yield make_server(resp=True, backplane=url, **settings)
        timing = {"clock": reactor, "max_delay": 0.5, "ping_interval": 0.5, "timeout": 3}
        if is_cluster_url(url):
            backplane = RedisClusterBackplane(server.engine, url, refresh_interval=0.5, **timing)
        else:
            backplane = RedisBackplane(server.engine, url, **timing)
        server.engine.history = RedisHistory(
            backplane,
            server.settings.history_globs(),
            server.settings.history_size,
            server.settings.history_ttl,
        )
        server.resource.health.backplane = backplane
        backplane.startService()
        backplanes.append(backplane)
        yield wait_for(lambda: defer.succeed(backplane.state), "connected", "the backplane")
        return server

    yield start
    for backplane in backplanes:
        pytest_twisted.blockon(backplane.stopService())
