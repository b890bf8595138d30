#!/usr/bin/env python3
"""Fuzz the RESP request reader, ``pubsub.resp.reader.RequestReader``.

The contract held here, for any bytes a client sends:

- ``feed`` and ``gets`` raise nothing but ``resp_reader.ProtocolError``, whose
  text is a Redis error ("ERR Protocol error: ..."); once it is raised the
  reader is spent: ``gets`` raises the same error again.
- Every request is a non-empty list of byte strings.
- Split invariance: fed in chunks split where the fuzzer chooses (``gets``
  called until None after each feed), the reader hands out the same
  requests and ends with the same error, or none, as when fed the input in
  one piece.
- No input hangs it: ``make fuzz`` runs this with libFuzzer's -timeout.

The reader's limits are chosen per input: no limits, a small
``max_request``, a small ``max_bulk``, and ``guarded`` (Redis's limits before
authentication). Lines longer than 64 KiB (Redis's PROTO_INLINE_MAX_SIZE,
which Redis itself applies per read, so split-dependent by design) are past
libFuzzer's default input size and not exercised here.

Input layout: a mode byte (the limits), a count of cuts, two bytes per cut
(offsets, little-endian), then the client's bytes.

Run: ``python tests/fuzz/fuzz_resp.py [libFuzzer options] CORPUS_DIR`` (``make fuzz``
runs it on a copy of tests/fuzz/corpus/resp). ``--write-seeds DIR`` writes
the seeds.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from pubsub.resp import reader as resp_reader

MAX_CUTS = 16

#: (max_bulk, max_request, guarded) by the mode byte.
LIMITS = [
    (512 * 1024 * 1024, 0, False),
    (512 * 1024 * 1024, 0, True),
    (512 * 1024 * 1024, 40, False),
    (16, 0, False),
    (16, 40, True),
]


def _read(chunks: list[bytes], limits: tuple[int, int, bool]) -> tuple[list, str | None]:
    """The requests read from ``chunks`` and the error that ended them, if any."""
    max_bulk, max_request, guarded = limits
    reader = resp_reader.RequestReader(max_bulk=max_bulk, max_request=max_request)
    reader.guarded = guarded
    requests: list[list[bytes]] = []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (request := reader.gets()) is not None:
                if not isinstance(request, list) or not request:
                    raise AssertionError(f"not a non-empty list: {request!r}")
                if not all(type(arg) is bytes for arg in request):
                    raise AssertionError(f"an argument that is not bytes: {request!r}")
                requests.append(request)
    except resp_reader.ProtocolError as error:
        message = str(error)
        if not message.startswith("ERR Protocol error: "):
            raise AssertionError(f"not a protocol error's text: {message!r}") from None
        # Spent: the same error again, whatever comes next.
        reader.feed(b"*1\r\n$4\r\nPING\r\n")
        try:
            reader.gets()
        except resp_reader.ProtocolError as again:
            if str(again) != message:
                raise AssertionError(f"a spent reader raised {again!r} after {error!r}") from None
        else:
            raise AssertionError(f"a spent reader read on after {error!r}")
        return requests, message
    return requests, None


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    limits = LIMITS[provider.ConsumeUInt(1) % len(LIMITS)]
    offsets = [provider.ConsumeUInt(2) for _ in range(provider.ConsumeUInt(1) % (MAX_CUTS + 1))]
    body = provider.ConsumeBytes(provider.remaining_bytes())
    points = sorted(offset % (len(body) + 1) for offset in offsets)
    chunks = [
        body[start:end] for start, end in zip([0, *points], [*points, len(body)], strict=True)
    ]
    split = _read(chunks, limits)
    whole = _read([body], limits)
    if split != whole:
        raise AssertionError(
            f"split at {points} under {limits}: {split!r}; in one piece: {whole!r}"
        )


def seed(mode: int, body: bytes, cuts: tuple[int, ...] = ()) -> bytes:
    """An input in this harness's layout (ConsumeUInt reads from the front, little-endian)."""
    return bytes([mode, len(cuts)]) + b"".join(struct.pack("<H", cut) for cut in cuts) + body


def bulk(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def seeds() -> dict[str, bytes]:
    pipeline = bulk(b"SUBSCRIBE", b"news") + bulk(b"PUBLISH", b"news", b"hi") + bulk(b"PING")
    return {
        "pipeline": seed(0, pipeline),
        "pipeline-split": seed(0, pipeline, (1, 5, 9, 20, 21, 33)),
        "inline": seed(0, b"PING\r\nECHO \"a\\x41\\n\" 'b\\'c'\nPUBLISH ch  msg\r\n\r\n"),
        "inline-unbalanced": seed(0, b'ECHO "abc\r\n'),
        "empty-counts": seed(0, b"*0\r\n*-1\r\n" + bulk(b"PING")),
        "odd-lengths": seed(0, b"*1\r\n$+4\r\nPING\r\n*01\r\n$04\r\nPING\r\n"),
        "bad-count": seed(0, b"*x\r\n"),
        "huge-count": seed(0, b"*2147483648\r\n"),
        "bad-bulk": seed(0, b"*1\r\n$-1\r\n"),
        "expected-dollar": seed(0, b"*1\r\n:4\r\nPING\r\n"),
        "nul-line": seed(0, b"*1\x00\r\n$4\r\nPING\r\n"),
        "guarded": seed(1, b"*11\r\n" + bulk(b"AUTH", b"x" * 20)),
        "guarded-bulk": seed(1, b"*1\r\n$16385\r\n"),
        "max-request": seed(2, bulk(b"PUBLISH", b"channel", b"x" * 40), (3, 30)),
        "max-request-inline": seed(2, b"PUBLISH channel " + b"x" * 40 + b"\r\n"),
        "max-bulk": seed(3, bulk(b"PUBLISH", b"c", b"x" * 17)),
        "partial": seed(4, bulk(b"PING")[:-3], (2,)),
    }


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (directory / name).write_bytes(data)


def main() -> None:
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
