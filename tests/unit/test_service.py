"""The service around the transports: its bounded shutdown and its JSON log choice."""

from __future__ import annotations

import gc
import io
import json
import sys

import pytest
import pytest_twisted
from twisted.application.service import Application
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from pubsub.backplane.history import PUBLISH_SCRIPT, RedisHistory
from pubsub.operations.config import Settings
from pubsub.operations.service import (
    FULL_COLLECTION_EVERY,
    Options,
    json_log_observer,
    make_service,
    makeService,
)
from tests.unit.test_resp import Transport


def stalled_resp_client(service, clock):
    """A RESP client whose socket never takes what it is sent."""
    protocol = service.resp_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = Transport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_shutdown_cuts_off_clients_still_open_after_the_shutdown_timeout():
    clock = Clock()
    settings = Settings(port="tcp:0", resp_port="tcp:0", shutdown_timeout=2.5)
    service = make_service(settings, reactor=clock)
    protocol, transport = stalled_resp_client(service, clock)
    closed = service._close_connections()
    clock.advance(2.4)
    assert transport.disconnecting and not transport.disconnected  # asked to close, not cut
    assert not closed.called
    clock.advance(0.1)
    assert transport.disconnected  # StringTransport's mark of abortConnection
    protocol.connectionLost(Failure(ConnectionDone()))  # what the reactor then does
    assert closed.called
    assert not clock.getDelayedCalls()


def test_shutdown_waits_as_long_as_clients_need_when_the_timeout_is_off():
    clock = Clock()
    settings = Settings(port="tcp:0", resp_port="tcp:0", shutdown_timeout=0)
    service = make_service(settings, reactor=clock)
    protocol, transport = stalled_resp_client(service, clock)
    closed = service._close_connections()
    clock.advance(3600)
    assert not transport.disconnected and not closed.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closed.called


def test_a_shutdown_that_ends_in_time_leaves_no_timer_behind():
    clock = Clock()
    service = make_service(Settings(port="tcp:0", resp_port="tcp:0"), reactor=clock)
    protocol, _ = stalled_resp_client(service, clock)
    closed = service._close_connections()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closed.called and not clock.getDelayedCalls()


def test_json_logs_are_one_json_object_per_line(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    observer = json_log_observer({"nodaemon": True})  # twistd -n: standard output
    Logger(namespace="test", observer=observer).info("hello {who}", who="there")
    [line] = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["log_format"] == "hello {who}" and event["who"] == "there"


def test_json_logs_go_where_twistd_would_write(tmp_path):
    path = tmp_path / "server.log"
    observer = json_log_observer({"logfile": str(path)})
    Logger(namespace="test", observer=observer).info("to the file")
    assert json.loads(path.read_text())["log_format"] == "to the file"


@pytest.fixture(autouse=True)
def _keep_the_test_processs_collector():
    # makeService tunes the garbage collector of the process it runs in.
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)


def test_twistd_pubsub_runs_fewer_full_collections():
    gc.set_threshold(700, 10, 10)
    options = Options()
    options.parseOptions(["--port", "tcp:0"])
    makeService(options)
    assert gc.get_threshold() == (700, 10, FULL_COLLECTION_EVERY)
    assert FULL_COLLECTION_EVERY > 10


def test_log_format_json_names_the_observer_for_twistd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = Options()
    options.parseOptions(["--port", "tcp:0", "--log-format", "json"])
    service = makeService(options)
    application = Application("pubsub")
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver) is service.log_observer is not None
    plain = Options()
    plain.parseOptions(["--port", "tcp:0"])
    assert makeService(plain).log_observer is None


@pytest_twisted.inlineCallbacks
def test_both_ports_listen_with_the_listen_backlog():
    service = make_service(Settings(port="0", resp_port="0", listen_backlog=300))
    service.privilegedStartService()
    service.startService()
    try:
        ports = yield defer.gatherResults(
            [listener._waitingForPort for listener in service._endpoints]
        )
        assert sorted(port.backlog for port in ports) == [300, 300]
    finally:
        yield service.stopService()


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/", "redis+cluster://127.0.0.1:7000,127.0.0.1:7001/"]
)
def test_with_a_backplane_the_history_is_the_backplanes_in_redis(url):
    settings = Settings(port="tcp:0", backplane=url, history_channels="chat.*")
    service = make_service(settings, reactor=Clock())
    history = service.engine.history
    assert isinstance(history, RedisHistory)
    assert history.keeps(b"chat.1") and not history.keeps(b"news")
    assert (b"SCRIPT", b"LOAD", PUBLISH_SCRIPT) in service.backplane.preamble
