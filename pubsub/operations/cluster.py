"""``pubsub-cluster --workers N [twistd pubsub options]``: every core of one machine.

One Python process runs on one core.  This command opens the listening
sockets itself, one per worker and port, all bound to the same address with
``SO_REUSEPORT`` (the kernel spreads new connections across them), then runs
N ``twistd -n pubsub`` workers that adopt their sockets through Twisted's
``systemd:`` endpoint (file descriptors 3 and 4, named ``websocket`` and ``resp``
in ``LISTEN_FDNAMES``).  The
workers are ordinary nodes joined by the backplane, which is therefore
required.

The parent forwards SIGTERM and SIGINT to the workers and exits once they
have.  A worker that dies is restarted after a second; one that dies within
:data:`EARLY_EXIT` seconds of its start (bad settings, Redis refusing
everything) stops the whole command with status 1 rather than loop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python import usage

from pubsub.operations.config import Settings, endpoint_description

__all__ = ["EARLY_EXIT", "bind_sockets", "main", "tcp_address"]

_log = Logger()

#: A worker that exits sooner than this after its start is a fault, not a crash.
EARLY_EXIT = 5.0

#: Seconds the parent waits for the workers to stop before killing them.
STOP_TIMEOUT = 30.0


class ClusterError(Exception):
    """Settings this command cannot run with; the message says why."""


def tcp_address(description: str) -> tuple[str, int]:
    """(interface, port) of a ``tcp:PORT[:interface=...]`` server endpoint string."""
    parts = re.split(r"(?<!\\):", description)
    if parts[0] != "tcp" or len(parts) < 2:
        raise ClusterError(
            f"workers share plain TCP ports only (a number or tcp:...), got {description!r}"
        )
    interface = ""
    port: str | None = None
    for part in parts[1:]:
        key, equals, value = part.partition("=")
        if not equals:
            port = part
        elif key == "port":
            port = value
        elif key == "interface":
            interface = value.replace("\\:", ":")
    if port is None or not port.isdigit():
        raise ClusterError(f"no port number in {description!r}")
    return interface, int(port)


def bind_sockets(
    interface: str, port: int, count: int, backlog: int = Settings.listen_backlog
) -> list[socket.socket]:
    """``count`` listening sockets on one address, sharing it by SO_REUSEPORT,
    each with a queue of ``backlog`` connections (the listen_backlog setting).

    Port 0 binds the first to a free port and the others to the same one.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface, port))
            port = sock.getsockname()[1]
            sock.listen(backlog or 50)  # 0: Twisted's default, as for one node
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise ClusterError(f"cannot listen on {interface or '*'}:{port}: {error}") from None
    return sockets


def _twistd() -> str:
    beside = Path(sys.executable).with_name("twistd")
    return str(beside) if beside.exists() else (shutil.which("twistd") or "twistd")


class _Worker(protocol.ProcessProtocol):
    def __init__(self, cluster: _Cluster, number: int) -> None:
        self.cluster = cluster
        self.number = number
        self.started = time.monotonic()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.cluster.worker_ended(self, reason.value.exitCode, reason.value.signal)


class _Cluster:
    """The parent: spawns, restarts and stops the workers."""

    def __init__(
        self, reactor: Any, arguments: list[str], sockets: list[list[socket.socket]]
    ) -> None:
        self.reactor = reactor
        self.arguments = arguments
        self.sockets = sockets  # per worker: its WebSocket socket, then its RESP socket
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.exit_code = 0

    def spawn(self, number: int) -> None:
        own = self.sockets[number]
        names = ["websocket", "resp"][: len(own)]
        options = ["--port", _adopted(own[0], names[0])]
        if len(own) > 1:
            options += ["--resp-port", _adopted(own[1], names[1])]
        twistd = _twistd()
        # systemd's protocol: the adopting process must see its own pid in
        # LISTEN_PID, which only the shell that execs twistd knows.
        args = ["/bin/sh", "-c", 'export LISTEN_PID=$$; exec "$0" "$@"', twistd, "-n", "--pidfile="]
        args += ["pubsub", *self.arguments, *options]
        env = dict(os.environ, LISTEN_FDS=str(len(own)), LISTEN_FDNAMES=":".join(names))
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        for index, sock in enumerate(own):
            child_fds[3 + index] = sock.fileno()
        worker = _Worker(self, number)
        self.workers[number] = worker
        self.reactor.spawnProcess(worker, "/bin/sh", args, env=env, childFDs=child_fds)
        _log.info("pubsub-cluster: worker {number} started", number=number)

    def worker_ended(self, worker: _Worker, code: int | None, signal: int | None) -> None:
        del self.workers[worker.number]
        if self.stopping:
            return
        lived = time.monotonic() - worker.started
        if lived < EARLY_EXIT:
            _log.error(
                "pubsub-cluster: worker {number} exited (code {code}, signal {signal}) "
                "{lived:.1f} s after it started; stopping",
                number=worker.number,
                code=code,
                signal=signal,
                lived=lived,
            )
            self.exit_code = 1
            self.reactor.stop()
            return
        _log.warn(
            "pubsub-cluster: worker {number} exited (code {code}, signal {signal}); restarting",
            number=worker.number,
            code=code,
            signal=signal,
        )
        self.reactor.callLater(1.0, self._respawn, worker.number)

    def spawn_all(self, count: int) -> None:
        """Workers 0 to ``count`` - 1, once the reactor runs."""
        for number in range(count):
            self.spawn(number)

    def _respawn(self, number: int) -> None:
        if not self.stopping and number not in self.workers:
            self.spawn(number)

    def stop(self) -> defer.Deferred[list[tuple[bool, None]]]:
        """SIGTERM to every worker; fires when all have exited (or were killed)."""
        self.stopping = True
        ended: list[defer.Deferred[None]] = []
        for worker in list(self.workers.values()):
            ended.append(worker.ended)
            _signal(worker, "TERM")
        done = defer.DeferredList(ended)
        timer = self.reactor.callLater(STOP_TIMEOUT, self._kill_all)
        done.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return done

    def _kill_all(self) -> None:
        for worker in list(self.workers.values()):
            _log.error(
                "pubsub-cluster: worker {number} did not stop; killing it", number=worker.number
            )
            _signal(worker, "KILL")


