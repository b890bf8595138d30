"""Differential tests: random command sequences on real Redis 7 and on this server.

Each seed generates one sequence of commands spread over a few clients (see
tests/support/differential.py).  Every step runs on a private redis-server and
on an in-process server, and every client must observe the same frames on both,
once Redis's hash orders are normalized away.  Three transports are compared:

* ``ws``: this server over WebSocket against Redis over RESP3, in the JSON
  frame model;
* ``resp2`` and ``resp3``: this server's RESP port against Redis, both in the
  same protocol version and read by the same client, byte for byte.

A mismatch fails with the seed, the step, both observations and the step log so
far, and names the test id that reruns just that sequence.  A fixed script of
edge cases runs the same way.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString

from pubsub.resp.protocol import RespFactory
from tests.support.differential import (
    JSON_FRAMES,
    KINDS,
    RESP_FRAMES,
    RespSide,
    Side,
    Step,
    closing_steps,
    generate,
    json_frame,
    normalize,
    raw_frame,
)
from tests.support.redis_server import redis_server

CLIENTS = 4
STEPS = 300
SEEDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
LOG_TAIL = 40
TRANSPORTS = ["ws", "resp2", "resp3"]

#: What closing_steps' last three queries (NUMPAT, CHANNELS, SHARDCHANNELS)
#: observe once every client has left everything, by frame model.
EMPTY_AT_END = {
    "ws": [[["reply", 0]], [["reply", []]], [["reply", []]]],
    "resp": [[b":0\r\n"], [b"*0\r\n"], [b"*0\r\n"]],
}


# Edge cases that random sequences reach only by chance: PUBSUB subcommands at their minimum and maximum arity, rejected
# commands, unsubscribing while holding nothing, the empty name (which even "*"
# does not match) and malformed globs.  (client, args); payloads are added below.
EDGE_CASES: list[tuple[int, tuple[str, ...]]] = [
    (0, ("PUBSUB", "NUMPAT")),
    (0, ("PUBSUB", "CHANNELS")),
    (0, ("PUBSUB", "SHARDCHANNELS")),
    (0, ("PUBSUB", "NUMSUB")),
    (0, ("PUBSUB", "SHARDNUMSUB")),
    (0, ("PUBSUB", "NUMPAT", "x")),
    (0, ("PUBSUB", "CHANNELS", "a", "b")),
    (0, ("PUBSUB", "SHARDCHANNELS", "a", "b")),
    (0, ("PUBSUB",)),
    (0, ("PUBSUB", "nosuch", "a")),
    (0, ("SUBSCRIBE",)),
    (0, ("PUBLISH", "a")),
    (0, ("SPUBLISH", "a", "x", "y")),
    (0, ("PING", "a", "b")),
    (0, ("NOSUCH", "a", "b")),
    (0, ("", "a")),
    (0, ("UNSUBSCRIBE",)),
    (0, ("PUNSUBSCRIBE",)),
    (0, ("SUNSUBSCRIBE",)),
    (1, ("SUBSCRIBE", "", "a", "a*", "a")),
    (1, ("PSUBSCRIBE", "*", "", "[", "a[", "\\", "[^a]*", "a*")),
    (2, ("SSUBSCRIBE", "", "a", "a")),
    (2, ("PSUBSCRIBE", "a*", "?")),
    (3, ("SUBSCRIBE", "a")),
    (0, ("PUBLISH", "", "$")),
    (0, ("PUBLISH", "a", "$")),
    (0, ("PUBLISH", "a*", "$")),
    (0, ("PUBLISH", "[", "$")),
    (0, ("PUBLISH", "a[", "$")),
    (0, ("PUBLISH", "\\", "$")),
    (0, ("SPUBLISH", "", "$")),
    (0, ("SPUBLISH", "a", "$")),
    (0, ("PUBSUB", "CHANNELS")),
    (0, ("PUBSUB", "CHANNELS", "*")),
    (0, ("PUBSUB", "CHANNELS", "")),
    (0, ("PUBSUB", "NUMSUB", "", "a", "a", "x")),
    (0, ("PUBSUB", "NUMPAT")),
    (0, ("PUBSUB", "SHARDCHANNELS", "*")),
    (0, ("PUBSUB", "SHARDNUMSUB", "", "a")),
    (0, ("PING",)),
    (0, ("PING", "")),
    (1, ("PING", "$")),
    (1, ("UNSUBSCRIBE", "a", "nosuch")),
    (1, ("PUNSUBSCRIBE",)),
    (1, ("UNSUBSCRIBE",)),
    (2, ("SUNSUBSCRIBE",)),
]


def _edge_steps() -> list[Step]:
    steps = []
    for index, (client, args) in enumerate(EDGE_CASES):
        args = tuple(f"edge-{index}" if arg == "$" else arg for arg in args)
        steps.append(Step(index, client, args, "edge"))
    return steps


def _describe(observed: list[list]) -> str:
    return "; ".join(f"c{i}={frames!r}" for i, frames in enumerate(observed) if frames)


def _mismatch(label: str, step: Step, log: list[str], redis: list, ours: list, model) -> str:
    lines = [
        f"{label}: this server differs from redis-server at {step}",
        f"(rerun with: pytest 'tests/integration/test_differential.py::{label}')",
    ]
    for client in range(len(redis)):
        r = normalize(step, client, redis[client], model)
        o = normalize(step, client, ours[client], model)
        flag = "  " if r == o else "!!"
        lines.append(f"{flag} c{client} redis: {redis[client]!r}")
        lines.append(f"{flag} c{client} ours:  {ours[client]!r}")
    lines.append(f"the last {LOG_TAIL} steps before it (the whole log is in captured stdout):")
    lines.extend(log[-LOG_TAIL:])
    return "\n".join(lines)


@pytest.fixture
def resp_port(server):
    """The in-process server's engine also served over RESP, as resp_port serves it."""
    factory = RespFactory(server.engine, server.settings, reactor)
    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    listening = pytest_twisted.blockon(endpoint.listen(factory))
    yield listening.getHost().port
    pytest_twisted.blockon(factory.close_all())
    pytest_twisted.blockon(listening.stopListening())


