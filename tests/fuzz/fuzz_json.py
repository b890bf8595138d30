#!/usr/bin/env python3
"""Fuzz the JSON command decoder, ``pubsub.websocket.json_codec.decode_command``.

The contract held here: for any input, as bytes (what Autobahn's general
path hands over) or as text (what the lean reader hands over, lone
surrogates included), ``decode_command`` either returns the command's
arguments, a non-empty list of byte strings, or raises
``json_codec.ProtocolError`` whose text is a Redis error ("ERR ...").
Any other exception, or any other return value, is a crash.

Run: ``python tests/fuzz/fuzz_json.py [libFuzzer options] CORPUS_DIR`` (``make fuzz``
runs it on a copy of tests/fuzz/corpus/json, with tests/fuzz/json.dict).

After a long run, fold what it found into a committed corpus, minimized
(libFuzzer re-runs the harness as a program, hence the PATH):
``PATH=.venv/bin:$PATH tests/fuzz/fuzz_json.py -merge=1 tests/fuzz/corpus/json RUN_DIR``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from pubsub.websocket import json_codec


def _check(frame: bytes | str) -> None:
    try:
        args = json_codec.decode_command(frame)
    except json_codec.ProtocolError as error:
        if not str(error).startswith("ERR "):
            raise AssertionError(f"an error reply that is not ERR: {error!r}") from None
        return
    if not isinstance(args, list) or not args:
        raise AssertionError(f"not a non-empty list: {args!r}")
    if not all(type(arg) is bytes for arg in args):
        raise AssertionError(f"an argument that is not bytes: {args!r}")


def test_one_input(data: bytes) -> None:
    _check(data)
    # The lean reader hands over text; keep lone surrogates so the
    # decoder's handling of them is exercised too.
    try:
        text = data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    _check(text)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
