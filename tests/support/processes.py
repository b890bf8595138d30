"""Run a server as a child process (on the reactor, or plainly) and learn the port it bound."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, protocol


class ServerProcess(protocol.ProcessProtocol):
    """Collects output; ``listening`` fires with the port that ``ready`` captures.

    ``ended`` fires with the exit code (None when a signal ended the process).
    """

    def __init__(self, ready: bytes) -> None:
        self._ready = re.compile(ready)
        self.output = b""
        self.listening: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = self._ready.search(self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)


class ChildServer:
    """A server as a plain child process, for tests that run no reactor of
    their own (the browser tests drive Playwright's sync API).

    ``command(port)`` gives the arguments for a listening endpoint or port;
    ``start()`` returns the port bound, read from the first output line that
    ``ready`` matches. A thread keeps reading the output, so the child never
    blocks on a full pipe.
    """

    def __init__(self, command: Callable[[str], list[str]], ready: str) -> None:
        self.command = command
        self.ready = re.compile(ready)
        self.output: list[str] = []
        self._process: subprocess.Popen | None = None

    def start(self, port: str = "0", timeout: float = 60) -> int:
        # Only the installed package, as a user would run it.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env = {k: v for k, v in env.items() if not k.startswith("PUBSUB_")}
        self._process = subprocess.Popen(
            self.command(port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),
        )
        ready = threading.Event()
        found: list[int] = []

        def read(stream) -> None:
            for line in stream:
                self.output.append(line)
                match = self.ready.search(line)
                if match and not found:
                    found.append(int(match.group(1)))
                    ready.set()
            ready.set()  # the process ended

        threading.Thread(target=read, args=(self._process.stdout,), daemon=True).start()
        if not ready.wait(timeout) or not found:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.output))
        return found[0]

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing its connections."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, as an operator stops it."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _installed_environment() -> dict[str, str]:
    """The environment without PYTHONPATH and PUBSUB_*: only the installed
    package, only the options given."""
    return {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PUBSUB_")
    }


class ServerWithResp(ServerProcess):
    """``listening`` fires with (WebSocket port, RESP port) once both are bound."""

    def __init__(self) -> None:
        super().__init__(rb"RespFactory starting on (\d+)")

    def outReceived(self, data: bytes) -> None:
        self.output += data
        site = re.search(rb"Site starting on (\d+)", self.output)
        resp = re.search(rb"RespFactory starting on (\d+)", self.output)
        if site and resp and not self.listening.called:
            self.listening.callback((int(site.group(1)), int(resp.group(1))))

    errReceived = outReceived


class TwistdNode:
    """The installed ``twistd pubsub`` with ``options``, as a child process on
    the reactor (the test's clients keep running while it starts and stops),
    a WebSocket port and a RESP port on free loopback ports.

    ``start()`` fires with the node once both ports are bound; ``stop()``
    sends SIGTERM, as an operator stops it, and fires with the exit code.
    """

    def __init__(self, *options: str, cwd: str | None = None) -> None:
        self.options = options
        self.cwd = cwd or tempfile.gettempdir()
        self.ws_port = 0
        self.resp_port = 0
        self._process: ServerWithResp | None = None
        self._transport: Any = None

    @property
    def url(self) -> str:
        """The WebSocket URL of the node itself."""
        return f"ws://127.0.0.1:{self.ws_port}/"

    @property
    def output(self) -> str:
        return "" if self._process is None else self._process.output.decode(errors="replace")

    @property
    def running(self) -> bool:
        return self._process is not None and not self._process.ended.called

    @defer.inlineCallbacks
    def start(self, timeout: float = 60):
        from twisted.internet import reactor

        twistd = str(Path(sys.executable).with_name("twistd"))
        local = "tcp:0:interface=127.0.0.1"
        args = [twistd, "-n", "--pidfile=", "pubsub", "--port", local, "--resp-port", local]
        self._process = ServerWithResp()
        self._transport = reactor.spawnProcess(
            self._process,
            twistd,
            [*args, *self.options],
            env=_installed_environment(),
            path=self.cwd,
        )
        try:
            ports = yield self._process.listening.addTimeout(timeout, reactor)
        except (defer.TimeoutError, RuntimeError):  # no line in time; or it exited
            self.kill()
            raise AssertionError("the node did not start:\n" + self.output) from None
        self.ws_port, self.resp_port = ports
        return self

    def stop(self, timeout: float = 30) -> defer.Deferred:
        """SIGTERM; fires with the exit code (at once if it has ended)."""
        from twisted.internet import reactor

        assert self._process is not None
        if self.running:
            self._transport.signalProcess("TERM")
        ended: defer.Deferred = defer.Deferred()
        self._process.ended.addBoth(lambda result: ended.callback(result) or result)
        return ended.addTimeout(timeout, reactor)

    def kill(self) -> None:
        """SIGKILL: the node vanishes without closing its connections."""
        if self.running:
            self._transport.signalProcess("KILL")


def twistd_process(*options: str) -> ChildServer:
    """The installed ``twistd pubsub`` with ``options``; ``start(port)`` takes
    an endpoint (default: a free loopback port)."""
    twistd = str(Path(sys.executable).with_name("twistd"))

    def command(port: str) -> list[str]:
        endpoint = "tcp:0:interface=127.0.0.1" if port == "0" else port
        return [twistd, "-n", "--pidfile=", "pubsub", "--port", endpoint, *options]

    return ChildServer(command, r"Site starting on (\d+)")


#: The Node scripts and packages the client tests run (tests/clients).
NODE_CLIENTS = Path(__file__).resolve().parents[1] / "clients"


def node_with(package: str) -> str:
    """The path of node, with ``package`` installed in tests/clients; a skip
    without them (a failure under PUBSUB_REQUIRE_REDIS, which `make test` sets)."""
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (NODE_CLIENTS / "node_modules" / package).is_dir():
        missing = f"the {package} package is not installed (make test runs npm ci in tests/clients)"
    if missing:
        if os.environ.get("PUBSUB_REQUIRE_REDIS"):
            pytest.fail(missing)
        pytest.skip(missing)
    return node
