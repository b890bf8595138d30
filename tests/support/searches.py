"""A bytearray that counts how many bytes its ``find`` calls search, for the
tests that hold a reader to searching each received byte a bounded number
of times, however the input is split."""

from __future__ import annotations


class CountingBytearray(bytearray):
    """``find`` adds the bytes it looked at to the class's ``searched``."""

    searched = 0

    def find(self, sub, start=0, end=None):  # type: ignore[override]
        stop = len(self) if end is None else end
        found = bytearray.find(self, sub, start, stop)
        width = 1 if isinstance(sub, int) else len(sub)
        type(self).searched += (stop if found < 0 else found + width) - start
        return found


def counting_bytearray() -> type[CountingBytearray]:
    """A fresh subclass, its count at zero."""
    return type("Counting", (CountingBytearray,), {"searched": 0})