def _signal(worker: _Worker, name: str) -> None:
    # It may have exited meanwhile: then there is nothing to stop.
    transport = worker.transport
    assert transport is not None  # spawnProcess connected it: every listed worker was spawned
    with contextlib.suppress(ProcessExitedAlready):
        # zope.interface methods are declared without self, which mypy reads as
        # one argument too many (no zope plugin here).
        transport.signalProcess(name)  # type: ignore[call-arg, misc]


def _adopted(sock: socket.socket, name: str) -> str:
    domain = "INET6" if sock.family == socket.AF_INET6 else "INET"
    return f"systemd:domain={domain}:name={name}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pubsub-cluster",
        description=(
            "Run N twistd pubsub workers sharing the listening ports, joined by the "
            "backplane. Every other option is a twistd pubsub option (twistd pubsub --help)."
        ),
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes to run [default: the number of CPUs]",
    )
    return parser


def _settings(arguments: list[str]) -> Settings:
    from pubsub.operations.service import Options

    options = Options()
    options.parseOptions(arguments)
    settings: Settings = options.settings
    return settings


def prepare(argv: list[str]) -> tuple[int, list[str], list[list[socket.socket]], str]:
    """Check the command line and open the sockets: (workers, twistd options,
    sockets per worker, what the parent says it listens on)."""
    known, arguments = _parser().parse_known_args(argv)
    if known.workers < 1:
        raise ClusterError(f"--workers must be at least 1, got {known.workers}")
    try:
        settings = _settings(arguments)
    except usage.UsageError as error:
        raise ClusterError(str(error)) from None
    if not settings.backplane.strip():
        raise ClusterError(
            "workers need a backplane to act as one broker: set backplane "
            "(--backplane redis://host:port/, PUBSUB_BACKPLANE or the settings file)"
        )
    ports = [("WebSocket", settings.port)]
    if settings.resp_port.strip():
        ports.append(("RESP", settings.resp_port))
    per_port: list[list[socket.socket]] = []
    listening = []
    for what, value in ports:
        interface, port = tcp_address(endpoint_description(settings, value))
        sockets = bind_sockets(interface, port, known.workers, settings.listen_backlog)
        per_port.append(sockets)
        listening.append(f"{what} on {interface or '*'}:{sockets[0].getsockname()[1]}")
    per_worker = [list(group) for group in zip(*per_port, strict=True)]
    return known.workers, arguments, per_worker, ", ".join(listening)


def main(argv: list[str] | None = None) -> None:
    """The ``pubsub-cluster`` console script."""
    try:
        workers, arguments, sockets, listening = prepare(sys.argv[1:] if argv is None else argv)
    except ClusterError as error:
        raise SystemExit(f"pubsub-cluster: {error}") from None
    from twisted.internet import reactor

    # FileLogObserver provides ILogObserver through @implementer, which mypy
    # cannot see without a zope plugin.
    observers = [textFileLogObserver(sys.stdout)]
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)  # type: ignore[arg-type]
    cluster = _Cluster(reactor, arguments, sockets)
    _log.info(
        "pubsub-cluster: {workers} workers, {listening}", workers=workers, listening=listening
    )
    reactor.callWhenRunning(cluster.spawn_all, workers)
    # IReactorCore's methods are declared without self (zope.interface), so
    # mypy shifts their arguments by one.
    reactor.addSystemEventTrigger("before", "shutdown", cluster.stop)  # type: ignore[arg-type]
    reactor.run()  # type: ignore[misc]
    sys.exit(cluster.exit_code)
