"""Differential testing against a real redis-server: sequences, both sides, comparison.

A *sequence* is a list of :class:`Step` objects, each one command issued by one
of a few clients, generated from a seed alone (so a failure reproduces from its
seed).  A :class:`Side` runs a step on one server for every client and returns
the frames each client received during the step.  Three pairings are compared:

* this server over WebSocket against Redis over RESP3, both in the JSON frame
  model of docs/protocol.md (:func:`json_frame` translates Redis's frames);
* this server's RESP port against Redis, both in RESP2, and both in RESP3
  (a :class:`RespSide` each, the same client code on both): every frame
  byte for byte (:func:`raw_frame`), which includes RESP2's subscribed mode,
  where Redis refuses most commands and answers PING with ``["pong", ...]``.

:func:`normalize` then removes the orderings that come from Redis's hash
tables (see its docstring); everything else must match exactly.

How a step is observed, on both sides: the command is sent on the issuing client
followed by a PING with a unique marker, and everything up to the marker's echo
is that client's share.  Only then is every other client synced the same way.
Redis delivers a publish to its subscribers before it replies to the publisher
(and this server delivers synchronously inside the publish), so once the issuer's
marker is back every push the step caused is already queued on the other
connections, ahead of their markers.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from tests.support import respclient
from tests.support.resp3 import (
    Frame,
    Push,
    RespError,
    SimpleString,
    split_aggregate,
)

__all__ = [
    "JSON_FRAMES",
    "KINDS",
    "RESP_FRAMES",
    "RespSide",
    "Side",
    "Step",
    "closing_steps",
    "generate",
    "json_frame",
    "normalize",
    "raw_frame",
    "resp3_frame",
]

# Names chosen to collide: every one is used as a channel, a shard channel and a
# pattern, so literal channels such as "a*" meet patterns such as "a*", and the
# malformed globs ("[", "a[", "\\") exercise stringmatchlen's edge cases.
CHANNELS = ["a", "b", "ab", "ba", "a.b", "news.x", "news.", "*", "?", "[", "a*", "\\*"]
PATTERNS = [
    "a",
    "a*",
    "a?",
    "[ab]*",
    "*b",
    "news.*",
    "\\*",
    "*",
    "?",
    "[^a]*",
    "[a-b]",
    "a[",
    "[",
    "\\",
]
EMPTY_NAME_CHANCE = 0.04

_UNSUBSCRIBERS = ("unsubscribe", "punsubscribe", "sunsubscribe")

#: The kinds of command a sequence is made of ("-all": without names), and
#: how often each is drawn.
KINDS = {
    "subscribe": 10,
    "unsubscribe": 5,
    "unsubscribe-all": 2,
    "psubscribe": 10,
    "punsubscribe": 5,
    "punsubscribe-all": 2,
    "ssubscribe": 6,
    "sunsubscribe": 3,
    "sunsubscribe-all": 1.5,
    "publish": 22,
    "spublish": 8,
    "channels": 3,
    "numsub": 3,
    "numpat": 2,
    "shardchannels": 2,
    "shardnumsub": 2,
    "ping": 2,
    "error": 4,
}


@dataclass(frozen=True)
class Step:
    index: int
    client: int
    args: tuple[str, ...]
    kind: str = ""  # what the generator meant to send, e.g. "punsubscribe-all", "error"

    @property
    def name(self) -> str:
        return self.args[0].lower()

    @property
    def subcommand(self) -> str | None:
        if self.name == "pubsub" and len(self.args) > 1:
            return self.args[1].lower()
        return None

    def __str__(self) -> str:
        return f"step {self.index:3d} c{self.client}: {list(self.args)!r}"


class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed

    def _pick(self, pool: list[str]) -> str:
        if self.rng.random() < EMPTY_NAME_CHANCE:
            return ""
        return self.rng.choice(pool)

    def channel(self) -> str:
        return self._pick(CHANNELS)

    def pattern(self) -> str:
        return self._pick(PATTERNS)

    def name(self) -> str:
        """A channel or a pattern: subscribing to "a*" literally is allowed too."""
        return self._pick(CHANNELS if self.rng.random() < 0.7 else PATTERNS)

    def names(self, pool, low: int, high: int) -> list[str]:
        return [pool() for _ in range(self.rng.randint(low, high))]

    def case(self, word: str) -> str:
        roll = self.rng.random()
        if roll < 0.15:
            return word.lower()
        if roll < 0.2:
            return word.capitalize()
        return word

    def command(self, index: int) -> tuple[str, list[str]]:
        choice = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        return choice, self._args(choice, f"p{self.seed}-{index}")

    def _args(self, choice: str, payload: str) -> list[str]:
        c = self.case
        if choice == "subscribe":
            return [c("SUBSCRIBE"), *self.names(self.name, 1, 3)]
        if choice == "psubscribe":
            return [c("PSUBSCRIBE"), *self.names(self.pattern, 1, 3)]
        if choice == "ssubscribe":
            return [c("SSUBSCRIBE"), *self.names(self.name, 1, 3)]
        if choice == "unsubscribe":
            return [c("UNSUBSCRIBE"), *self.names(self.name, 1, 2)]
        if choice == "punsubscribe":
            return [c("PUNSUBSCRIBE"), *self.names(self.pattern, 1, 2)]
        if choice == "sunsubscribe":
            return [c("SUNSUBSCRIBE"), *self.names(self.name, 1, 2)]
        if choice.endswith("-all"):
            return [c(choice[: -len("-all")].upper())]
        if choice == "publish":
            return [c("PUBLISH"), self.channel(), payload]
        if choice == "spublish":
            return [c("SPUBLISH"), self.channel(), payload]
        if choice in ("channels", "shardchannels"):
            pattern = [self.pattern()] if self.rng.random() < 0.6 else []
            return [c("PUBSUB"), c(choice.upper()), *pattern]
        if choice in ("numsub", "shardnumsub"):
            return [c("PUBSUB"), c(choice.upper()), *self.names(self.channel, 0, 3)]
        if choice == "numpat":
            return [c("PUBSUB"), c("NUMPAT")]
        if choice == "ping":
            return [c("PING"), payload] if self.rng.random() < 0.7 else [c("PING")]
        return self.bad_command(payload)

    def bad_command(self, payload: str) -> list[str]:
        c = self.case
        return self.rng.choice(
            [
                [c("SUBSCRIBE")],
                [c("PSUBSCRIBE")],
                [c("SSUBSCRIBE")],
                [c("PUBLISH")],
                [c("PUBLISH"), self.channel()],
                [c("PUBLISH"), self.channel(), payload, "extra"],
                [c("SPUBLISH"), self.channel()],
                [c("PUBSUB")],
                [c("PUBSUB"), c("NUMPAT"), "x"],
                [c("PUBSUB"), c("CHANNELS"), "a*", "b*"],
                [c("PUBSUB"), c("SHARDCHANNELS"), "a", "b"],
                [c("PUBSUB"), "NOSUCH"],
                [c("PUBSUB"), "nosuch", "a"],
                [c("PING"), payload, "extra"],
                ["NOSUCHCOMMAND"],
                ["nosuch", self.channel(), payload],
                ["SUBSCRIBEX", "a"],
                ["", "a"],
            ]
        )


def generate(seed: int, steps: int, clients: int) -> list[Step]:
    """``steps`` random commands spread over ``clients`` clients."""
    gen = _Generator(seed)
    sequence = []
    for index in range(steps):
        client = gen.rng.randrange(clients)
        kind, args = gen.command(index)
        sequence.append(Step(index, client, tuple(args), kind))
    return sequence


def closing_steps(start: int, clients: int) -> list[Step]:
    """Every client leaves everything, then the server must hold nothing."""
    args = [("UNSUBSCRIBE",), ("PUNSUBSCRIBE",), ("SUNSUBSCRIBE",)]
    steps = [
        Step(start + i, client, a)
        for i, (client, a) in enumerate(itertools.product(range(clients), args))
    ]
    start += len(steps)
    for i, query in enumerate([("NUMPAT",), ("CHANNELS",), ("SHARDCHANNELS",)]):
        steps.append(Step(start + i, 0, ("PUBSUB", *query)))
    return steps


# -- the two sides ------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def resp3_frame(value: Any, step: Step) -> list:
    """One RESP3 reply or push as the JSON frame docs/protocol.md gives for it."""
    if isinstance(value, Push):
        return _plain(list(value))
    if isinstance(value, RespError):
        return ["error", str(value)]
    if isinstance(value, SimpleString):
        if value == "PONG":
            return ["pong", ""]
        raise AssertionError(f"unexpected simple string {value!r} for {step}")
    if isinstance(value, bytes) and step.name == "ping":
        return ["pong", value.decode("utf-8")]
    if isinstance(value, (int, list, bytes)) and not isinstance(value, bool):
        return ["reply", _plain(value)]
    raise AssertionError(f"unexpected RESP3 value {value!r} for {step}")


def json_frame(frame: Frame, step: Step) -> list:
    """A RESP3 frame in the JSON model, to compare with WebSocket's frames."""
    return resp3_frame(frame.value, step)


