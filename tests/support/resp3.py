"""A RESP2/RESP3 reader for tests, and a minimal blocking client built on it.

:class:`RespParser` is the one RESP parser of the test suites: it is fed bytes
and hands out complete frames, each with its typed value (pushes, simple strings
and errors stay distinguishable from arrays and bulk strings) and the exact
bytes it arrived as.  :class:`Resp3Client` reads it from a blocking socket (a
real redis-server in tests); ``tests/support/respclient.py`` reads it inside the
Twisted reactor.  Tests only; the server has its own codec.
"""

from __future__ import annotations

import socket
from typing import Any, NamedTuple


class Push(list):
    """A RESP3 push frame (``>``)."""


class SimpleString(str):
    """A RESP simple string (``+``), kept apart from bulk strings."""


class RespError(Exception):
    """A RESP error reply (``-`` or ``!``)."""


class Frame(NamedTuple):
    """One complete top-level frame: its typed value and the bytes it was."""

    value: Any
    raw: bytes


class _Incomplete(Exception):
    """The buffer ends inside a frame."""


def command(*args: bytes) -> bytes:
    """A request as every client library sends it: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def _line(buffer: bytes | bytearray, pos: int) -> tuple[bytes, int]:
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    return bytes(buffer[pos:end]), end + 2


def _exact(buffer: bytes | bytearray, pos: int, size: int) -> tuple[bytes, int]:
    if len(buffer) < pos + size + 2:
        raise _Incomplete
    return bytes(buffer[pos : pos + size]), pos + size + 2


def _parse(buffer: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """The value that starts at ``pos``, and where it ends."""
    line, pos = _line(buffer, pos)
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return SimpleString(rest.decode()), pos
    if kind == b"-":
        return RespError(rest.decode("utf-8", "surrogateescape")), pos
    if kind == b"!":
        text, pos = _exact(buffer, pos, int(rest))
        return RespError(text.decode("utf-8", "surrogateescape")), pos
    if kind in (b":", b"("):
        return int(rest), pos
    if kind == b",":
        return float(rest), pos
    if kind in (b"$", b"="):
        size = int(rest)
        return (None, pos) if size < 0 else _exact(buffer, pos, size)
    if kind == b"_":
        return None, pos
    if kind == b"#":
        return rest == b"t", pos
    if kind in (b"*", b"~", b">", b"%"):
        size = int(rest)
        if size < 0:
            return None, pos
        items = []
        for _ in range(size * 2 if kind == b"%" else size):
            item, pos = _parse(buffer, pos)
            items.append(item)
        if kind == b"%":
            return dict(zip(items[::2], items[1::2], strict=True)), pos
        return (Push(items) if kind == b">" else items), pos
    raise ValueError(f"unexpected RESP frame {line!r}")


def split_aggregate(raw: bytes) -> tuple[bytes, list[bytes]] | None:
    """An array, set or push frame's header line and its elements' exact bytes;
    None for any other frame."""
    if raw[:1] not in (b"*", b"~", b">") or raw[1:2] == b"-":
        return None
    header, pos = _line(raw, 0)
    elements = []
    for _ in range(int(header[1:])):
        _, end = _parse(raw, pos)
        elements.append(raw[pos:end])
        pos = end
    return raw[: len(header) + 2], elements


class RespParser:
    """Feed it bytes as they arrive; :meth:`gets` hands out complete frames."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def gets(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed."""
        try:
            value, end = _parse(self.buffer, 0)
        except _Incomplete:
            return None
        raw = bytes(self.buffer[:end])
        del self.buffer[:end]
        return Frame(value, raw)


class Resp3Client:
    """A blocking client; RESP3 (``HELLO 3``) unless ``protocol`` is 2."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, protocol: int = 3) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.parser = RespParser()
        if protocol == 3:
            self.send(b"HELLO", b"3")
            reply = self.read()
            if isinstance(reply, RespError):
                raise reply

    def close(self) -> None:
        self.sock.close()

    def send(self, *args: bytes) -> None:
        self.sock.sendall(command(*args))

    def read(self) -> Any:
        while (frame := self.parser.gets()) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.parser.feed(chunk)
        return frame.value
