"""The test suites' one RESP2/RESP3 reader and value model, and a blocking client on it.

:class:`RespParser` is fed bytes and hands out complete frames, each a
:class:`Frame`: its typed value and the exact bytes it arrived as.  Values keep
apart what the wire keeps apart:

* simple strings (``+``) are :class:`SimpleString` (a str); bulk strings are bytes;
* verbatim strings (``=``) are :class:`Verbatim` (bytes without the format prefix);
* pushes (``>``) are :class:`Push` (a list); arrays and sets are lists; maps are dicts;
* errors (``-``, ``!``) are :class:`RespError`, equal to another with the same text;
* nulls (``_``, ``$-1``, ``*-1``) are None; integers and big numbers int;
  doubles float; booleans bool.

:class:`Resp3Client` reads it from a blocking socket (a real redis-server in
tests); :mod:`tests.support.respclient` reads it inside the Twisted reactor.
Tests only; the server has its own codec.
"""

from __future__ import annotations

import socket
from typing import Any, NamedTuple, Self


class SimpleString(str):
    """A RESP simple string (``+OK``), kept apart from bulk strings (bytes)."""


class Verbatim(bytes):
    """A RESP3 verbatim string (``=``): the text without its format prefix,
    which is kept as :attr:`format` (``b"txt"`` or ``b"mkd"``)."""

    format: bytes

    def __new__(cls, text: bytes, format: bytes = b"txt") -> Self:
        self = super().__new__(cls, text)
        self.format = format
        return self


class Push(list):
    """A RESP3 push (``>``).  It compares equal to a list with the same items,
    so tests that care check ``type(value) is Push``."""


class RespError(Exception):
    """A RESP error reply (``-`` or ``!``).  It can be raised, and it compares
    equal to another RespError with the same message, so tests can assert on it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return self.args[0]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.args == other.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class Frame(NamedTuple):
    """One complete top-level frame: its typed value and the bytes it was."""

    value: Any
    raw: bytes


class _Incomplete(Exception):
    """The buffer ends inside a frame."""


def _argument(arg: bytes | str | int) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, int):
        return b"%d" % arg
    return arg.encode("utf-8")


def command(*args: bytes | str | int) -> bytes:
    """A request as every client library sends it: an array of bulk strings
    (str arguments as UTF-8, ints in decimal)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in map(_argument, args):
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def _line(buffer: bytes | bytearray, pos: int) -> tuple[bytes, int]:
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    return bytes(buffer[pos:end]), end + 2


def _exact(buffer: bytes | bytearray, pos: int, size: int) -> tuple[bytes, int]:
    """``size`` bytes at ``pos``, which must be followed by CRLF."""
    if len(buffer) < pos + size + 2:
        raise _Incomplete
    if buffer[pos + size : pos + size + 2] != b"\r\n":
        raise ValueError(f"bulk string of {size} bytes not followed by CRLF")
    return bytes(buffer[pos : pos + size]), pos + size + 2


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _parse(buffer: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """The value that starts at ``pos``, and where it ends.

    Raises _Incomplete when the buffer does not hold all of it yet."""
    line, pos = _line(buffer, pos)
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return SimpleString(_text(rest)), pos
    if kind == b"-":
        return RespError(_text(rest)), pos
    if kind in (b":", b"("):
        return int(rest), pos
    if kind == b",":
        return float(rest), pos
    if kind == b"_":
        return None, pos
    if kind == b"#":
        return rest == b"t", pos
    if kind in (b"$", b"=", b"!"):
        size = int(rest)
        if size < 0:
            return None, pos
        data, pos = _exact(buffer, pos, size)
        if kind == b"=":
            return Verbatim(data[4:], data[:3]), pos
        if kind == b"!":
            return RespError(_text(data)), pos
        return data, pos
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
    raise ValueError(f"not a RESP value: {line!r}")


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
                self.close()
                raise reply

    def close(self) -> None:
        self.sock.close()

    def send(self, *args: bytes | str | int) -> None:
        self.sock.sendall(command(*args))

    def read_frame(self) -> Frame:
        """The next frame, waiting for it (at most the socket's timeout)."""
        while (frame := self.parser.gets()) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.parser.feed(chunk)
        return frame

    def read(self) -> Any:
        """The next frame's value."""
        return self.read_frame().value
