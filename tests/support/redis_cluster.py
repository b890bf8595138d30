"""Start a private Redis Cluster on free loopback ports for the backplane's cluster tests.

Every node is a :class:`~tests.support.redis_server.RedisServer` with cluster
mode on, in its own subdirectory of the work directory (a node's
``nodes.conf`` is its own), and with its cluster bus on a free port too
(Redis's ``cluster-port``; the default, port + 10000, may be taken or past
65535).  ``redis-cli --cluster create`` assigns the slots and the replicas;
:meth:`RedisCluster.start` then waits until every node agrees.

With ``tls`` (a :class:`~tests.support.redis_server.RedisTLS`), every node
listens on a TLS port only, and its cluster bus and replication speak TLS
too (``tls-cluster``, ``tls-replication``), so CLUSTER SLOTS announces the
TLS ports; a node shows the RedisTLS's client certificate when it connects
to another (``tls-client-cert-file``), and redis-cli speaks TLS with it.

A missing redis-server or redis-cli is a skip, or a failure under
PUBSUB_REQUIRE_REDIS, as in redis_server.py.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import hiredis
import pytest

from tests.support.redis_server import RedisServer, RedisTLS, _binary, _free_ports, required

SLOTS = 16384
POLL = 0.05  # seconds between two looks at the cluster while waiting

# Without these a replica is missing from CLUSTER SLOTS for ~10 s after the
# cluster forms: a primary waits repl-diskless-sync-delay (5 s) before the
# first full sync, and CLUSTER SLOTS leaves out a replica whose replication
# offset is still 0, which it is until the primary's first PING down the
# replication stream (repl-ping-replica-period, 10 s) on an idle cluster.
# A manual failover that gets no votes ends quietly after 5 s (Redis's
# CLUSTER_MF_TIMEOUT): a primary votes for a replica of a given primary at most
# once per 2 * cluster-node-timeout, so failing a shard over and straight back
# is refused.  failover() asks again after this long.
AGAIN = 6.0

QUICK = ("--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1")


def _cluster_tls(tls: RedisTLS) -> list[str]:
    """A node's TLS beyond its port: the cluster bus and replication over TLS,
    and the certificate it shows as their client."""
    return [
        "--tls-cluster",
        "yes",
        "--tls-replication",
        "yes",
        "--tls-client-cert-file",
        tls.client_cert,
        "--tls-client-key-file",
        tls.client_key,
    ]


def _cli() -> str:
    return required("redis-cli", "redis-tools")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(reply: Any) -> dict[str, str]:
    """CLUSTER INFO's or INFO's ``field:value`` lines as a dict."""
    fields = {}
    for line in _text(reply).splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields[name] = value.strip()
    return fields


# One node's CLUSTER SLOTS, normalised: (first slot, last slot, primary port, replica ports).
SlotsView = tuple[tuple[int, int, int, tuple[int, ...]], ...]


def _slots_view(reply: Any) -> SlotsView:
    ranges = []
    for first, last, primary, *replicas in reply:
        ports = tuple(sorted(int(replica[1]) for replica in replicas))
        ranges.append((int(first), int(last), int(primary[1]), ports))
    return tuple(sorted(ranges))


def _covers_all(view: SlotsView) -> bool:
    following = 0
    for first, last, _primary, _replicas in view:
        if first != following:
            return False
        following = last + 1
    return following == SLOTS


class RedisCluster:
    """Three primaries with one replica each (six redis-servers), on loopback.

    ``primaries`` and ``replicas`` (per primary) change the shape;
    ``node_timeout_ms`` is Redis's ``cluster-node-timeout`` (short, so a
    killed primary is failed over quickly); ``options`` go to every
    redis-server; ``tls`` makes every port, bus and link TLS (the module's
    docstring).  Ports are the nodes' client ports throughout (the TLS ones
    with ``tls``).
    """

    def __init__(
        self,
        workdir: str,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        *options: str,
        tls: RedisTLS | None = None,
    ) -> None:
        _binary()
        self.cli = _cli()
        self.tls = tls
        self.workdir = workdir
        self.primary_count = primaries
        self.replica_count = replicas
        self.output = ""  # what redis-cli --cluster create said, for failure messages
        self.nodes: list[RedisServer] = []
        count = primaries * (1 + replicas)
        # Every node's port and cluster-bus port, distinct: a port handed out
        # twice would leave one node unstarted while its twin answers for it.
        ports = _free_ports(2 * count)
        for index in range(count):
            directory = os.path.join(workdir, f"node{index}")
            os.makedirs(directory, exist_ok=True)
            self.nodes.append(
                RedisServer(
                    directory,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    os.path.join(directory, "nodes.conf"),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--cluster-port",
                    str(ports[count + index]),
                    *QUICK,
                    *(_cluster_tls(tls) if tls is not None else ()),
                    *options,
                    tls=tls,
                    port=ports[index],
                )
            )

    # -- set-up -------------------------------------------------------------------------

    def start(self) -> None:
        """Start every node, create the cluster and wait (at most 60 s) until
        every node says cluster_state:ok, every node's CLUSTER SLOTS is the
        same and covers all 16384 slots with each primary's replicas listed,
        and every replica's link to its primary is up."""
        try:
            for node in self.nodes:
                node.start()
            create = subprocess.run(
                [
                    self.cli,
                    *self.cli_options(),
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-replicas",
                    str(self.replica_count),
                    "--cluster-yes",
                ],
                check=False,  # a failure is reported with its output, below
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )
            self.output = create.stdout + create.stderr
            if create.returncode != 0:
                pytest.fail(f"redis-cli --cluster create failed:\n{self.output}")
            self._wait(self._formed, "the cluster did not form")
        except BaseException:
            self.stop()  # no redis-server outlives a failed set-up
            raise

    def _formed(self) -> bool:
        view = self._agreed_view()
        if view is None:
            return False
        if len(view) < self.primary_count or {len(r[3]) for r in view} != {self.replica_count}:
            return False
        owners = {r[2] for r in view}
        if len(owners) != self.primary_count:
            return False
        for port in {p for r in view for p in r[3]}:
            if _info(self.call(port, "INFO", "replication")).get("master_link_status") != "up":
                return False
        return True

    def _agreed_view(self) -> SlotsView | None:
        """The live nodes' common CLUSTER SLOTS if every one says cluster_state:ok,
        they all agree and all slots are covered; None otherwise."""
        views = set()
        for port in self._live():
            info = self.call(port, "CLUSTER", "INFO")
            if isinstance(info, hiredis.ReplyError) or _info(info)["cluster_state"] != "ok":
                return None
            slots = self.call(port, "CLUSTER", "SLOTS")
            if isinstance(slots, hiredis.ReplyError):
                return None
            views.add(_slots_view(slots))
        if len(views) != 1:
            return None
        (view,) = views
        return view if _covers_all(view) else None

    def _wait(
        self, done: Callable[[], bool], what: str, again: Callable[[], None] | None = None
    ) -> None:
        # Polling child processes until they agree: bounded, and test set-up
        # (or a test's own failover), not a wait on the code under test.
        # ``again``, when given, runs every AGAIN seconds that pass undone.
        start = time.monotonic()
        deadline = start + 60
        retry = start + AGAIN
        while not done():
            now = time.monotonic()
            if now > deadline:
                views = []
                for port in self._live():
                    views.append(f"{port}: {self.call(port, 'CLUSTER', 'NODES')!r}")
                pytest.fail(
                    f"{what} within 60 s\nredis-cli --cluster create said:\n{self.output}\n"
                    + "\n".join(views)
                )
            if again is not None and now > retry:
                again()
                retry = now + AGAIN
            time.sleep(POLL)

    def _live(self) -> list[int]:
        return [
            node.port
            for node in self.nodes
            if node.process is not None and node.process.poll() is None
        ]

    def cli_options(self) -> list[str]:
        """What every redis-cli call needs before its own arguments: with ``tls``,
        TLS with the CA and the client certificate; nothing without."""
        if self.tls is None:
            return []
        return [
            "--tls",
            "--cacert",
            self.tls.ca,
            "--cert",
            self.tls.client_cert,
            "--key",
            self.tls.client_key,
        ]

    # -- looking ------------------------------------------------------------------------

    def seeds(self) -> list[int]:
        """Every node's port, for a backplane URL."""
        return [node.port for node in self.nodes]

    def node(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def call(self, port: int, *args: bytes | str, timeout: float = 10) -> Any:
        """One command to the node on ``port``, as RedisServer.call: the reply
        parsed by hiredis, an error reply returned as a hiredis.ReplyError."""
        return self.node(port).call(*args, timeout=timeout)

    def _view(self) -> SlotsView:
        return _slots_view(self.call(self._live()[0], "CLUSTER", "SLOTS"))

    def slot_owner(self, slot: int) -> int:
        """The port of the primary serving ``slot``, by a live node's CLUSTER SLOTS."""
        for first, last, primary, _replicas in self._view():
            if first <= slot <= last:
                return primary
        raise LookupError(f"no node serves slot {slot}")

    def primaries(self) -> list[int]:
        """The ports of the primaries that serve slots, in slot order."""
        return list(dict.fromkeys(primary for _, _, primary, _ in self._view()))

    def replica_of(self, primary_port: int) -> int:
        """The port of (the first of) ``primary_port``'s replicas."""
        for _first, _last, primary, replicas in self._view():
            if primary == primary_port and replicas:
                return replicas[0]
        raise LookupError(f"{primary_port} is not a primary with a replica")

    def slots_of(self, primary_port: int) -> list[tuple[int, int]]:
        """The (first, last) slot ranges ``primary_port`` serves."""
        return [
            (first, last) for first, last, primary, _ in self._view() if primary == primary_port
        ]

    def keyslot(self, name: bytes | str) -> int:
        """CLUSTER KEYSLOT of ``name`` (a key or a shard channel), on any live node."""
        return self.call(self._live()[0], "CLUSTER", "KEYSLOT", name)

    def replicated(self, primary_port: int) -> bool:
        """Whether ``primary_port``'s replica has every write the primary has
        made so far (replication is asynchronous: a crash loses the rest)."""
        written = int(_info(self.call(primary_port, "INFO", "replication"))["master_repl_offset"])
        copy = _info(self.call(self.replica_of(primary_port), "INFO", "replication"))
        return int(copy.get("slave_repl_offset", -1)) >= written

    # -- faults -------------------------------------------------------------------------

    def failover(self, primary_port: int) -> int:
        """CLUSTER FAILOVER on ``primary_port``'s replica, then wait (at most 60 s)
        until every live node's CLUSTER SLOTS shows the replica serving those
        slots, with the former primary as its replica, and the cluster is ok;
        returns the new primary's port.  Asked again while no votes come (see
        AGAIN), so a shard failed over a moment ago takes a few seconds more.

        Subscribers that the former primary held for those slots get a
        ``sunsubscribe`` from Redis 7.0 as it turns into a replica."""
        replica = self.replica_of(primary_port)
        ranges = self.slots_of(primary_port)

        def ask() -> None:
            role = self.call(replica, "ROLE")
            if isinstance(role, list) and role[0] == b"master":
                return  # promoted already; the others have yet to hear it
            reply = self.call(replica, "CLUSTER", "FAILOVER")
            if isinstance(reply, hiredis.ReplyError):
                pytest.fail(f"CLUSTER FAILOVER on {replica} answered {reply}")

        ask()

        def promoted() -> bool:
            view = self._agreed_view()
            if view is None:
                return False
            served = [(first, last) for first, last, owner, under in view if owner == replica]
            demoted = all(primary_port in under for _, _, owner, under in view if owner == replica)
            return demoted and all(r in served for r in ranges)

        self._wait(promoted, f"{replica} did not take over from {primary_port}", again=ask)
        return replica

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``, as a crash."""
        self.node(port).kill()

    def stop(self) -> None:
        """Terminate every node (SIGKILL when one will not go)."""
        for node in self.nodes:
            try:
                node.stop()
            except subprocess.TimeoutExpired:
                node.kill()


@contextmanager
def redis_cluster(
    *options: str,
    primaries: int = 3,
    replicas: int = 1,
    node_timeout_ms: int = 2000,
    tls: RedisTLS | None = None,
) -> Iterator[RedisCluster]:
    """Run a RedisCluster (``options`` for every redis-server, ``tls`` as there)
    in a temporary directory for the duration of the block; every node stops after it."""
    with tempfile.TemporaryDirectory() as workdir:
        cluster = RedisCluster(workdir, primaries, replicas, node_timeout_ms, *options, tls=tls)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