@pytest.fixture
def open_sides(server, connect, resp_port):
    """open_sides(transport, redis_port) fires with (ours, redis, frame model)."""

    @defer.inlineCallbacks
    def open_sides(transport: str, redis_port: int):
        if transport == "ws":
            clients = yield defer.gatherResults([connect(server.port) for _ in range(CLIENTS)])
            redis = yield RespSide.connect(redis_port, CLIENTS, 3, json_frame)
            return Side(clients), redis, JSON_FRAMES
        protocol = int(transport.removeprefix("resp"))
        ours = yield RespSide.connect(resp_port, CLIENTS, protocol, raw_frame)
        redis = yield RespSide.connect(redis_port, CLIENTS, protocol, raw_frame)
        return ours, redis, RESP_FRAMES

    return open_sides


@defer.inlineCallbacks
def _compare(label: str, transport: str, steps: list[Step], open_sides):
    """Run ``steps`` on both servers; fails at the first step they disagree on.

    Fires with every step's observations (normalized) when all agreed.
    """
    log: list[str] = []
    observations: list = []
    with redis_server() as port:
        ours, redis, model = yield open_sides(transport, port)
        try:
            for step in steps:
                redis_observed, ours_observed = yield defer.gatherResults(
                    [redis.run(step), ours.run(step)], consumeErrors=True
                )
                expected = [normalize(step, c, redis_observed[c], model) for c in range(CLIENTS)]
                got = [normalize(step, c, ours_observed[c], model) for c in range(CLIENTS)]
                if expected != got:
                    print(f"{label}: step log")
                    print("\n".join(log))
                    pytest.fail(_mismatch(label, step, log, redis_observed, ours_observed, model))
                log.append(f"{step} -> {_describe(redis_observed)}")
                observations.append(expected)
        finally:
            yield defer.gatherResults([ours.close(), redis.close()], consumeErrors=True)
    return observations


def _assert_empty_at_end(transport: str, steps: list[Step], observations: list) -> None:
    """closing_steps ends with NUMPAT, CHANNELS, SHARDCHANNELS: all empty."""
    assert [step.args[1] for step in steps[-3:]] == ["NUMPAT", "CHANNELS", "SHARDCHANNELS"]
    assert [seen[steps[-1].client] for seen in observations[-3:]] == EMPTY_AT_END[
        "ws" if transport == "ws" else "resp"
    ]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed_{seed}" for seed in SEEDS])
@pytest_twisted.inlineCallbacks
def test_random_sequence_matches_redis(request, seed, transport, open_sides):
    steps = generate(seed, STEPS, CLIENTS)
    steps += closing_steps(len(steps), CLIENTS)
    observations = yield _compare(request.node.name, transport, steps, open_sides)
    _assert_empty_at_end(transport, steps, observations)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.inlineCallbacks
def test_edge_cases_match_redis(request, transport, open_sides):
    steps = _edge_steps()
    steps += closing_steps(len(steps), CLIENTS)
    observations = yield _compare(request.node.name, transport, steps, open_sides)
    _assert_empty_at_end(transport, steps, observations)


def test_sequences_cover_every_command():
    """Every seed's sequence issues every kind of command the test compares."""
    for seed in SEEDS:
        missing = set(KINDS) - {step.kind for step in generate(seed, STEPS, CLIENTS)}
        assert not missing, f"seed {seed} never sends {sorted(missing)}"