def raw_frame(frame: Frame, step: Step) -> bytes:
    """A RESP frame byte for byte, to compare with another RESP server's."""
    return frame.raw


class Side:
    """One client per client, all on one server.

    A client is anything with ``call(*args)`` and ``drain()``, both firing
    with the frames received up to a PING marker, as a wsclient.FrameClient
    does (:class:`RespSide` reads whole RESP frames instead).
    ``convert(frame, step)`` turns each frame read into what is compared (by
    default the frame itself).
    """

    def __init__(self, clients: list, convert: Callable[[Any, Step], Any] | None = None) -> None:
        self.clients = clients
        self.convert = convert or (lambda frame, step: frame)

    @defer.inlineCallbacks
    def run(self, step: Step):
        """Fires with, for every client, the frames it received during ``step``."""
        issuer = self.clients[step.client]
        observed: list[list] = [[] for _ in self.clients]
        observed[step.client] = yield self.call(issuer, step.args)
        others = [i for i in range(len(self.clients)) if i != step.client]
        drained = yield defer.gatherResults(
            [self.drain(self.clients[i]) for i in others], consumeErrors=True
        )
        for i, frames in zip(others, drained, strict=True):
            observed[i] = frames
        return [[self.convert(frame, step) for frame in frames] for frames in observed]

    @staticmethod
    def call(client: Any, args: tuple[str, ...]) -> defer.Deferred:
        """Send one command on ``client``; fires with the frames it produced."""
        return client.call(*args)

    @staticmethod
    def drain(client: Any) -> defer.Deferred:
        """Fires with the frames ``client`` received and has not read yet."""
        return client.drain()

    def close(self) -> defer.Deferred:
        """Nothing to do here: the test's connect fixture closes WebSocket clients."""
        return defer.succeed(None)


