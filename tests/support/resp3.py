"""A minimal blocking RESP3 client for talking to a real redis-server in tests.

Only what the differential tests need: send a command, read typed frames
(pushes stay distinguishable from replies).  Tests only; the server has its own
codec.
"""

from __future__ import annotations

import socket
from typing import Any


class Push(list):
    """A RESP3 push frame (``>``)."""


class SimpleString(str):
    """A RESP3 simple string (``+``), kept apart from bulk strings."""


class RespError(Exception):
    """A RESP error reply (``-`` or ``!``)."""


class Resp3Client:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = bytearray()
        self.send(b"HELLO", b"3")
        reply = self.read()
        if isinstance(reply, RespError):
            raise reply

    def close(self) -> None:
        self.sock.close()

    def send(self, *args: bytes) -> None:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        self.sock.sendall(b"".join(out))

    def _line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            self._fill()

    def _exact(self, size: int) -> bytes:
        while len(self.buffer) < size + 2:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[: size + 2]
        return data

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buffer += chunk

    def read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return SimpleString(rest.decode())
        if kind in (b"-", b"!"):
            if kind == b"!":
                rest = self._exact(int(rest))
            return RespError(rest.decode("utf-8", "surrogateescape"))
        if kind == b":":
            return int(rest)
        if kind in (b"$", b"="):
            size = int(rest)
            return None if size < 0 else self._exact(size)
        if kind == b"_":
            return None
        if kind == b"#":
            return rest == b"t"
        if kind in (b"*", b"~", b">"):
            size = int(rest)
            if size < 0:
                return None
            items = [self.read() for _ in range(size)]
            return Push(items) if kind == b">" else items
        if kind == b"%":
            size = int(rest)
            return {self.read(): self.read() for _ in range(size)}
        raise ValueError(f"unexpected RESP3 frame {line!r}")
