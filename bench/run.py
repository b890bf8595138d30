"""The benchmark behind ``make bench``: pubsub (WebSocket JSON) against redis-server (RESP).

For every scenario and round this starts a fresh server on a free 127.0.0.1
port, runs the Node load generator (``bench/loadgen/coordinator.js``) against
it, and stops it; the two servers alternate round by round (pubsub first in
odd rounds, Redis first in even ones).  It then prints, per scenario, the
median of each figure over the rounds for both servers, the ratio
pubsub/Redis, and where each target of issue 4 stands; everything (raw runs,
medians, machine, server logs, profile) goes to ``bench/results/<stamp>/``.

The backplane scenarios (``--only backplane``) run the two fanout shapes on
other kinds instead: one pubsub node alone, two nodes joined by one
redis-server, and two nodes joined by a Redis Cluster (class
:class:`Backplane`), the publisher on node A and the subscribers on node B;
and the two backplanes again with the fanout channel's history in Redis
(``--history-channels fanout``, subscribers that RESUME).  They get two
tables of their own (each kind, and the ratios) and no target.

The history scenario (``fanout_history``) runs the ``fanout_rate50`` load on
two kinds: ``pubsub`` (no history, SUBSCRIBE) and ``pubsub_history``
(``--history-channels fanout``, subscribers that RESUME), with the server's
CPU from its schedstat; beside it, ``history_memory.py`` measures what the
checkout's ``History`` allocates per stored message.  Its own table, no
target.

With ``--profile`` (the default) one extra fanout-pipelined run of pubsub is
sampled with py-spy, and the top functions (self and inclusive time) are
printed and saved.

Standard library only; the numbers are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import history_memory
import hostile

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
COORDINATOR = BENCH / "loadgen" / "coordinator.js"

PAYLOAD = 64

# The backplane scenarios run on these kinds, whatever --servers says: one
# node alone, two nodes over one Redis, and two nodes over a Redis Cluster of
# three primaries with a replica each (class Backplane); then both backplanes
# with the fanout channel's history in their Redis, subscribers that RESUME.
BACKPLANE_KINDS = [
    "pubsub", "backplane", "backplane_cluster", "backplane_history", "backplane_cluster_history",
]  # fmt: skip
BACKPLANE = ("backplane_pipelined", "backplane_rate50")

# The history scenario runs fanout_rate50's load on these kinds: history off
# (plain SUBSCRIBE) and on (the fanout channel keeps a history, subscribers
# RESUME and get positioned messages).  HISTORY_CHANNELS must match the
# channel of the fanout scenario (loadgen/coordinator.js, plan()).
HISTORY_KINDS = ["pubsub", "pubsub_history"]
HISTORY = ("fanout_history",)
HISTORY_CHANNELS = "fanout"
# Scenarios with a table of their own instead of the pubsub/Redis one.
OWN_TABLE = (*BACKPLANE, *HISTORY)

# Ratios pubsub/Redis (or patterns/no patterns) the issue asks us to report against.
REFERENCE_REDIS = {
    "fanout_pipelined": "0.18 us/delivery",
    "fanout_rate50": "6.5 us/delivery, p99 10 ms",
    "channels": "8.7 us/delivery",
    "idle": "10 KB/connection, 9,800 connects/s",
}


# ---------------------------------------------------------------- scenarios


def scenarios(scale: float, seconds: float) -> list[dict]:
    """Every run's load-generator settings; counts times ``scale``, durations times ``seconds``."""

    def n(base: int, least: int = 10) -> int:
        return max(least, round(base * scale))

    fanout_subs = n(1000)
    patterns = {
        "name": "patterns",
        "scenario": "patterns",
        "mode": "pipelined",
        "patterns": n(1000),
        "groups": 10,
        "durationS": 5 * seconds,
        "warmupS": 1 * seconds,
        "pipeline": 512,
        "window": 20_000,
        "maxPublishes": 5_000_000,
    }
    fanouts = [
        {
            "name": "fanout_pipelined",
            "scenario": "fanout",
            "mode": "pipelined",
            "subscribers": fanout_subs,
            "durationS": 8 * seconds,
            "warmupS": 1 * seconds,
            # Replies outstanding, and deliveries published but not yet received.
            "pipeline": 64,
            "window": 200 * fanout_subs,
            "maxPublishes": 200_000,
        },
        {
            "name": "fanout_rate50",
            "scenario": "fanout",
            "mode": "rate",
            "rate": 50,
            "subscribers": fanout_subs,
            "durationS": 12 * seconds,
            "warmupS": 1 * seconds,
        },
    ]
    return [
        *fanouts,
        {
            "name": "channels",
            "scenario": "channels",
            "mode": "pipelined",
            "subscribers": n(10_000),
            "durationS": 8 * seconds,
            "warmupS": 1 * seconds,
            "pipeline": 512,
            "window": 20_000,
            "maxPublishes": 5_000_000,
        },
        patterns,
        # The same publishes with no pattern subscriptions, to price the patterns.
        {**patterns, "name": "nopatterns", "scenario": "nopatterns", "patterns": 0},
        # fanout_rate50 with and without a history on its channel.
        {**fanouts[1], "name": "fanout_history", "kinds": HISTORY_KINDS},
        {
            "name": "idle",
            "scenario": "idle",
            # Connecting processes: one per core the server does not use; more
            # only take the server's core from it (docs/benchmarks.md, idle).
            "workers": max(1, (os.cpu_count() or 2) - 1),
            "subscribers": n(10_000),
            "warmupConnections": 100,
            "settleMs": 1000,
        },
        # The fanout shapes again, the publisher on node A and the subscribers on
        # node B of two nodes joined by one Redis, against one node alone.
        *(
            {
                **fanout,
                "name": "backplane" + fanout["name"].removeprefix("fanout"),
                "kinds": BACKPLANE_KINDS,
                # Node B subscribes in Redis on its first subscriber; a pause
                # before publishing leaves time for the answer ("lost" would
                # count what came before it).
                "settleMs": 1000,
            }
            for fanout in fanouts
        ),
    ]


