"""Start a private redis-server on a free loopback port for the differential tests.

`make test` installs redis-server (Debian's package) when it is missing and sets
PUBSUB_REQUIRE_REDIS=1, so there a missing server is a failure; a developer
running pytest by hand without Redis gets a skip that says how to get it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: --requirepass
    except OSError:
        return False


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        message = (
            "redis-server is not installed (make test installs it: apt-get install redis-server)"
        )
        if os.environ.get("PUBSUB_REQUIRE_REDIS"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


class RedisServer:
    """A redis-server on a free loopback port that a test may kill and start
    again on the same port (the backplane tests)."""

    def __init__(self, workdir: str, *options: str) -> None:
        self.binary = _binary()
        self.options = options  # more redis-server arguments, such as --requirepass
        self.workdir = workdir
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        # Polling a child process's socket until it answers: bounded, and
        # this is test set-up, not a test waiting on the code under test.
        deadline = time.monotonic() + 10
        while not _ready(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye to its clients but the kernel's RST/FIN."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@contextmanager
def redis_server(*options: str) -> Iterator[int]:
    """Run redis-server (with ``options``) for the duration of the block; yields its port."""
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(workdir, *options)
        server.start()
        try:
            yield server.port
        finally:
            server.stop()
