"""Differential tests: random command sequences on real Redis 7 and on this server.

Each seed generates one sequence of commands spread over a few clients (see
tests/support/differential.py).  Every step runs on a private redis-server over
RESP3 and on an in-process server over WebSocket, and every client must observe
the same frames on both, once Redis's hash orders are normalized away.  A
mismatch fails with the seed, the step, both observations and the step log so
far, and names the test id that reruns just that sequence.  A fixed script of
edge cases runs the same way.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.support.differential import (
    KINDS,
    RedisSide,
    Step,
    WsSide,
    closing_steps,
    generate,
    normalize,
)
from tests.support.redis_server import redis_server

CLIENTS = 4
STEPS = 300
SEEDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
LOG_TAIL = 40


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


def _mismatch(label: str, step: Step, log: list[str], redis: list, ours: list) -> str:
    lines = [
        f"{label}: this server differs from redis-server at {step}",
        f"(rerun with: pytest 'tests/integration/test_differential.py::{label}')",
    ]
    for client in range(len(redis)):
        r = normalize(step, client, redis[client])
        o = normalize(step, client, ours[client])
        flag = "  " if r == o else "!!"
        lines.append(f"{flag} c{client} redis: {redis[client]!r}")
        lines.append(f"{flag} c{client} ours:  {ours[client]!r}")
    lines.append(f"the last {LOG_TAIL} steps before it (the whole log is in captured stdout):")
    lines.extend(log[-LOG_TAIL:])
    return "\n".join(lines)


@defer.inlineCallbacks
def _compare(label: str, steps: list[Step], server, connect):
    """Run ``steps`` on both servers; fails at the first step they disagree on.

    Fires with every step's observations (normalized) when all agreed.
    """
    ws = WsSide((yield defer.gatherResults([connect(server.port) for _ in range(CLIENTS)])))
    log: list[str] = []
    observations: list = []
    with redis_server() as port:
        redis = RedisSide(port, CLIENTS)
        try:
            for step in steps:
                redis_observed = redis.run(step)
                ours_observed = yield ws.run(step)
                expected = [normalize(step, c, redis_observed[c]) for c in range(CLIENTS)]
                if expected != [normalize(step, c, ours_observed[c]) for c in range(CLIENTS)]:
                    print(f"{label}: step log")
                    print("\n".join(log))
                    pytest.fail(_mismatch(label, step, log, redis_observed, ours_observed))
                log.append(f"{step} -> {_describe(redis_observed)}")
                observations.append(expected)
        finally:
            redis.close()
    return observations


def _assert_empty_at_end(steps: list[Step], observations: list) -> None:
    """closing_steps ends with NUMPAT, CHANNELS, SHARDCHANNELS: all empty."""
    assert [step.args[1] for step in steps[-3:]] == ["NUMPAT", "CHANNELS", "SHARDCHANNELS"]
    assert [seen[steps[-1].client] for seen in observations[-3:]] == [
        [["reply", 0]],
        [["reply", []]],
        [["reply", []]],
    ]


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed_{seed}" for seed in SEEDS])
@pytest_twisted.inlineCallbacks
def test_random_sequence_matches_redis(seed, server, connect):
    steps = generate(seed, STEPS, CLIENTS)
    steps += closing_steps(len(steps), CLIENTS)
    observations = yield _compare(
        f"test_random_sequence_matches_redis[seed_{seed}]", steps, server, connect
    )
    _assert_empty_at_end(steps, observations)


@pytest_twisted.inlineCallbacks
def test_edge_cases_match_redis(server, connect):
    steps = _edge_steps()
    steps += closing_steps(len(steps), CLIENTS)
    observations = yield _compare("test_edge_cases_match_redis", steps, server, connect)
    _assert_empty_at_end(steps, observations)


def test_sequences_cover_every_command():
    """Every seed's sequence issues every kind of command the test compares."""
    for seed in SEEDS:
        missing = set(KINDS) - {step.kind for step in generate(seed, STEPS, CLIENTS)}
        assert not missing, f"seed {seed} never sends {sorted(missing)}"
