"""Protocol errors and limits byte for byte against a live redis-server.

Each input goes, on a plain socket, to redis-server and to this server's
RESP port; both must send the same bytes and then close.  Every input ends
in a protocol error, so "until the server closes" is a complete answer.
With authentication required (redis-server's ``--requirepass``, this
server's ``jwt_secret``) Redis's smaller limits for unauthenticated
clients apply.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.support.redis_server import redis_server

WAIT = 30

BIG = 64 * 1024

ANYONE = [
    # A huge count costs nothing: the request waits for its elements.
    b"*1000000000\r\n:1\r\n",
    b"*2147483647\r\n$4\r\nPING\r\n:1\r\n",
    b"*2147483648\r\n",
    b"*-2147483649\r\n*x\r\n",
    b"*1\r\n$536870913\r\n",
    b"*2\r\n$4\r\nECHO\r\n$1000\r\n" + b"x" * 1000 + b"\r\n*1\r\n:1\r\n",
    b"*1\r\n$4\rxPING\r\n*1\r\n:1\r\n",
    b"*1\r\n$4\r\nPINGxx*1\r\n\r\n",
    b"*1\r\n$4\n\r\nPING\r\n",
    b"*1\r\n\xff\r\n",
    b"PING\0x\r\n" + b"y" * BIG,
    b"*1\0\r\n" + b"y" * BIG,
    b"*1\r\n$4\0\r\n" + b"y" * BIG,
    b"*" + b"1" * (BIG + 1),
    b"*1\r\n$" + b"1" * (BIG + 1),
    b"*1\r\n" + b"x" * (BIG + 1),
    b"x" * (BIG + 1),
    b"\r\n \r\nPING\r\nECHO 'a\r\n",
]

UNAUTHENTICATED = [
    b"*11\r\n",
    b"*10\r\n:1\r\n",
    b"*1\r\n$16385\r\n",
    b"*2\r\n$4\r\nPING\r\n$16384\r\n" + b"x" * 16384 + b"\r\n*1\r\n:1\r\n",
    b"PING\r\n*11\r\n",
    b"*-100\r\n*1\r\n$16385\r\n",
]


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest_twisted.inlineCallbacks
def compare(make_server, inputs: list[bytes], redis_options=(), **settings):
    server = yield make_server(resp=True, **settings)
    with redis_server(*redis_options) as redis_port:
        for data in inputs:
            expected = yield deferToThread(exchange, redis_port, data)
            got = yield deferToThread(exchange, server.resp_port, data)
            assert got == expected, f"input {data[:60]!r}"
            assert b"Protocol error" in expected


@pytest.mark.timeout(300)
def test_protocol_errors_and_limits_match_redis(make_server):
    return compare(make_server, ANYONE)


@pytest.mark.timeout(300)
def test_limits_before_authentication_match_redis(make_server):
    return compare(make_server, UNAUTHENTICATED, ("--requirepass", "secret"), jwt_secret="s" * 32)