# ------------------------------------------------------------------ servers


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: bound all at once, since one bind at a
    time the kernel may hand out the same port again."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float) -> None:
    limit = time.monotonic() + seconds
    while time.monotonic() < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {seconds} s")


class Server:
    """One fresh server process for one run; a context manager that always stops it."""

    def __init__(
        self, kind: str, args: argparse.Namespace, log: Path, workdir: Path, hostile: bool = False
    ) -> None:
        self.kind = kind
        self.port = free_port()
        # Extra settings for the load generator's config (run_loadgen).
        self.loadgen_options: dict = {}
        # RESP's port: Redis's own, or pubsub's --resp-port for the hostile scenario.
        self.resp_port: int | None = self.port if kind == "redis" else None
        self.backplane: subprocess.Popen | None = None
        workers = int(kind.removeprefix("workers")) if kind.startswith("workers") else 0
        if workers:
            # pubsub-cluster's N workers, joined by a redis-server of their own.
            redis_port = free_port()
            self.backplane = subprocess.Popen(
                [
                    args.redis_server, "--save", "", "--appendonly", "no",
                    "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(workdir),
                ],
                cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_for_port(redis_port, self.backplane, 30)
            cmd = [
                args.cluster, "--workers", str(workers),
                "--port", f"tcp:{self.port}:interface=127.0.0.1",
                "--max-connections", "20000",
                "--backplane", f"redis://127.0.0.1:{redis_port}/",
            ]  # fmt: skip
        elif kind in ("pubsub", "pubsub_history"):
            cmd = [
                args.twistd, "-n", "--pidfile=", "pubsub",
                "--port", f"tcp:{self.port}:interface=127.0.0.1",
                # The idle scenario holds 10,000 subscribers plus warm-up ones.
                "--max-connections", "20000",
            ]  # fmt: skip
            if kind == "pubsub_history":
                # The default bounds (100 messages, 300 s) keep the last two
                # seconds at 50 publishes/s: every publish is stored, and from
                # the 101st on one is dropped too, as in steady use.
                cmd += ["--history-channels", HISTORY_CHANNELS]
                # Its subscribers RESUME instead of SUBSCRIBE (loadgen option).
                self.loadgen_options["resume"] = True
            if hostile:
                self.resp_port = free_port()
                cmd += ["--resp-port", f"tcp:{self.resp_port}:interface=127.0.0.1"]
                # No WebSocket pings: a trickling attacker cannot answer one in the
                # middle of its frame, and a slow trickle outlasts ping_timeout.
                cmd += ["--ping-interval", "0"]
        else:
            cmd = [
                args.redis_server, "--save", "", "--appendonly", "no",
                "--port", str(self.port), "--bind", "127.0.0.1",
                "--maxclients", "15000", "--dir", str(workdir), "--daemonize", "no",
            ]  # fmt: skip
        self.cmd = cmd
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_for_port(self.port, self.proc, 30)
            if self.resp_port is not None:
                wait_for_port(self.resp_port, self.proc, 30)
            if workers:
                self._wait_for_workers(log, workers)
        except BaseException:
            self.stop()
            raise
        self.pid = self.proc.pid

    def _wait_for_workers(self, log: Path, workers: int) -> None:
        """The parent listens at once; wait until every worker joined the backplane."""
        start = log.stat().st_size if log.exists() else 0
        limit = time.monotonic() + 60
        while time.monotonic() < limit:
            self._log.flush()
            with log.open("rb") as stream:
                stream.seek(start)
                if stream.read().count(b"backplane: connected to") >= workers:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"pubsub-cluster exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"{workers} workers did not join the backplane within 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.backplane is not None and self.backplane.poll() is None:
            self.backplane.terminate()
            self.backplane.wait(15)
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Backplane:
    """Two pubsub nodes joined by one redis-server of their own, or by a Redis
    Cluster of their own (``kind`` "backplane_cluster": three primaries with a
    replica each), for one run.

    Node B (``port``, ``pid``) holds the subscribers, node A (``publish_port``)
    the publisher, so every delivery goes node A -> Redis -> node B.  Each is
    its own process; ``other_pids`` names them all for their CPU time (the
    cluster's nodes as ``redis``, ``redis_1``, ...).
    """

    def __init__(
        self, args: argparse.Namespace, outdir: Path, workdir: Path, kind: str = "backplane"
    ) -> None:
        self.kind = kind
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs = []
        history = kind.endswith("_history")
        cluster = kind.removesuffix("_history") == "backplane_cluster"
        # Extra settings for the load generator's config (run_loadgen).
        self.loadgen_options: dict = {"resume": True} if history else {}
        try:
            if cluster:
                url = self._start_cluster(args, outdir, workdir)
            else:
                redis_port = free_port()
                self._start(
                    "redis",
                    [
                        args.redis_server, "--save", "", "--appendonly", "no",
                        "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(workdir),
                        "--daemonize", "no",
                    ],
                    redis_port, outdir / "backplane-redis.log", workdir,
                )  # fmt: skip
                url = f"redis://127.0.0.1:{redis_port}/"
            ports = {}
            logs = {}
            for node in ("node_a", "node_b"):
                ports[node] = free_port()
                logs[node] = outdir / f"backplane-{node}.log"
                start = logs[node].stat().st_size if logs[node].exists() else 0
                self._start(
                    node,
                    [
                        args.twistd, "-n", "--pidfile=", "pubsub",
                        "--port", f"tcp:{ports[node]}:interface=127.0.0.1",
                        "--max-connections", "20000",
                        "--backplane", url,
                        *(["--history-channels", HISTORY_CHANNELS] if history else []),
                    ],
                    ports[node], logs[node], workdir,
                )  # fmt: skip
                self._wait_for_backplane(node, logs[node], start, cluster)
            if cluster:
                for node in ("node_a", "node_b"):
                    self._wait_for_no_broadcast(ports[node])
        except BaseException:
            self.stop()
            raise
        self.port = ports["node_b"]
        self.publish_port = ports["node_a"]
        self.pid = self.procs["node_b"].pid
        self.other_pids = {name: proc.pid for name, proc in self.procs.items()}

    def _start(self, name: str, cmd: list[str], port: int, log: Path, workdir: Path) -> None:
        stream = log.open("ab")
        self._logs.append(stream)
        self.procs[name] = subprocess.Popen(
            cmd, cwd=workdir, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        wait_for_port(port, self.procs[name], 30)

    def _start_cluster(self, args: argparse.Namespace, outdir: Path, workdir: Path) -> str:
        """Six cluster-mode redis-servers, made a cluster by ``redis-cli --cluster
        create``; the backplane URL naming two of them, once every node says ok."""
        every = free_ports(12)  # the six nodes' ports and their cluster-bus ports
        ports, bus_ports = every[:6], every[6:]
        for i, port in enumerate(ports):
            home = workdir / f"cluster-{port}"
            home.mkdir()
            self._start(
                "redis" if i == 0 else f"redis_{i}",
                [
                    args.redis_server, "--save", "", "--appendonly", "no",
                    "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home),
                    "--daemonize", "no", "--cluster-enabled", "yes",
                    "--cluster-port", str(bus_ports[i]), "--cluster-node-timeout", "2000",
                    # Replicas in sync at once (see tests/support/redis_cluster.py).
                    "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1",
                ],
                port, outdir / "backplane-cluster.log", workdir,
            )  # fmt: skip
        cli = shutil.which("redis-cli", path=str(Path(args.redis_server).parent)) or "redis-cli"
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-500:]}")
        limit = time.monotonic() + 60
        while time.monotonic() < limit:
            infos = [command_output([cli, "-p", str(p), "cluster", "info"]) for p in ports]
            if all("cluster_state:ok" in info for info in infos):
                return f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/"
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ok within 60 s")

    def _wait_for_no_broadcast(self, port: int) -> None:
        """Until a node has listened to the census long enough (a few seconds),
        it sends every publish cluster-wide too, for patterns it may not know
        of; the run measures the steady state, with no pattern anywhere."""
        limit = time.monotonic() + 30
        while time.monotonic() < limit:
            url = f"http://127.0.0.1:{port}/healthz"
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(url, timeout=2) as response,
            ):
                if json.load(response)["backplane"]["broadcast"] is False:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the node on {port} still broadcasts after 30 s")

    def _wait_for_backplane(self, node: str, log: Path, start: int, cluster: bool) -> None:
        # One Redis: "connected to redis://..."; a cluster says it for the whole
        # once every shard is up: "connected to redis+cluster://... (3 shards)".
        ready = b"shards)" if cluster else b"backplane: connected to"
        limit = time.monotonic() + 30
        while time.monotonic() < limit:
            with log.open("rb") as stream:
                stream.seek(start)
                if ready in stream.read():
                    return
            if self.procs[node].poll() is not None:
                raise RuntimeError(f"{node} exited with {self.procs[node].returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"{node} did not join the backplane within 30 s")

    def stop(self) -> None:
        # The nodes first, so that neither sees its Redis go away.
        for name in ("node_a", "node_b", *(n for n in self.procs if n.startswith("redis"))):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in self._logs:
            stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    kind: str, spec: dict, args: argparse.Namespace, outdir: Path, workdir: Path
) -> Server | Backplane:
    """A fresh server of ``kind`` for one run: a :class:`Server` or a :class:`Backplane`."""
    if kind.startswith("backplane"):
        return Backplane(args, outdir, workdir, kind)
    server = Server(kind, args, outdir / f"{kind}.log", workdir)
    if spec["name"] in BACKPLANE:
        # The one node is node A and node B at once; read its CPU as theirs are.
        server.other_pids = {"node_b": server.pid}
    elif spec["name"] in HISTORY:
        # Its CPU in ns from schedstat too (history_figures), finer than ticks.
        server.other_pids = {"server": server.pid}
    return server