class RespSide(Side):
    """A Side of respclient.RespClient connections, in RESP2 or RESP3, whose
    frames are :class:`~tests.support.resp3.Frame` objects: value and exact bytes."""

    @staticmethod
    def call(client: respclient.RespClient, args: tuple[str, ...]) -> defer.Deferred:
        return client.call_frames(*args)

    @staticmethod
    def drain(client: respclient.RespClient) -> defer.Deferred:
        return client.drain_frames()

    @classmethod
    @defer.inlineCallbacks
    def connect(cls, port: int, clients: int, protocol: int, convert: Callable[[Frame, Step], Any]):
        conns = yield defer.gatherResults(
            [respclient.connect(port, protocol) for _ in range(clients)], consumeErrors=True
        )
        return cls(conns, convert)

    def close(self) -> defer.Deferred:
        return defer.gatherResults([conn.close() for conn in self.clients], consumeErrors=True)


# -- comparison --------------------------------------------------------------


class _JsonFrames:
    """What :func:`normalize` needs to know of frames in the JSON model."""

    @staticmethod
    def confirmation(frame: list, kind: str) -> tuple[Any, Any] | None:
        """A ``kind`` confirmation's name, and the frame without it; else None."""
        if isinstance(frame, list) and len(frame) == 3 and frame[0] == kind:
            return frame[1], [frame[0], frame[2]]
        return None

    @staticmethod
    def is_pmessage(frame: list) -> bool:
        return isinstance(frame, list) and frame[:1] == ["pmessage"]

    @staticmethod
    def sorted_list(frame: list) -> list | None:
        """A reply that is a list, with the list sorted; else None."""
        if frame[:1] == ["reply"] and isinstance(frame[1], list):
            return ["reply", sorted(frame[1])]
        return None


def _bulk(text: str) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(text), text.encode("utf-8"))


class _RespFrames:
    """What :func:`normalize` needs to know of RESP frames, kept byte for byte:
    each name, count and header stays in its exact wire form."""

    @staticmethod
    def confirmation(frame: bytes, kind: str) -> tuple[Any, Any] | None:
        parts = split_aggregate(frame)
        if parts is None or len(parts[1]) != 3 or parts[1][0] != _bulk(kind):
            return None
        header, (kind_raw, name, count) = parts
        return name, header + kind_raw + count

    @staticmethod
    def is_pmessage(frame: bytes) -> bool:
        parts = split_aggregate(frame)
        return parts is not None and len(parts[1]) == 4 and parts[1][0] == _bulk("pmessage")

    @staticmethod
    def sorted_list(frame: bytes) -> bytes | None:
        parts = split_aggregate(frame)
        if parts is None or not frame.startswith(b"*"):
            return None
        return parts[0] + b"".join(sorted(parts[1]))


#: normalize's models: frames in the JSON model (WebSocket, and Redis's RESP3
#: translated to it), and RESP frames as received.
JSON_FRAMES = _JsonFrames()
RESP_FRAMES = _RespFrames()


def normalize(step: Step, client: int, frames: list, model: Any = JSON_FRAMES) -> list:
    """One client's frames for one step, with Redis's hash orders taken out.

    * An UNSUBSCRIBE, PUNSUBSCRIBE or SUNSUBSCRIBE without names confirms what
      the client held in hash order: its confirmations become one entry with
      the sorted names and, separately, the rest of each frame in order.
    * The pmessage frames of one publish reach a client in pattern hash order:
      each run of consecutive pmessage frames is sorted.
    * PUBSUB CHANNELS and SHARDCHANNELS list names in hash order: sorted.

    ``model`` is :data:`JSON_FRAMES` or :data:`RESP_FRAMES`, as the frames are.
    """
    if client == step.client and step.name in _UNSUBSCRIBERS and len(step.args) == 1 and frames:
        parts = [model.confirmation(frame, step.name) for frame in frames]
        if all(part is not None for part in parts):
            names = sorted((name for name, _ in parts), key=repr)
            return [[f"{step.name} (any order)", names, [rest for _, rest in parts]]]
    out: list = []
    run: list = []
    for frame in frames:
        if model.is_pmessage(frame):
            run.append(frame)
            continue
        out.extend(sorted(run))
        run = []
        if client == step.client and step.subcommand in ("channels", "shardchannels"):
            listed = model.sorted_list(frame)
            frame = frame if listed is None else listed
        out.append(frame)
    out.extend(sorted(run))
    return out
