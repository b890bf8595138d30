"""Redis-compatible glob patterns for PSUBSCRIBE and PUBSUB CHANNELS.

Redis matches a pattern against a channel name with ``stringmatchlen`` (in
``src/util.c``), byte by byte, case-sensitively.  This module reproduces its
results exactly, malformed patterns included, by parsing a pattern the way that
function walks it and compiling the result once into a ``re`` byte pattern:

* ``*`` matches any run of bytes (runs of ``*`` collapse into one), ``?`` any
  single byte, ``\\x`` the byte ``x``; a trailing lone ``\\`` is a literal.
* ``[...]`` is a set of bytes: ``^`` first negates it, ``\\x`` inside adds ``x``,
  ``a-z`` is a range whose ends are compared as C's signed ``char`` (so a range
  reaching a byte above 0x7f wraps the way Redis's does) and swapped when given
  backwards.  A ``[`` with no closing ``]`` takes the rest of the pattern as the
  set; an empty set ``[]`` matches nothing and ``[^]`` any byte.
* The empty channel name is matched only by the empty pattern (Redis's loop never
  runs on an empty string, so even ``*`` fails).
* A pattern that needs more than 1,000 nested ``*`` expansions never matches
  (Redis's guard against abusive patterns).

Matching is linear-ish whatever the pattern: every ``*`` but the last becomes an
atomic lazy group, so a match never backtracks into an earlier ``*`` (the same
argument as Redis's ``skipLongerMatches``: a fixed-width segment matched at its
earliest place leaves the most room for the rest).

Plain Python only: nothing here may import Twisted, Autobahn or a codec.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Optional

__all__ = ["Matcher", "compile_pattern", "literal_prefix", "match"]

#: A compiled pattern: call it with a channel name; truthy when it matches.
Matcher = Callable[[bytes], Optional["re.Match[bytes]"]]

_STAR, _QUESTION, _OPEN, _CLOSE, _CARET, _DASH, _BACKSLASH = b"*?[]^-\\"

#: Redis returns "no match" once a match would nest deeper than this many stars.
MAX_NESTING = 1000

# One parsed element: a literal byte (int), any byte (None), a set of bytes
# (frozenset), or a star (the _STAR_ELEMENT sentinel).
_STAR_ELEMENT = "*"
_Element = int | None | frozenset[int] | str


def _signed(byte: int) -> int:
    """The value C gives a ``char`` holding ``byte`` on the platforms Redis ships."""
    return byte - 256 if byte > 127 else byte


def _parse_set(pattern: bytes, i: int) -> tuple[frozenset[int], int]:
    """Parse the set that starts just after the ``[`` at ``i - 1``.

    Returns the matching bytes and the index just past the set, walking the
    pattern exactly as ``stringmatchlen`` does (an unterminated set ends with the
    pattern).
    """
    n = len(pattern)
    negate = i < n and pattern[i] == _CARET
    if negate:
        i += 1
    members: set[int] = set()
    while True:
        if i < n and pattern[i] == _BACKSLASH and n - i >= 2:
            i += 1
            members.add(pattern[i])
        elif i < n and pattern[i] == _CLOSE:
            break
        elif i >= n:
            i -= 1
            break
        elif n - i >= 3 and pattern[i + 1] == _DASH:
            low, high = _signed(pattern[i]), _signed(pattern[i + 2])
            if low > high:
                low, high = high, low
            members.update(b for b in range(256) if low <= _signed(b) <= high)
            i += 2
        else:
            members.add(pattern[i])
        i += 1
    if negate:
        members = set(range(256)) - members
    return frozenset(members), i + 1


def _parse(pattern: bytes) -> list[_Element]:
    elements: list[_Element] = []
    n = len(pattern)
    i = 0
    while i < n:
        byte = pattern[i]
        if byte == _STAR:
            while i + 1 < n and pattern[i + 1] == _STAR:
                i += 1
            elements.append(_STAR_ELEMENT)
            i += 1
        elif byte == _QUESTION:
            elements.append(None)
            i += 1
        elif byte == _OPEN:
            members, i = _parse_set(pattern, i + 1)
            elements.append(members)
        else:
            if byte == _BACKSLASH and n - i >= 2:
                i += 1
            elements.append(pattern[i])
            i += 1
    return elements


def _set_regex(members: frozenset[int]) -> bytes:
    if not members:
        return b"(?!)"
    if len(members) == 256:
        return b"."
    ranges = []
    ordered = sorted(members)
    start = previous = ordered[0]
    for byte in ordered[1:] + [None]:
        if byte is not None and byte == previous + 1:
            previous = byte
            continue
        if start == previous:
            ranges.append(b"\\x%02x" % start)
        else:
            ranges.append(b"\\x%02x-\\x%02x" % (start, previous))
        if byte is not None:
            start = previous = byte
    return b"[" + b"".join(ranges) + b"]"


def _element_regex(element: _Element) -> bytes:
    if element is None:
        return b"."
    if isinstance(element, int):
        return re.escape(bytes((element,)))
    assert isinstance(element, frozenset)
    return _set_regex(element)


def _regex(elements: list[_Element]) -> bytes:
    segments: list[list[_Element]] = [[]]
    for element in elements:
        if element == _STAR_ELEMENT:
            segments.append([])
        else:
            segments[-1].append(element)
    parts = [b"".join(_element_regex(e) for e in segment) for segment in segments]
    if len(parts) == 1:
        return parts[0]
    # Stars that are followed by more pattern recurse in Redis; count them.
    if len(parts) - 2 + (1 if parts[-1] else 0) > MAX_NESTING:
        return b"(?!)"
    middle = b"".join(b"(?>.*?" + part + b")" for part in parts[1:-1])
    return parts[0] + middle + b".*" + parts[-1]


@lru_cache(maxsize=4096)
def compile_pattern(pattern: bytes) -> Matcher:
    """Compile ``pattern`` once; the result is cached for later calls."""
    if not pattern:
        return re.compile(b"", re.DOTALL).fullmatch
    # (?=.) keeps the empty channel name out, as in Redis.
    return re.compile(b"(?=.)" + _regex(_parse(pattern)), re.DOTALL).fullmatch


def match(pattern: bytes, channel: bytes) -> bool:
    """Whether ``channel`` matches the Redis glob ``pattern``."""
    return compile_pattern(pattern)(channel) is not None


def literal_prefix(pattern: bytes) -> bytes:
    """The bytes every channel matching ``pattern`` must start with."""
    prefix = bytearray()
    for element in _parse(pattern):
        if not isinstance(element, int):
            break
        prefix.append(element)
    return bytes(prefix)
