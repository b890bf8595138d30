"""Start a private redis-server on a free loopback port for the differential tests.

`make test` installs redis-server (Debian's package) when it is missing and sets
PUBSUB_REQUIRE_REDIS=1, so there a missing server is a failure; a developer
running pytest by hand without Redis gets a skip that says how to get it.

With :class:`RedisTLS` files, the server listens on a TLS port only (Redis's
``tls-port``; ``--port 0`` turns plain TCP off), and the readiness probe
speaks TLS, showing the client certificate.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import hiredis
import pytest


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: all bound at once, so that the
    kernel cannot hand the same one out twice (it may, one bind at a time,
    once the first socket is closed)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class RedisTLS:
    """PEM files for a redis-server that speaks TLS only.

    ``cert`` and ``key`` are the server's; ``ca`` signs the server's
    certificate (the probe checks it) and, for Redis, the clients' ones;
    ``client_cert`` and ``client_key`` are what the probe shows, needed when
    ``auth_clients`` (Redis's ``tls-auth-clients``) is on.  ``server_name``
    is the host the probe checks the server's certificate against.
    """

    cert: str
    key: str
    ca: str
    client_cert: str
    client_key: str
    auth_clients: bool = True
    server_name: str = "127.0.0.1"

    def options(self) -> list[str]:
        return [
            "--tls-cert-file",
            self.cert,
            "--tls-key-file",
            self.key,
            "--tls-ca-cert-file",
            self.ca,
            "--tls-auth-clients",
            "yes" if self.auth_clients else "no",
        ]

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(self.client_cert, self.client_key)
        return context.wrap_socket(sock, server_hostname=self.server_name)


def _connect(port: int, tls: RedisTLS | None, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls is None:
        return sock
    try:
        return tls.wrap(sock)
    except BaseException:
        sock.close()
        raise


def _ready(port: int, tls: RedisTLS | None = None) -> bool:
    try:
        with _connect(port, tls, 0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: --requirepass
    except OSError:  # ssl.SSLError too: the TLS port is not up yet
        return False


def required(name: str, package: str) -> str:
    """The path of the program ``name``; without it a skip that says how to get
    it, or a failure under PUBSUB_REQUIRE_REDIS (``make test`` sets it)."""
    binary = shutil.which(name)
    if binary is None:
        message = f"{name} is not installed (make test installs it: apt-get install {package})"
        if os.environ.get("PUBSUB_REQUIRE_REDIS"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def _binary() -> str:
    return required("redis-server", "redis-server")


class RedisServer:
    """A redis-server on a free loopback port that a test may kill and start
    again on the same port (the backplane tests).

    With ``tls``, ``port`` is a TLS port and the plain one is off.  ``port``
    is a free one unless given (several servers at once: :func:`_free_ports`)."""

    def __init__(
        self, workdir: str, *options: str, tls: RedisTLS | None = None, port: int | None = None
    ) -> None:
        self.binary = _binary()
        self.options = options  # more redis-server arguments, such as --requirepass
        self.workdir = workdir
        self.tls = tls
        self.port = port if port is not None else _free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            ports = ["--port", "0", "--tls-port", str(self.port), *self.tls.options()]
        self.process = subprocess.Popen(
            [
                self.binary,
                *ports,
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
        while not _ready(self.port, self.tls):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()  # not left running after the test
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def call(self, *args: bytes | str, timeout: float = 10) -> Any:
        """Send one command on a fresh connection (TLS too) and return the reply,
        parsed by hiredis (an error reply is a hiredis.ReplyError, returned)."""
        request = b"*%d\r\n" % len(args)
        for arg in args:
            data = arg.encode() if isinstance(arg, str) else arg
            request += b"$%d\r\n%s\r\n" % (len(data), data)
        reader = hiredis.Reader()
        with _connect(self.port, self.tls, timeout) as sock:
            sock.sendall(request)
            while (reply := reader.gets()) is False:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("redis-server closed the connection")
                reader.feed(data)
        return reply

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
