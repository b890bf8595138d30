"""Differential testing against a real redis-server: sequences, both sides, comparison.

A *sequence* is a list of :class:`Step` objects, each one command issued by one
of a few clients, generated from a seed alone (so a failure reproduces from its
seed).  :class:`RedisSide` runs a step on real Redis over RESP3 and
:class:`WsSide` on this server over WebSocket; both return, for every client,
the frames that client received during the step, in the JSON frame model of
PROTOCOL.md.  :func:`normalize` then removes the two orderings that come from
Redis's hash tables (see its docstring); everything else must match exactly.

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
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from tests.support.resp3 import Push, Resp3Client, RespError, SimpleString

__all__ = [
    "KINDS",
    "RedisSide",
    "Step",
    "WsSide",
    "closing_steps",
    "generate",
    "normalize",
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


# -- Redis over RESP3 --------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def resp3_frame(value: Any, step: Step) -> list:
    """One RESP3 reply or push as the JSON frame PROTOCOL.md gives for it."""
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


class RedisSide:
    """One Resp3Client per client, all on one redis-server."""

    def __init__(self, port: int, clients: int) -> None:
        self.conns: list[Resp3Client] = []
        for _ in range(clients):
            self.conns.append(Resp3Client("127.0.0.1", port))
        self._markers = itertools.count(1)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()

    def _marker(self) -> bytes:
        return b"#redis-sync-%d" % next(self._markers)

    @staticmethod
    def _until(conn: Resp3Client, marker: bytes, step: Step) -> list:
        frames = []
        while True:
            value = conn.read()
            if value == marker:
                return frames
            frames.append(resp3_frame(value, step))

    def run(self, step: Step) -> list[list]:
        issuer = self.conns[step.client]
        marker = self._marker()
        issuer.send(*(arg.encode("utf-8") for arg in step.args))
        issuer.send(b"PING", marker)
        observed: list[list] = [[] for _ in self.conns]
        observed[step.client] = self._until(issuer, marker, step)
        others = {}
        for i, conn in enumerate(self.conns):
            if i != step.client:
                others[i] = self._marker()
                conn.send(b"PING", others[i])
        for i, marker in others.items():
            observed[i] = self._until(self.conns[i], marker, step)
        return observed


# -- this server over WebSocket ----------------------------------------------


class WsSide:
    """One FrameClient per client, all on one in-process server."""

    def __init__(self, clients: list) -> None:
        self.clients = clients

    @defer.inlineCallbacks
    def run(self, step: Step):
        observed: list[list] = [[] for _ in self.clients]
        observed[step.client] = yield self.clients[step.client].call(*step.args)
        others = [i for i in range(len(self.clients)) if i != step.client]
        drained = yield defer.gatherResults(
            [self.clients[i].drain() for i in others], consumeErrors=True
        )
        for i, frames in zip(others, drained, strict=True):
            observed[i] = frames
        return observed


# -- comparison --------------------------------------------------------------


def _name_key(name: str | None) -> tuple[bool, str]:
    return (name is not None, name or "")


def normalize(step: Step, client: int, frames: list) -> list:
    """One client's frames for one step, with Redis's hash orders taken out.

    * An UNSUBSCRIBE, PUNSUBSCRIBE or SUNSUBSCRIBE without names confirms what
      the client held in hash order: its confirmations become one entry with
      the sorted names and, separately, the counts in order.
    * The pmessage frames of one publish reach a client in pattern hash order:
      each run of consecutive pmessage frames is sorted.
    * PUBSUB CHANNELS and SHARDCHANNELS list names in hash order: sorted.
    """
    if (
        client == step.client
        and step.name in _UNSUBSCRIBERS
        and len(step.args) == 1
        and frames
        and all(isinstance(f, list) and len(f) == 3 and f[0] == step.name for f in frames)
    ):
        names = sorted((f[1] for f in frames), key=_name_key)
        return [[f"{step.name} (any order)", names, [f[2] for f in frames]]]
    out: list = []
    run: list = []
    for frame in frames:
        if isinstance(frame, list) and frame[:1] == ["pmessage"]:
            run.append(frame)
            continue
        out.extend(sorted(run))
        run = []
        if (
            client == step.client
            and step.subcommand in ("channels", "shardchannels")
            and frame[:1] == ["reply"]
            and isinstance(frame[1], list)
        ):
            frame = ["reply", sorted(frame[1])]
        out.append(frame)
    out.extend(sorted(run))
    return out