def backplane_figures(result: dict, kind: str) -> None:
    """CPU per publish, message and delivery of each process of a backplane run, in place.

    On one node alone that node is both A and B: its CPU is counted as node B's.
    """
    published = result.get("published") or 0
    deliveries = result.get("deliveries") or 0
    window = result.get("window_s") or 0
    cpu = {name: result.get(f"cpu_ns_{name}") for name in ("node_a", "redis", "node_b")}
    # A Redis Cluster's nodes (redis, redis_1, ...) count as one Redis.
    for prefix in ("cpu_ns_redis", "idle_ns_per_s_redis"):
        cluster = [v for k, v in result.items() if k.startswith(prefix + "_")]
        if cluster and result.get(prefix) is not None:
            result[prefix] += sum(cluster)
    cpu = {name: result.get(f"cpu_ns_{name}") for name in ("node_a", "redis", "node_b")}
    if deliveries:
        result["positioned_pct"] = 100 * (result.get("positioned") or 0) / deliveries
    if not (published and deliveries and window) or cpu["node_b"] is None:
        return
    if cpu["node_a"] is not None:
        result["node_a_us_per_publish"] = cpu["node_a"] / 1000 / published
    if cpu["redis"] is not None:
        result["redis_us_per_message"] = cpu["redis"] / 1000 / published
    result["node_b_us_per_delivery"] = cpu["node_b"] / 1000 / deliveries
    total = sum(v for v in cpu.values() if v is not None)
    result["total_us_per_delivery"] = total / 1000 / deliveries
    result["total_cpu_cores"] = total / 1e9 / window
    for name, ns in cpu.items():
        if ns is not None:
            result[f"{name}_cpu_pct"] = 100 * ns / 1e9 / window
        idle = result.get(f"idle_ns_per_s_{name}")
        if idle is not None:
            result[f"{name}_idle_pct"] = 100 * idle / 1e9
    if kind.startswith("backplane") and "reply_sum_mismatch" in result:
        # PUBLISH counts node A's own subscribers, none here (docs/protocol.md):
        # the replies must add up to 0, not to the deliveries.
        result["reply_sum_mismatch"] += result.get("expected_total") or 0


