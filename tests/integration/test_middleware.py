"""The two example middlewares in docs/examples, loaded by the setting into a real
`twistd pubsub`, with a WebSocket client and redis-py on each side."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
import redis
from twisted.internet import reactor

from tests.integration.test_auth import SECRET, token
from tests.integration.test_metrics import figure, scrape
from tests.integration.test_resp import in_thread, redis_py
from tests.integration.test_twistd import TWISTD, ServerWithResp, clean_environment, run_twistd

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
MIDDLEWARE = "middleware_rooms:RoomMembers,middleware_json:JsonOnly"
#: What every token here may do as far as the server's own permissions go;
#: the rooms are the middleware's to decide.
EVERYTHING = {"subscribe": ["*"], "publish": ["*"]}


def examples_environment() -> dict[str, str]:
    env = clean_environment()
    env["PYTHONPATH"] = str(EXAMPLES)  # where an operator keeps their own modules
    return env


def _redis_py_side(port: int) -> None:
    """Bob, a member of no room, from redis-py: what the middlewares refuse him."""
    bob = redis_py(port, 2, password=token("bob", **EVERYTHING))
    try:
        with pytest.raises(redis.exceptions.NoPermissionError, match="not a member of room blue"):
            bob.publish("room:blue", '{"hello": 1}')
        with pytest.raises(redis.exceptions.NoPermissionError, match="not valid JSON"):
            bob.publish("news", "not json")
        assert bob.publish("news", '{"ok": true}') == 1  # Alice listens to news
        pubsub = bob.pubsub()
        with pytest.raises(redis.exceptions.NoPermissionError, match="may not cover rooms"):
            pubsub.psubscribe("r*")
            pubsub.get_message(timeout=30)
        pubsub.close()
    finally:
        bob.close()


@pytest_twisted.inlineCallbacks
def test_the_example_middlewares_loaded_by_twistd_on_both_transports(tmp_path, connect):
    process = ServerWithResp()
    local = "tcp:0:interface=127.0.0.1"
    args = [TWISTD, "-n", "--pidfile=", "pubsub", "--port", local, "--resp-port", local]
    args += ["--jwt-secret", SECRET, "--middleware", MIDDLEWARE]
    transport = reactor.spawnProcess(
        process, TWISTD, args, env=examples_environment(), path=str(tmp_path)
    )
    try:
        port, resp_port = yield process.listening.addTimeout(30, reactor)
        alice = yield connect(port, "/?token=" + token("alice", rooms=["blue"], **EVERYTHING))
        assert (yield alice.call("SUBSCRIBE", "room:blue", "news")) == [
            ["subscribe", "room:blue", 1],
            ["subscribe", "news", 2],
        ]
        assert (yield alice.call("SUBSCRIBE", "room:red")) == [
            ["error", "NOPERM not a member of room red"]
        ]
        assert (yield alice.call("PUBLISH", "room:blue", '{"x": 1}')) == [
            ["message", "room:blue", '{"x": 1}'],
            ["reply", 1],
        ]
        assert (yield alice.call("PUBLISH", "room:blue", "nope")) == [
            ["error", "NOPERM payload is not valid JSON"]
        ]
        yield in_thread(_redis_py_side, resp_port)
        assert (yield alice.drain()) == [["message", "news", '{"ok": true}']]
        samples = yield scrape(port)
        assert figure(samples, "pubsub_middleware_refusals_total", transport="websocket") == 2
        assert figure(samples, "pubsub_middleware_refusals_total", transport="resp") == 3
        assert figure(samples, "pubsub_middleware_failures_total", transport="resp") == 0
    finally:
        if not process.ended.called:
            transport.signalProcess("TERM")
    exit_code = yield process.ended.addTimeout(30, reactor)
    output = process.output.decode(errors="replace")
    assert exit_code == 0, output
    assert "Traceback" not in output


def test_twistd_stops_with_a_clear_message_when_a_middleware_cannot_be_loaded(tmp_path):
    result = run_twistd(tmp_path, "--port", "0", "--middleware", "middleware_rooms:RoomMembers")
    assert result.returncode != 0
    assert "setting middleware: cannot import 'middleware_rooms'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
