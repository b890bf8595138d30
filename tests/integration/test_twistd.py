"""The installed `twistd pubsub` as a real process: serve, round trip, SIGTERM."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

TWISTD = str(Path(sys.executable).with_name("twistd"))


def clean_environment() -> dict[str, str]:
    """The environment without PYTHONPATH, so only the installed package is found."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PUBSUB_")}
    return env


class TwistdProcess(protocol.ProcessProtocol):
    """Collects output; ``listening`` fires with the port from twistd's log line."""

    def __init__(self) -> None:
        self.output = b""
        self.listening: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = re.search(rb"Site starting on (\d+)", self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.inlineCallbacks
def test_twistd_serves_and_exits_cleanly_on_sigterm(tmp_path, connect):
    process = TwistdProcess()
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
    exit_code = yield process.ended
    output = process.output.decode(errors="replace")
    assert exit_code == 0, output
    assert "Traceback" not in output
    assert "Server Shut Down" in output


def test_twistd_help_lists_every_setting_with_its_default(tmp_path):
    result = subprocess.run(
        [TWISTD, "pubsub", "--help"],
        capture_output=True,
        text=True,
        env=clean_environment(),
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    from dataclasses import fields

    from pubsub.config import Settings

    help_text = " ".join(result.stdout.split())
    for f in fields(Settings):
        option = "--" + f.name.replace("_", "-")
        assert option in help_text
        assert f"[default: {f.default}]" in help_text
    assert "--config" in help_text


def test_twistd_rejects_a_bad_setting_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [TWISTD, "-n", "pubsub", "--max-message-size", "-5"],
        capture_output=True,
        text=True,
        env=clean_environment(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "max_message_size must not be negative" in result.stdout + result.stderr


@pytest.mark.parametrize("port", ["tcp:notaport", "nosuchendpoint:1"])
def test_twistd_rejects_a_bad_port(tmp_path, port):
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "pubsub", "--port", port],
        capture_output=True,
        text=True,
        env=clean_environment(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"pubsub: setting port: cannot use '{port}'" in output
    assert "Traceback" not in output


def test_twistd_stops_with_a_clear_message_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "pubsub", "--port", str(port)],
            capture_output=True,
            text=True,
            env=clean_environment(),
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"pubsub: cannot listen on tcp:{port}:interface=127.0.0.1" in output
    assert "Traceback" not in output
