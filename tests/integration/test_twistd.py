"""The installed `twistd pubsub` as a real process: serve, round trip, SIGTERM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone

from pubsub.operations.config import Settings
from tests.support.processes import ServerProcess, ServerWithResp
from tests.support.resp3 import SimpleString
from tests.support.respclient import CLOSED

TWISTD = str(Path(sys.executable).with_name("twistd"))


def clean_environment() -> dict[str, str]:
    """The environment without PYTHONPATH, so only the installed package is found."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PUBSUB_")}
    return env


def run_twistd(cwd, *options: str) -> subprocess.CompletedProcess:
    """``twistd -n --pidfile= pubsub OPTIONS`` to completion, as a user would run it."""
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "pubsub", *options],
        capture_output=True,
        text=True,
        env=clean_environment(),
        cwd=cwd,
        timeout=60,
        check=False,
    )


@pytest_twisted.inlineCallbacks
def test_twistd_serves_and_exits_cleanly_on_sigterm(tmp_path, connect):
    process = ServerProcess(rb"Site starting on (\d+)")
    args = [TWISTD, "-n", "--pidfile=", "pubsub", "--port", "tcp:0:interface=127.0.0.1"]
    transport = reactor.spawnProcess(
        process, TWISTD, args, env=clean_environment(), path=str(tmp_path)
    )
    try:
        port = yield process.listening
        alice = yield connect(port)
        bob = yield connect(port)
        assert (yield alice.call("SUBSCRIBE", "news")) == [["subscribe", "news", 1]]
        assert (yield bob.call("PUBLISH", "news", "hello")) == [["reply", 1]]
        assert (yield alice.next_frame()) == ["message", "news", "hello"]
    finally:
        if not process.ended.called:
            transport.signalProcess("TERM")
    # Every client is told the server is going away before the process exits.
    for client in (alice, bob):
        _, code, reason = yield client.closed
        assert (code, reason) == (1001, "server shutting down")
    exit_code = yield process.ended
    output = process.output.decode(errors="replace")
    assert exit_code == 0, output
    assert "Traceback" not in output
    assert "Server Shut Down" in output


def test_twistd_help_lists_every_setting_with_its_default(tmp_path):
    result = run_twistd(tmp_path, "--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for f in fields(Settings):
        option = "--" + f.name.replace("_", "-")
        assert option in help_text
        assert f"[default: {f.default}]" in help_text
    assert "--config" in help_text


def test_twistd_rejects_a_bad_setting_with_a_clear_message(tmp_path):
    result = run_twistd(tmp_path, "--max-message-size", "-5")
    assert result.returncode != 0
    assert "max_message_size must not be negative" in result.stdout + result.stderr


@pytest.mark.parametrize("port", ["tcp:notaport", "nosuchendpoint:1"])
def test_twistd_rejects_a_bad_port(tmp_path, port):
    result = run_twistd(tmp_path, "--port", port)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"pubsub: setting port: cannot use '{port}'" in output
    assert "Traceback" not in output


def test_twistd_stops_with_a_clear_message_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd(tmp_path, "--port", str(port))
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"pubsub: cannot listen on tcp:{port}:interface=127.0.0.1" in output
    assert "Traceback" not in output


@pytest_twisted.inlineCallbacks
def test_twistd_serves_resp_and_sigterm_closes_resp_clients(tmp_path, connect, resp_connect):
    process = ServerWithResp()
    local = "tcp:0:interface=127.0.0.1"
    args = [TWISTD, "-n", "--pidfile=", "pubsub", "--port", local, "--resp-port", local]
    transport = reactor.spawnProcess(
        process, TWISTD, args, env=clean_environment(), path=str(tmp_path)
    )
    try:
        port, resp_port = yield process.listening.addTimeout(30, reactor)
        resp_subscriber = yield resp_connect(resp_port)
        resp_publisher = yield resp_connect(resp_port)
        ws = yield connect(port)
        assert (yield resp_publisher.call("PING")) == [SimpleString("PONG")]
        assert (yield resp_subscriber.call("SUBSCRIBE", "news")) == [[b"subscribe", b"news", 1]]
        assert (yield ws.call("SUBSCRIBE", "news")) == [["subscribe", "news", 1]]
        # RESP to both transports, bytes that are not UTF-8 included.
        assert (yield resp_publisher.call("PUBLISH", "news", b"\x00\xff")) == [2]
        assert (yield ws.drain()) == [["message", "news", {"base64": "AP8="}]]
        # WebSocket to both.
        assert (yield ws.call("PUBLISH", "news", "from the web")) == [
            ["message", "news", "from the web"],
            ["reply", 2],
        ]
        assert (yield resp_subscriber.drain()) == [
            [b"message", b"news", b"\x00\xff"],
            [b"message", b"news", b"from the web"],
        ]
    finally:
        if not process.ended.called:
            transport.signalProcess("TERM")
    # Every RESP client is closed cleanly, the WebSocket one told 1001.
    for client in (resp_subscriber, resp_publisher):
        reason = yield client.closed.addTimeout(30, reactor)
        assert isinstance(reason, ConnectionDone), reason
        assert (yield client.next_value()) is CLOSED
    _, code, reason = yield ws.closed.addTimeout(30, reactor)
    assert (code, reason) == (1001, "server shutting down")
    exit_code = yield process.ended.addTimeout(30, reactor)
    output = process.output.decode(errors="replace")
    assert exit_code == 0, output
    assert "Traceback" not in output
    assert "Server Shut Down" in output


def test_twistd_stops_with_a_clear_message_when_the_resp_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd(
            tmp_path, "--port", "tcp:0:interface=127.0.0.1", "--resp-port", str(port)
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, output
    assert f"pubsub: cannot listen on tcp:{port}:interface=127.0.0.1: " in lines[0]
    assert "Traceback" not in output


@pytest.mark.parametrize("resp_port", ["tcp:notaport", "nosuchendpoint:1"])
def test_twistd_rejects_a_bad_resp_port(tmp_path, resp_port):
    result = run_twistd(tmp_path, "--port", "tcp:0:interface=127.0.0.1", "--resp-port", resp_port)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"pubsub: setting resp_port: cannot use '{resp_port}'" in output
    assert "Traceback" not in output


def test_twistd_stops_with_a_clear_message_when_a_unix_socket_cannot_be_made(tmp_path):
    # Listening on a UNIX socket fails with a plain OSError, not CannotListenError.
    path = tmp_path / "no" / "such" / "dir" / "resp.sock"
    result = run_twistd(
        tmp_path, "--port", "tcp:0:interface=127.0.0.1", "--resp-port", f"unix:{path}"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"pubsub: cannot listen on unix:{path}: " in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "options, message",
    [
        (["--jwt-secret", "short"], "setting jwt_secret must be at least 32 bytes long"),
        (["--jwt-public-key", "absent.pem"], "setting jwt_public_key: cannot read absent.pem"),
        (["--anonymous", "deny"], "setting anonymous is deny but no jwt_secret"),
        (["--anonymous", "sometimes"], "setting anonymous must be allow, deny or empty"),
    ],
)
def test_twistd_stops_with_a_clear_message_on_bad_auth_settings(tmp_path, options, message):
    result = run_twistd(tmp_path, "--port", "0", *options)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"pubsub: {message}" in output
    assert "Traceback" not in output
