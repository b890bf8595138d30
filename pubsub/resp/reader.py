"""RESP requests from a byte stream, read as Redis's ``processInputBuffer`` reads them.

Sans-I/O: :meth:`RequestReader.feed` takes bytes as they arrive, and
:meth:`RequestReader.gets` hands out one complete request at a time (its
arguments) or raises :class:`ProtocolError` with Redis's error text.  A
request is multibulk (``*2\\r\\n$4\\r\\nECHO\\r\\n$2\\r\\nhi\\r\\n``, what
client libraries send) or inline (``ECHO hi\\r\\n``, what a person types),
by its first byte.

Every byte costs a bounded amount, whatever a client declares:

- Each byte is searched at most twice, however the input is split: a line
  still waiting for its end remembers how far it has been searched.
- A declared count or length allocates nothing.  Arguments are kept only as
  their bytes arrive (Redis pre-allocates at most 1,024 slots; this reader,
  none), so ``*2147483647`` costs what its thirteen bytes cost.
- The limits are Redis's: a line without its end past 64 KiB, a count over
  2^31-1, a bulk over 512 MiB (``proto-max-bulk-len``); for a client that must
  authenticate and has not (:attr:`RequestReader.guarded`), a count over 10
  and a bulk over 16 KiB.  ``max_request`` (the server's
  ``max_message_size``) bounds one request's bytes, counted as they arrive.

Redis's quirks are kept, since the differential tests compare byte for
byte: a line ends at the first ``\\r`` (``\\n`` inline) and the byte after
it is skipped unread; a NUL byte before that end hides it (Redis searches
with ``strchr``), so the line waits until it is too big; the two bytes after
a bulk are skipped unread; a count of zero or less is no request at all.
"""

from __future__ import annotations

import re

__all__ = [
    "INLINE_MAX",
    "PROTO_MAX_BULK_LEN",
    "ProtocolError",
    "RequestReader",
    "redis_int",
    "size_error",
    "split_inline",
]

#: Redis's PROTO_INLINE_MAX_SIZE: the longest line (inline request, or a
#: count or length line) still waiting for its end.
INLINE_MAX = 64 * 1024

#: Redis's default proto-max-bulk-len.
PROTO_MAX_BULK_LEN = 512 * 1024 * 1024

# Redis's limits before authentication (networking.c, authRequired).
_GUARDED_MAX_COUNT = 10
_GUARDED_MAX_BULK = 16 * 1024

_INT_MAX = 2**31 - 1

# A count or length line as clients write it, taken by one match: digits
# only (so no NUL hides its end), no leading zero, within 64 bits.  Any
# other line, or one not yet whole, is read by _number_line.
_COUNT_LINE = re.compile(rb"\*([1-9][0-9]{0,17})\r\n")
_BULK_LINE = re.compile(rb"\$(0|[1-9][0-9]{0,17})\r\n")


class ProtocolError(Exception):
    """Input Redis would refuse with ``-ERR Protocol error: ...`` and a close;
    ``str()`` is the error text, without the leading ``-``."""


def size_error(limit: int) -> str:
    """The error for a request over ``max_message_size``."""
    return f"ERR Protocol error: request over the max_message_size limit of {limit} bytes"