def history_figures(result: dict) -> None:
    """The server's CPU per delivery and per publish from its schedstat, in place.

    The ``server_*`` figures are replaced by the same ones from nanoseconds
    (the 10 ms ticks' ones are kept as ``*_ticks``), and ``positioned_pct`` says
    how many deliveries carried a position (100 with history on and RESUME).
    """
    published = result.get("published") or 0
    deliveries = result.get("deliveries") or 0
    window = result.get("window_s") or 0
    ns = result.get("cpu_ns_server")
    if deliveries:
        result["positioned_pct"] = 100 * (result.get("positioned") or 0) / deliveries
    if not (published and deliveries and window) or ns is None:
        return
    for key in ("server_us_per_delivery", "server_us_per_publish", "server_cpu_pct"):
        result[key + "_ticks"] = result.get(key)
    result["server_us_per_delivery"] = ns / 1000 / deliveries
    result["server_us_per_publish"] = ns / 1000 / published
    result["server_cpu_pct"] = 100 * ns / 1e9 / window


# ----------------------------------------------------------------- one run


def run_loadgen(server: Server, spec: dict, args: argparse.Namespace, on_stderr=None) -> dict:
    cfg = {
        # What the load generator speaks: RESP to Redis, WebSocket JSON to the rest.
        "server": "redis" if server.kind == "redis" else "pubsub",
        "port": server.port,
        "serverPid": server.pid,
        "publishPort": getattr(server, "publish_port", server.port),
        "otherPids": getattr(server, "other_pids", {}),
        "clkTck": os.sysconf("SC_CLK_TCK"),
        "payloadLength": PAYLOAD,
        "progressMs": 5,
        "connectConcurrency": args.connect_concurrency,
        "setupTimeoutS": 60,
        "drainTimeoutS": 30,
        "maxRunS": 300,
        **spec,
    }
    cfg["workers"] = args.workers or spec.get("workers", 2)
    cfg.update(getattr(server, "loadgen_options", {}))
    # stdout (the result) goes to a file and stderr to a reader thread, so
    # that no one else competes with the thread for stderr's lines.
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(
            [args.node, str(COORDINATOR), json.dumps(cfg)],
            stdout=stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        errors: list[str] = []

        def pump_stderr() -> None:
            for line in proc.stderr:  # type: ignore[union-attr]
                errors.append(line.rstrip())
                if on_stderr is not None:
                    on_stderr(line)

        reader = threading.Thread(target=pump_stderr, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=cfg["maxRunS"] + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(5)
        stdout.seek(0)
        out = stdout.read()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": "no result from the load generator", "stderr": errors[-20:]}
    result = json.loads(lines[-1])
    if "error" in result:
        result["stderr"] = errors[-20:]
    return result


# ------------------------------------------------------------- the figures

# (key, label, unit, format); a key missing from a scenario's results is skipped.
FIGURES = [
    ("deliveries_per_s", "deliveries/s", "", "{:,.0f}"),
    ("publishes_per_s", "publishes/s", "", "{:,.0f}"),
    ("latency_p50_us", "latency p50", "ms", "ms"),
    ("latency_p99_us", "latency p99", "ms", "ms"),
    ("lost", "lost messages", "", "{:,.0f}"),
    ("server_us_per_delivery", "server CPU/delivery", "us", "{:.3f}"),
    ("server_us_per_publish", "server CPU/publish", "us", "{:.2f}"),
    ("server_cpu_pct", "server CPU busy", "%", "{:.0f}"),
    ("bytes_per_connection", "server memory/connection", "KB", "kb"),
    ("connects_per_s", "connects/s", "", "{:,.0f}"),
    ("server_us_per_connect", "server CPU/connect", "us", "{:.1f}"),
    ("listen_drops", "listen queue drops", "", "{:,.0f}"),
    ("positioned_pct", "deliveries carrying a position", "%", "{:.0f}"),
    ("node_a_us_per_publish", "node A CPU/publish (reads, relays to Redis)", "us", "{:.2f}"),
    ("redis_us_per_message", "Redis CPU/message", "us", "{:.2f}"),
    ("node_b_us_per_delivery", "node B CPU/delivery (one node: all its CPU)", "us", "{:.3f}"),
    ("total_us_per_delivery", "total CPU/delivery, node A + Redis + node B", "us", "{:.3f}"),
    ("node_a_cpu_pct", "node A CPU busy", "%", "{:.0f}"),
    ("redis_cpu_pct", "Redis CPU busy", "%", "{:.0f}"),
    ("node_b_cpu_pct", "node B CPU busy (one node: the node)", "%", "{:.0f}"),
    ("node_a_idle_pct", "node A CPU busy, idle before publishing", "%", "{:.1f}"),
    ("redis_idle_pct", "Redis CPU busy, idle before publishing", "%", "{:.1f}"),
    ("node_b_idle_pct", "node B CPU busy, idle before publishing", "%", "{:.1f}"),
    ("loadgen_cores", "load generator CPU", "cores", "{:.2f}"),
    ("loadgen_max_process_pct", "busiest load-gen process", "%", "{:.0f}"),
]

_LOAD = ["server_cpu_pct", "loadgen_cores", "loadgen_max_process_pct"]
_PER_DELIVERY = ["deliveries_per_s", "latency_p50_us", "latency_p99_us", "lost",
                 "server_us_per_delivery", *_LOAD]  # fmt: skip
_PER_PUBLISH = ["publishes_per_s", "latency_p50_us", "latency_p99_us", "lost",
                "server_us_per_publish", *_LOAD]  # fmt: skip

_BACKPLANE_FIGURES = [
    "deliveries_per_s", "latency_p50_us", "latency_p99_us", "lost",
    "node_a_us_per_publish", "redis_us_per_message", "node_b_us_per_delivery",
    "total_us_per_delivery", "node_a_cpu_pct", "redis_cpu_pct", "node_b_cpu_pct",
    "node_a_idle_pct", "redis_idle_pct", "node_b_idle_pct", "positioned_pct",
    "loadgen_cores", "loadgen_max_process_pct",
]  # fmt: skip

PER_SCENARIO = {
    "fanout_pipelined": _PER_DELIVERY,
    "fanout_rate50": _PER_DELIVERY,
    "channels": _PER_DELIVERY,
    "patterns": _PER_PUBLISH,
    "nopatterns": _PER_PUBLISH,
    **{name: _BACKPLANE_FIGURES for name in BACKPLANE},
    "fanout_history": [
        "deliveries_per_s", "latency_p50_us", "latency_p99_us", "lost",
        "server_us_per_delivery", "server_us_per_publish", "server_cpu_pct", "positioned_pct",
        "loadgen_cores", "loadgen_max_process_pct",
    ],
    "idle": [
        "bytes_per_connection", "connects_per_s", "server_us_per_connect", "listen_drops",
        "server_cpu_pct", "loadgen_cores", "loadgen_max_process_pct",
    ],
}  # fmt: skip


def fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    style = next(f[3] for f in FIGURES if f[0] == key)
    if style == "ms":
        return f"{value / 1000:.2f}"
    if style == "kb":
        return f"{value / 1024:.1f}"
    return style.format(value)


def label(key: str) -> str:
    _, name, unit, _ = next(f for f in FIGURES if f[0] == key)
    return f"{name} ({unit})" if unit else name


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None and "error" not in r]
    return statistics.median(values) if values else None


def medians(results: dict) -> dict:
    """{scenario: {server: {key: median}}}"""
    out: dict = {}
    for name, by_server in results.items():
        out[name] = {}
        for server, runs in by_server.items():
            out[name][server] = {key: median_of(runs, key) for key in PER_SCENARIO[name]}
            out[name][server]["runs_ok"] = sum(1 for r in runs if "error" not in r)
            out[name][server]["lost_total"] = sum(r.get("lost", 0) or 0 for r in runs)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def targets(med: dict) -> list[tuple[str, str, float | None, str]]:
    """(target, measured, value, met/missed) for each target of the issue."""

    def get(name: str, server: str, key: str) -> float | None:
        return med.get(name, {}).get(server, {}).get(key)

    rows = []

    def check(text: str, value: float | None, limit: float, at_most: bool) -> None:
        if value is None:
            rows.append((text, "-", None, "not measured"))
            return
        ok = value <= limit if at_most else value >= limit
        if ok:
            verdict = "met"
        elif at_most:
            verdict = f"missed by {value / limit:.1f}x"
        else:
            verdict = f"missed by {limit / value:.1f}x"
        rows.append((text, f"{value:.2f}", value, verdict))

    def r(name: str, key: str) -> float | None:
        return ratio(get(name, "pubsub", key), get(name, "redis", key))

    for text, name, key, limit in (
        (
            "fanout pipelined: CPU/delivery <= 4x Redis",
            "fanout_pipelined",
            "server_us_per_delivery",
            4,
        ),
        (
            "fanout 50 pub/s: CPU/delivery <= 1.5x Redis",
            "fanout_rate50",
            "server_us_per_delivery",
            1.5,
        ),
        ("fanout 50 pub/s: p99 <= 2x Redis", "fanout_rate50", "latency_p99_us", 2),
        ("channels: CPU/delivery <= 3x Redis", "channels", "server_us_per_delivery", 3),
        ("idle: memory/connection <= Redis", "idle", "bytes_per_connection", 1),
    ):
        check(text, r(name, key), limit, True)
    check("idle: connects/s >= 0.5x Redis", r("idle", "connects_per_s"), 0.5, False)
    with_patterns = get("patterns", "pubsub", "server_us_per_publish")
    without = get("nopatterns", "pubsub", "server_us_per_publish")
    check(
        "patterns: CPU/publish with 1,000 patterns <= 2x without",
        ratio(with_patterns, without),
        2,
        True,
    )
    lost = sum(
        med[name][server]["lost_total"]
        for name in med
        if name not in OWN_TABLE
        for server in med[name]
    )
    verdict = "met" if lost == 0 else "missed"
    rows.append(("lost messages = 0 (all runs, both servers)", f"{lost:,}", lost, verdict))
    return rows


def table(med: dict, servers: list[str]) -> str:
    lines = []
    both = "pubsub" in servers and "redis" in servers
    header = (
        "| scenario | figure | " + " | ".join(servers) + (" | pubsub/Redis |" if both else " |")
    )
    rule = "|---|---|" + "---:|" * len(servers) + ("---:|" if both else "")
    lines += [header, rule]
    for name, keys in PER_SCENARIO.items():
        if name not in med or name in OWN_TABLE:
            continue
        for key in keys:
            values = [med[name].get(s, {}).get(key) for s in servers]
            row = f"| {name} | {label(key)} | " + " | ".join(fmt(key, v) for v in values)
            if both:
                q = ratio(values[0], values[1])
                row += " | " + (f"{q:.2f}" if q is not None else "-")
            lines.append(row + " |")
    if "patterns" in med and "nopatterns" in med:
        for s in servers:
            q = ratio(
                med["patterns"].get(s, {}).get("server_us_per_publish"),
                med["nopatterns"].get(s, {}).get("server_us_per_publish"),
            )
            qs = f"{q:.2f}" if q is not None else "-"
            lines.append(f"| patterns/nopatterns | {s}: CPU per publish, ratio | {qs} | | |")
    return "\n".join(lines)


def comparison_table(
    med: dict,
    results: dict,
    names: tuple[str, ...],
    kinds: dict[str, str],
    ratios: dict[str, tuple[str, str]],
) -> str:
    """Each figure of scenarios ``names`` on ``kinds`` ({kind: column}) and
    ``ratios`` ({column: (kind, kind divided by)}), then the messages lost."""
    lines = [
        "| scenario | figure | " + " | ".join([*kinds.values(), *ratios]) + " |",
        "|---|---|" + "---:|" * (len(kinds) + len(ratios)),
    ]
    for name in names:
        if name not in med:
            continue
        for key in PER_SCENARIO[name]:
            values = {kind: med[name].get(kind, {}).get(key) for kind in kinds}
            shares = key not in ("lost", "positioned_pct") and not key.endswith("_idle_pct")
            qs = [ratio(values[a], values[b]) if shares else None for a, b in ratios.values()]
            cells = [fmt(key, v) for v in values.values()]
            cells += [f"{q:.2f}" if q is not None else "" for q in qs]
            lines.append(f"| {name} | {label(key)} | " + " | ".join(cells) + " |")
        lost = sum(med[name][k]["lost_total"] for k in kinds if k in med[name])
        runs = sum(len(results[name].get(k, [])) for k in kinds)
        blank = " |" * (len(kinds) + len(ratios) - 1)
        lines.append(f"| {name} | lost messages, all {runs} runs | {lost:,} |{blank}")
    return "\n".join(lines)


def backplane_table(med: dict, results: dict) -> str:
    """One node alone, two nodes over one Redis and over a Redis Cluster, and the ratios."""
    one, two, cluster, _, _ = BACKPLANE_KINDS
    return comparison_table(
        med,
        results,
        BACKPLANE,
        {one: "one node", two: "two nodes over Redis", cluster: "two nodes over a Redis Cluster"},
        {"Redis / one node": (two, one), "Cluster / Redis": (cluster, two)},
    )


def backplane_history_table(med: dict, results: dict) -> str:
    """Both backplanes without and with the channel's history in Redis, and the ratios."""
    _, two, cluster, two_history, cluster_history = BACKPLANE_KINDS
    return comparison_table(
        med,
        results,
        BACKPLANE,
        {
            two: "over Redis",
            two_history: "over Redis, history",
            cluster: "over a Cluster",
            cluster_history: "over a Cluster, history",
        },
        {"Redis: on/off": (two_history, two), "Cluster: on/off": (cluster_history, cluster)},
    )


def history_table(med: dict, results: dict) -> str:
    """fanout_rate50's load with history off and on, and the ratio on/off."""
    off, on = HISTORY_KINDS
    return comparison_table(
        med,
        results,
        HISTORY,
        {off: "history off (SUBSCRIBE)", on: "history on (RESUME)"},
        {"on/off": (on, off)},
    )


def history_memory_lines(memory: dict) -> list[str]:
    if "error" in memory:
        return [f"History memory: not measured: {memory['error']}"]
    allocated = memory["allocated_bytes_per_message"]
    marginal = memory["marginal_bytes_per_message"]
    counted = memory["counted_bytes_per_message"]
    overhead = memory["message_overhead"]
    grown = memory["rss_bytes_per_message"]
    return [
        (
            f"History memory ({memory['payload_bytes']}-byte payloads over "
            f"{memory['channels']} channels, nothing dropped; {memory['module']}):"
        ),
        "",
        "| bytes per stored message | | / counted |",
        "|---|---:|---:|",
        (
            f"| tracemalloc, {memory['messages']:,} messages, the streams included "
            f"| {allocated:.1f} | {allocated / counted:.2f} |"
        ),
        f"| tracemalloc, each message after a channel's first | {marginal:.1f} | "
        + f"{marginal / counted:.2f} |",
        (
            f"| VmRSS growth, {memory['rss_messages']:,} messages, a fresh process "
            f"| {grown:.1f} | {grown / counted:.2f} |"
        ),
        f"| counted by the history (payload + MESSAGE_OVERHEAD {overhead}) | {counted:.1f} | |",
    ]


# ------------------------------------------------------------------ machine


def command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


_VERSIONS = (
    "import sys, importlib.metadata as m; "
    "print(sys.version.split()[0], m.version('twisted'), m.version('autobahn'))"
)


def machine(args: argparse.Namespace) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    venv_python = Path(args.twistd).with_name("python")
    versions = command_output(
        [
            str(venv_python),
            "-c",
            _VERSIONS,
        ]
    ).split()
    commit = command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "pubsub"])
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else "?",
        "memory_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": versions[0] if versions else "?",
        "twisted": versions[1] if len(versions) > 1 else "?",
        "autobahn": versions[2] if len(versions) > 2 else "?",
        "redis": command_output([args.redis_server, "--version"]),
        "node": command_output([args.node, "--version"]),
        "commit": commit + (" (pubsub/ modified)" if dirty else ""),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        if hard < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    new = min(max(soft, want), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


# ------------------------------------------------------------------ profile


def profile(args: argparse.Namespace, spec: dict, outdir: Path, workdir: Path) -> dict | None:
    """One fanout-pipelined pubsub run sampled by py-spy over the publishing window."""
    py_spy = shutil.which("py-spy", path=str(Path(args.twistd).parent)) or shutil.which("py-spy")
    if not py_spy:
        print("profile skipped: py-spy not found (pip install py-spy)", file=sys.stderr)
        return None
    raw = outdir / f"profile-{spec['name']}.txt"
    spec = {**spec, "durationS": args.profile_seconds}
    holder: dict = {}
    with Server("pubsub", args, outdir / "pubsub-profile.log", workdir) as server:

        def on_stderr(line: str) -> None:
            if "measure start" in line and "spy" not in holder:
                holder["spy"] = subprocess.Popen(
                    [
                        py_spy, "record", "--pid", str(server.pid), "--rate", "250",
                        "--duration", str(max(1, int(args.profile_seconds) - 1)),
                        "--format", "raw", "--output", str(raw), "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip

        result = run_loadgen(server, spec, args, on_stderr=on_stderr)
        spy = holder.get("spy")
        if spy is None:
            print(f"profile failed: the run never started measuring: {result}", file=sys.stderr)
            return None
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    if not raw.exists():
        print(f"profile failed: py-spy wrote nothing: {err.strip()[-500:]}", file=sys.stderr)
        return None
    summary = summarize_profile(raw)
    summary["scenario"] = spec["name"]
    summary["run"] = {
        k: result.get(k)
        for k in (
            "server_us_per_delivery",
            "server_us_per_publish",
            "deliveries_per_s",
            "server_cpu_pct",
        )
    }
    (outdir / "profile-summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# Where a delivery's time goes, by the functions that mark each stage.
_LANDMARKS = [
    ("LeanReader.dataReceived", "incoming frames: parse, unmask, dispatch (all below)"),
    ("WebSocketProtocol.processData", "frames left to Autobahn (control, fragments, ...)"),
    ("PubSubServerProtocol._handle", "one command: JSON decode, execute, reply"),
    ("Engine.publish", "the publish: channel lookup and fan-out"),
    ("PubSubServerProtocol.deliver", "one delivery: state check, outbox append"),
    ("Flusher.flush", "per reactor turn: each outbox to its socket"),
    ("send_now", "the send() system call, or Twisted's buffer when busy"),
    ("FileDescriptor.doWrite", "the socket became writable: Twisted sends what it held"),
    ("EPollReactor.doPoll", "everything run from the event loop"),
]
_TRUNK = re.compile(
    r"\((twistd|twisted/(application|scripts)/.*|twisted/python/(log|context)\.py)\)$"
    r"|^(ReactorBase\.(run|mainLoop)|_PollLikeMixin\._doReadOrWrite) "
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def summarize_profile(raw: Path, top: int = 15) -> dict:
    """Self and inclusive sample shares by function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ")]
        total += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}
    # The reactor's own frames (twistd, run, mainLoop, logging context) sit
    # under nearly every sample and say nothing.
    telling = [(f, c) for f, c in inclusive.most_common() if not _TRUNK.search(f)]
    landmarks = []
    for name, what in _LANDMARKS:
        share = max((c for f, c in inclusive.items() if f.startswith(name + " ")), default=0)
        landmarks.append((f"{name}: {what}", round(100 * share / total, 1)))
    return {
        "samples": total,
        "landmarks": landmarks,
        "self": [(f, round(100 * c / total, 1)) for f, c in own.most_common(top)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in telling[: top + 5]],
    }


# ------------------------------------------------------------------ hostile


def run_hostile(
    kind: str,
    rnd: int,
    args: argparse.Namespace,
    specs: list[dict],
    results: dict,
    outdir: Path,
    workdir: Path,
) -> None:
    """Every hostile case on one fresh server (pubsub with a RESP port, or Redis)."""
    t = time.monotonic()
    try:
        with Server(kind, args, outdir / f"{kind}-hostile.log", workdir, hostile=True) as server:
            ports = {"resp": server.resp_port}
            if kind == "pubsub":
                ports["ws"] = server.port
            runs = hostile.run_cases(kind, server.pid, ports, specs)
    except (RuntimeError, OSError) as error:
        runs = [
            {"case": c["name"], "error": f"server: {error}"}
            for c in specs
            if kind == "pubsub" or c["proto"] == "resp"
        ]
    for r in runs:
        r["round"] = rnd
        results[r["case"]][kind].append(r)
        brief = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in r.items()
            if k in ("bytes", "writes", "cpu_ms", "cpu_us_per_byte", "ping_max_ms", "error")
        }
        print(f"round {rnd} hostile {r['case']:<15} {kind:<6} {json.dumps(brief)}", flush=True)
    print(f"round {rnd} hostile {kind}: {time.monotonic() - t:.1f}s", flush=True)


# --------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every count")
    parser.add_argument(
        "--seconds", type=float, default=None,
        help="multiplies every duration [default: 1, or 0.3 when --scale < 1]",
    )  # fmt: skip
    parser.add_argument(
        "--only", default="",
        help=(
            "comma-separated scenario names; 'hostile' for every hostile case, or case names; "
            "'backplane' for both backplane scenarios; 'fanout_history' for history off and on"
        ),
    )  # fmt: skip
    parser.add_argument(
        "--servers", default="pubsub,redis",
        help="pubsub, redis, and workersN: pubsub-cluster --workers N with a backplane",
    )  # fmt: skip
    parser.add_argument(
        "--workers",
        type=int,
        help="subscriber processes [default: 2; idle: one per core the server does not use]",
    )
    parser.add_argument("--connect-concurrency", type=int, default=32)
    parser.add_argument("--twistd", default=str(ROOT / ".venv" / "bin" / "twistd"))
    parser.add_argument("--cluster", default=str(ROOT / ".venv" / "bin" / "pubsub-cluster"))
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--node", default=shutil.which("node") or "node")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile-seconds", type=float, default=8)
    parser.add_argument("--profile-scenario", default="fanout_pipelined")
    parser.add_argument("--out", default=str(BENCH / "results"))
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = 1.0 if args.scale >= 1 else 0.3

    fd_limit = raise_fd_limit(65536)
    servers = [s for s in args.servers.split(",") if s]
    specs = scenarios(args.scale, args.seconds)
    hostile_specs = hostile.cases(args.scale)
    if args.only:
        wanted = set(args.only.split(","))
        if "backplane" in wanted:
            wanted |= set(BACKPLANE)
        specs = [s for s in specs if s["name"] in wanted]
        if "hostile" not in wanted:
            hostile_specs = [c for c in hostile_specs if c["name"] in wanted]
    # pubsub and Redis only: the workers' parent does not serve the clients itself.
    hostile_servers = [s for s in servers if s in ("pubsub", "redis")] if hostile_specs else []
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out) / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    info = machine(args)
    info["fd_limit"] = fd_limit
    info["command"] = " ".join([Path(sys.executable).name, "bench/run.py", *sys.argv[1:]])
    print(f"bench: {json.dumps(info)}", flush=True)

    results: dict = {s["name"]: {srv: [] for srv in s.get("kinds", servers)} for s in specs}
    hostile_results: dict = {c["name"]: {srv: [] for srv in hostile_servers} for c in hostile_specs}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pubsub-bench-") as tmp:
        workdir = Path(tmp)
        for rnd in range(1, args.rounds + 1):
            order = servers if rnd % 2 else list(reversed(servers))
            for spec in specs:
                kinds = spec.get("kinds", servers)
                for kind in kinds if rnd % 2 else list(reversed(kinds)):
                    t = time.monotonic()
                    try:
                        with start_server(kind, spec, args, outdir, workdir) as server:
                            result = run_loadgen(server, spec, args)
                    except (RuntimeError, OSError) as error:
                        result = {"error": f"server: {error}"}
                    if spec["name"] in BACKPLANE:
                        backplane_figures(result, kind)
                    elif spec["name"] in HISTORY:
                        history_figures(result)
                    result["round"] = rnd
                    results[spec["name"]][kind].append(result)
                    brief = {
                        k: (round(v, 3) if isinstance(v, float) else v)
                        for k, v in result.items()
                        if k in PER_SCENARIO[spec["name"]] or k in ("error", "stderr")
                    }
                    print(
                        f"round {rnd} {spec['name']:<19} {kind:<6} "
                        f"{time.monotonic() - t:5.1f}s {json.dumps(brief)}",
                        flush=True,
                    )
            for kind in [k for k in order if k in hostile_servers]:
                run_hostile(kind, rnd, args, hostile_specs, hostile_results, outdir, workdir)
        prof = None
        if args.profile and "pubsub" in servers:
            named = {s["name"]: s for s in scenarios(args.scale, args.seconds)}
            spec = named.get(args.profile_scenario)
            prof = profile(args, spec, outdir, workdir) if spec else None

    med = medians(results)
    # In-process, after the runs: what the history allocates per stored message.
    wants_memory = any(s["name"] in HISTORY for s in specs)
    memory = history_memory.measure(PAYLOAD) if wants_memory else None
    main_specs = [s for s in specs if s["name"] not in OWN_TABLE]
    backplane_specs = [s for s in specs if s["name"] in BACKPLANE]
    summary = table(med, servers) if main_specs else ""
    checks = targets(med) if main_specs and set(servers) >= {"pubsub", "redis"} else []
    machine_line = (
        f"Machine: {info['nproc']} CPUs ({info['cpu_model']}), {info['memory_gib']} GiB, "
        f"Linux {info['kernel']}; Python {info['python']} (Twisted {info['twisted']}, "
        f"Autobahn {info['autobahn']}); {info['redis']}; Node {info['node']}"
    )
    run_line = (
        f"Date: {info['date']}; commit {info['commit']}; rounds {args.rounds}, "
        f"scale {args.scale}, durations x{args.seconds}; total {time.monotonic() - started:.0f} s"
    )
    if Path(args.twistd) != ROOT / ".venv" / "bin" / "twistd":
        run_line += f"; pubsub from {args.twistd}"
    report = [machine_line, run_line]
    if main_specs:
        report += ["", "Medians over the rounds (latency in ms, memory in KB):", "", summary]
    if backplane_specs:
        report += [
            "",
            (
                "Backplane (medians; publisher on node A, subscribers on node B, one Redis "
                "or a Redis Cluster between them, whose six processes count as its Redis; "
                "CPU from each process's schedstat):"
            ),
            "",
            backplane_table(med, results),
            "",
            (
                "Backplane with history (the same medians; both backplanes again with "
                f"--history-channels {HISTORY_CHANNELS} and subscribers that RESUME: each "
                "publish is the history's script in Redis, each delivery positioned):"
            ),
            "",
            backplane_history_table(med, results),
        ]
    if any(s["name"] in HISTORY for s in specs):
        report += [
            "",
            (
                "History (medians; fanout_rate50's load on one node, history off against "
                f"--history-channels {HISTORY_CHANNELS} with subscribers that RESUME; server "
                "CPU from its schedstat):"
            ),
            "",
            history_table(med, results),
        ]
    if memory is not None:
        report += ["", *history_memory_lines(memory)]
    anomalies = Counter()
    for by_server in results.values():
        for runs in by_server.values():
            for r in runs:
                for key in ("errors", "gaps", "disorder", "closes", "reply_sum_mismatch"):
                    anomalies[key] += abs(r.get(key) or 0)
                anomalies["failed runs"] += "error" in r
    if specs:
        report += [
            "",
            "Across all runs: " + ", ".join(f"{k} {v:,}" for k, v in anomalies.items()),
        ]
    if hostile_specs:
        hostile_failed = sum(
            "error" in r for by in hostile_results.values() for rs in by.values() for r in rs
        )
        report += [
            "",
            (
                "Hostile input (medians; server CPU net of the probe's and the idle server's, "
                "see bench/hostile.py):"
            ),
            "",
            hostile.summary(hostile_results, hostile_specs),
            "",
            f"Hostile runs failed: {hostile_failed}",
        ]
    if checks:
        report += ["", "| target | measured ratio | status |", "|---|---:|---|"]
        report += [f"| {t} | {m} | {v} |" for t, m, _, v in checks]
    if prof:
        per = prof["run"].get("server_us_per_delivery") or 0
        title = (
            f"Profile (py-spy, pubsub {prof['scenario']}, {prof['samples']} samples; the run "
            f"under the profiler: {per:.2f} us/delivery, "
            f"{prof['run'].get('server_us_per_publish') or 0:.2f} us/publish, "
            f"{prof['run'].get('server_cpu_pct') or 0:.0f}% server CPU):"
        )
        report += [
            "",
            title,
            "",
            "self time     us/delivery  function",
        ]
        report += [f"  {sh:5.1f}%   {sh * per / 100:8.3f}     {f}" for f, sh in prof["self"]]
        report += ["", "stages        us/delivery  (inclusive time)"]
        report += [f"  {sh:5.1f}%   {sh * per / 100:8.3f}     {f}" for f, sh in prof["landmarks"]]
        report += ["", "inclusive     us/delivery  function"]
        report += [f"  {sh:5.1f}%   {sh * per / 100:8.3f}     {f}" for f, sh in prof["inclusive"]]
    text = "\n".join(report)
    print("\n" + text)
    (outdir / "summary.md").write_text(text + "\n")
    (outdir / "results.json").write_text(
        json.dumps(
            {"machine": info, "args": vars(args), "runs": results, "medians": med,
             "hostile": hostile_results, "history_memory": memory},
            indent=1,
        )
    )  # fmt: skip
    print(f"\nresults in {outdir}")
    failed = sum(
        1
        for by in (*results.values(), *hostile_results.values())
        for runs in by.values()
        for r in runs
        if "error" in r
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
