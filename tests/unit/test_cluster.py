"""pubsub-cluster's parent: addresses, sockets and what it does when a worker ends.

The workers themselves run in tests/integration/test_backplane.py; here the
parent runs against a fake reactor that records what it spawns.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet.task import Clock

from pubsub.operations import cluster
from pubsub.operations.cluster import ClusterError, _Cluster, bind_sockets, prepare, tcp_address


class Reactor(Clock):
    """spawnProcess and stop, recorded; callLater from Clock."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict, dict]] = []
        self.stopped = False

    def spawnProcess(self, protocol, executable, args, env, childFDs) -> None:
        protocol.transport = Transport()
        self.spawned.append((protocol, args, env, childFDs))

    def stop(self) -> None:
        self.stopped = True


class Transport:
    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Ended:
    def __init__(self, code: int | None) -> None:
        self.value = type("Exit", (), {"exitCode": code, "signal": None})()


@pytest.mark.parametrize(
    "description, address",
    [
        ("tcp:9000:interface=127.0.0.1", ("127.0.0.1", 9000)),
        ("tcp:port=0:interface=\\:\\:1", ("::1", 0)),
        ("tcp:6380", ("", 6380)),
    ],
)
def test_tcp_addresses_are_read_from_endpoint_strings(description, address):
    assert tcp_address(description) == address


@pytest.mark.parametrize("description", ["ssl:9443:privateKey=k.pem", "unix:/tmp/s", "tcp:x"])
def test_only_plain_tcp_ports_can_be_shared(description):
    with pytest.raises(ClusterError):
        tcp_address(description)


def test_every_worker_gets_its_own_socket_on_one_port():
    sockets = bind_sockets("127.0.0.1", 0, 3)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1
        assert len({sock.fileno() for sock in sockets}) == 3
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_workers_need_a_backplane():
    with pytest.raises(ClusterError, match="workers need a backplane"):
        prepare(["--workers", "2", "--port", "0"])
    with pytest.raises(ClusterError, match="at least 1"):
        prepare(["--workers", "0", "--backplane", "redis://127.0.0.1/"])


def test_each_worker_adopts_its_own_sockets_through_systemd_endpoints():
    workers, arguments, sockets, listening = prepare(
        ["--workers", "2", "--port", "0", "--resp-port", "0", "--backplane", "redis://h/"]
    )
    try:
        assert (workers, arguments[-2:]) == (2, ["--backplane", "redis://h/"])
        assert listening.startswith("WebSocket on 127.0.0.1:")
        reactor = Reactor()
        parent = _Cluster(reactor, arguments, sockets)
        parent.spawn(0)
        parent.spawn(1)
        for number, (_, args, env, fds) in enumerate(reactor.spawned):
            assert args[-4:] == [
                "--port",
                "systemd:domain=INET:name=websocket",
                "--resp-port",
                "systemd:domain=INET:name=resp",
            ]
            assert "--pidfile=" in args
            assert (env["LISTEN_FDS"], env["LISTEN_FDNAMES"]) == ("2", "websocket:resp")
            assert fds[3] == sockets[number][0].fileno()
            assert fds[4] == sockets[number][1].fileno()
    finally:
        for group in sockets:
            for sock in group:
                sock.close()


@pytest.fixture
def two_sockets():
    sockets = bind_sockets("127.0.0.1", 0, 2)
    yield [[sock] for sock in sockets]
    for sock in sockets:
        sock.close()


@pytest.fixture
def two_workers(monkeypatch, two_sockets):
    """(now, reactor, parent): a cluster that has spawned two workers at
    ``now[0]`` on the monotonic clock, which the test moves on."""
    now = [100.0]
    monkeypatch.setattr(cluster.time, "monotonic", lambda: now[0])
    reactor = Reactor()
    parent = _Cluster(reactor, [], two_sockets)
    parent.spawn(0)
    parent.spawn(1)
    return now, reactor, parent


def test_a_worker_that_dies_later_is_restarted(two_workers):
    now, reactor, parent = two_workers
    now[0] += 60
    worker = reactor.spawned[1][0]
    worker.processEnded(Ended(1))
    assert sorted(parent.workers) == [0]
    reactor.advance(1.0)
    assert sorted(parent.workers) == [0, 1]
    assert len(reactor.spawned) == 3
    assert not reactor.stopped


def test_a_worker_that_dies_at_once_stops_everything(two_workers):
    now, reactor, parent = two_workers
    now[0] += 1
    reactor.spawned[0][0].processEnded(Ended(1))
    assert reactor.stopped
    assert parent.exit_code == 1
    # The reactor's shutdown then stops the other worker.
    stopped = parent.stop()
    other = reactor.spawned[1][0]
    assert other.transport.signals == ["TERM"]
    other.processEnded(Ended(0))
    assert stopped.called
    reactor.advance(1.0)
    assert len(reactor.spawned) == 2  # nothing restarted while stopping