class RequestReader:
    """One connection's requests: feed it bytes, take requests one at a time.

    After :class:`ProtocolError` the reader is spent: every later call raises
    the same error, as Redis reads nothing more from such a client.
    """

    __slots__ = (
        "_args",
        "_buffer",
        "_bulk",
        "_error",
        "_left",
        "_max_bulk",
        "_max_request",
        "_pos",
        "_searched",
        "_taken",
        "guarded",
    )

    def __init__(self, max_bulk: int = PROTO_MAX_BULK_LEN, max_request: int = 0) -> None:
        #: True while the client must authenticate and has not: Redis's
        #: smaller limits apply to what arrives then.
        self.guarded = False
        self._max_bulk = max_bulk
        self._max_request = max_request
        # What has arrived: the last read's bytes as they came, or a bytearray
        # of what was left over with the reads after it.
        self._buffer: bytes | bytearray = b""
        self._pos = 0  # the first byte not yet consumed
        # How far past _pos the line under way has been searched for its end
        # without finding it; -1 once a NUL has hidden that end for good.
        self._searched = 0
        self._left = 0  # arguments still to come of the multibulk request under way
        self._bulk = -1  # the length of the argument under way, -1 before its line
        self._args: list[bytes] = []
        self._taken = 0  # bytes of the multibulk request under way before _pos
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        """Add bytes received from the client."""
        if self._error is not None:
            return
        buffer, pos = self._buffer, self._pos
        if pos >= len(buffer):
            # Nothing left over, as after most reads: read from ``data``
            # itself, whose slices are the arguments' bytes at no extra copy.
            self._buffer = bytes(data)
        else:
            if isinstance(buffer, bytearray):
                del buffer[:pos]  # CPython drops a bytearray's head without a copy
            else:
                buffer = bytearray(memoryview(buffer)[pos:])
            buffer += data
            self._buffer = buffer
        self._pos = 0

    def gets(self) -> list[bytes] | None:
        """The next complete request's arguments, or None until more bytes come."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as error:
            self._error = error
            self._buffer = b""
            self._args = []
            raise

    # -- the state machine -------------------------------------------------------------

    def _next(self) -> list[bytes] | None:
        buffer = self._buffer
        while True:
            if self._left:
                return self._arguments()
            pos = self._pos
            if pos >= len(buffer):
                return None
            if buffer[pos] == 0x2A:  # "*"
                line = _COUNT_LINE.match(buffer, pos)
                if line is not None:
                    count = int(line[1])
                    self._pos = line.end()
                    self._searched = 0  # a search of this line that waited is over
                else:
                    number = self._number_line(False)
                    if number is None:
                        return None
                    count = number
                if count > _INT_MAX:
                    raise ProtocolError("ERR Protocol error: invalid multibulk length")
                if count > _GUARDED_MAX_COUNT and self.guarded:
                    raise ProtocolError("ERR Protocol error: unauthenticated multibulk length")
                if count > 0:  # Redis skips a count of zero or less
                    self._left = count
                    self._taken = self._pos - pos
            else:
                args = self._inline()
                if args is None:
                    return None
                if args:
                    return args

    def _arguments(self) -> list[bytes] | None:
        """Read the arguments of the multibulk request under way."""
        buffer, limit, plain = self._buffer, self._max_request, _BULK_LINE.match
        args, left, bulk, pos, taken = self._args, self._left, self._bulk, self._pos, self._taken
        try:
            while left:
                if bulk < 0:
                    line = plain(buffer, pos)
                    if line is not None:
                        bulk = int(line[1])
                        self._pos = line.end()
                        self._searched = 0
                    else:
                        self._pos = pos
                        number = self._number_line(True)
                        if number is None:
                            return None
                        bulk = number
                    if not 0 <= bulk <= self._max_bulk:
                        raise ProtocolError("ERR Protocol error: invalid bulk length")
                    if bulk > _GUARDED_MAX_BULK and self.guarded:
                        raise ProtocolError("ERR Protocol error: unauthenticated bulk length")
                    if limit and bulk > limit:
                        raise ProtocolError(size_error(limit))
                    taken += self._pos - pos
                    pos = self._pos
                end = pos + bulk
                if len(buffer) < end + 2:
                    # Everything from pos on is this argument's: count it now.
                    if limit and taken + len(buffer) - pos > limit:
                        raise ProtocolError(size_error(limit))
                    return None
                args.append(bytes(buffer[pos:end]))
                taken += bulk + 2
                if limit and taken > limit:
                    raise ProtocolError(size_error(limit))
                pos = end + 2
                bulk = -1
                left -= 1
        finally:
            self._left, self._bulk, self._pos, self._taken = left, bulk, pos, taken
        self._args = []
        return args

    def _number_line(self, bulk: bool) -> int | None:
        """The number on the count (``*``) or length (``$``) line at ``_pos``,
        read as Redis reads it, with ``_pos`` moved past the line; None while
        the line is incomplete.  The lines clients write take the plain
        patterns above instead: this is for the rest."""
        buffer, pos = self._buffer, self._pos
        cr = self._line_end(0x0D)
        if cr < 0:
            if len(buffer) - pos > INLINE_MAX:
                what = "bulk" if bulk else "mbulk"
                raise ProtocolError(f"ERR Protocol error: too big {what} count string")
            return None
        if bulk and buffer[pos] != 0x24:  # "$"
            got = bytes((buffer[pos],)).decode("utf-8", "surrogateescape")
            raise ProtocolError(f"ERR Protocol error: expected '$', got '{got}'")
        number = redis_int(bytes(buffer[pos + 1 : cr]))
        if number is None:
            what = "bulk" if bulk else "multibulk"
            raise ProtocolError(f"ERR Protocol error: invalid {what} length")
        self._pos = cr + 2
        return number

    def _inline(self) -> list[bytes] | None:
        """Read an inline request; None while its line is incomplete, [] for a blank one."""
        buffer, pos, limit = self._buffer, self._pos, self._max_request
        newline = self._line_end(0x0A)
        if newline < 0:
            received = len(buffer) - pos
            if received > INLINE_MAX:
                raise ProtocolError("ERR Protocol error: too big inline request")
            # A "\r" at the end may yet be the line's end.
            if limit and received - (buffer[-1] == 0x0D) > limit:
                raise ProtocolError(size_error(limit))
            return None
        end = newline - 1 if newline > pos and buffer[newline - 1] == 0x0D else newline
        if limit and end - pos > limit:
            raise ProtocolError(size_error(limit))
        args = split_inline(bytes(buffer[pos:end]))
        if args is None:
            raise ProtocolError("ERR Protocol error: unbalanced quotes in request")
        self._pos = newline + 1
        return args

    def _line_end(self, byte: int) -> int:
        """Where the line at ``_pos`` ends (the index of ``byte``), or -1 while
        it has not, as Redis's ``strchr`` finds it: a NUL before ``byte`` hides
        it.  A multibulk line (``\\r``) also needs the byte after its end."""
        searched = self._searched
        if searched < 0:
            return -1
        buffer, pos = self._buffer, self._pos
        start = pos + searched
        found = buffer.find(byte, start)
        stop = len(buffer) if found < 0 else found
        if buffer.find(0, start, stop) >= 0:
            self._searched = -1
            return -1
        if found < 0 or (byte == 0x0D and found + 1 >= len(buffer)):
            self._searched = stop - pos
            return -1
        self._searched = 0
        return found


_INTEGER = re.compile(rb"0|-?[1-9][0-9]*")


def redis_int(text: bytes) -> int | None:
    """An integer as Redis's string2ll reads one: no sign but "-", no leading
    zeros or blanks, within 64 bits; None otherwise."""
    if text.isdigit() and len(text) < 19 and (text[0] != 0x30 or len(text) == 1):
        return int(text)  # the common case, and within 64 bits
    if len(text) > 20 or not _INTEGER.fullmatch(text):
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


def split_inline(line: bytes) -> list[bytes] | None:
    """An inline command line split into arguments as Redis's sdssplitargs
    does: blanks separate, "double quotes" take C escapes (\\n, \\xff, ...),
    'single quotes' take \\' only.  None for unbalanced quotes.  (A line
    never holds a NUL: the reader never finds the end of one that does.)"""
    if not any(c in line for c in (b'"', b"'", b"\v", b"\f")):
        return line.split()  # the common line: the same split, in C
    args: list[bytes] = []
    i, end = 0, len(line)
    while True:
        while i < end and line[i] in b" \t\n\v\f\r":
            i += 1
        if i == end:
            return args
        current = bytearray()
        quote = 0
        while True:
            if i == end:
                if quote:
                    return None
                break
            c = line[i]
            if quote == 0x22:  # "
                if c == 0x5C and line[i + 1 : i + 2] == b"x" and _is_hex(line[i + 2 : i + 4]):
                    current.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < end:
                    i += 1
                    current += _ESCAPES.get(line[i], bytes((line[i],)))
                elif c == 0x22:
                    if i + 1 < end and line[i + 1] not in b" \t\n\v\f\r":
                        return None
                    i += 1
                    break
                else:
                    current.append(c)
            elif quote == 0x27:  # '
                if c == 0x5C and line[i + 1 : i + 2] == b"'":
                    i += 1
                    current.append(0x27)
                elif c == 0x27:
                    if i + 1 < end and line[i + 1] not in b" \t\n\v\f\r":
                        return None
                    i += 1
                    break
                else:
                    current.append(c)
            elif c in b" \n\r\t":
                break
            elif c in b"\"'":
                quote = c
            else:
                current.append(c)
            i += 1
        args.append(bytes(current))


_ESCAPES = {
    ord(k): v for k, v in {"n": b"\n", "r": b"\r", "t": b"\t", "b": b"\b", "a": b"\a"}.items()
}


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)
