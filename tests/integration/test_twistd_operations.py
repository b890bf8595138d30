"""The installed `twistd pubsub` under operations settings: JSON logs, bounded shutdown."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import eventFromJSON, formatEvent

from tests.integration.test_twistd import TWISTD, ServerWithResp, clean_environment
from tests.support.processes import ServerProcess

LOCAL = "tcp:0:interface=127.0.0.1"


class SplitOutput(ServerProcess):
    """A ServerProcess that also keeps standard output on its own."""

    def __init__(self, ready: bytes) -> None:
        super().__init__(ready)
        self.stdout = b""

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        super().outReceived(data)

    def errReceived(self, data: bytes) -> None:
        super().outReceived(data)


def spawn(process, tmp_path, *options: str):
    args = [TWISTD, "-n", "--pidfile=", "pubsub", "--port", LOCAL, *options]
    return reactor.spawnProcess(process, TWISTD, args, env=clean_environment(), path=str(tmp_path))


@pytest_twisted.inlineCallbacks
def test_log_format_json_writes_one_json_object_per_line_and_none_per_message(tmp_path, connect):
    process = SplitOutput(rb"Site starting on (\d+)")
    transport = spawn(process, tmp_path, "--log-format", "json")
    messages = 300
    try:
        port = yield process.listening.addTimeout(30, reactor)
        subscriber = yield connect(port)
        publisher = yield connect(port)
        yield subscriber.call("SUBSCRIBE", "news")
        for n in range(messages):
            publisher.send("PUBLISH", "news", str(n))
        yield publisher.drain()
        received = []
        for _ in range(messages):
            received.append((yield subscriber.next_frame()))
        assert received == [["message", "news", str(n)] for n in range(messages)]
    finally:
        if not process.ended.called:
            transport.signalProcess("TERM")
    exit_code = yield process.ended.addTimeout(30, reactor)
    assert exit_code == 0, process.output.decode(errors="replace")
    lines = process.stdout.decode().splitlines()
    events = [eventFromJSON(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(json.loads(line), dict) for line in lines)
    texts = [formatEvent(event) for event in events]
    assert any(text.startswith("pubsub starting: WebSocket on tcp:0") for text in texts), texts
    assert any("Server Shut Down" in text for text in texts), texts
    assert len(lines) < messages / 3, texts  # start-up and shutdown, never per message


@pytest_twisted.inlineCallbacks
def test_sigterm_cuts_off_a_client_that_never_reads_after_shutdown_timeout(tmp_path, resp_connect):
    process = ServerWithResp()
    transport = reactor.spawnProcess(
        process,
        TWISTD,
        [
            *[TWISTD, "-n", "--pidfile=", "pubsub", "--port", LOCAL, "--resp-port", LOCAL],
            *["--output-buffer-hard", "0", "--output-buffer-soft", "0"],
            *["--shutdown-timeout", "1"],
        ],
        env=clean_environment(),
        path=str(tmp_path),
    )
    try:
        _, resp_port = yield process.listening.addTimeout(30, reactor)
        stalled = yield resp_connect(resp_port)
        publisher = yield resp_connect(resp_port)
        yield stalled.call("SUBSCRIBE", "news")
        stalled.transport.pauseProducing()  # reads nothing more from here on
        payload = b"x" * (512 * 1024)
        for _ in range(48):  # far more than the socket buffers on both sides hold
            assert (yield publisher.call("PUBLISH", "news", payload)) == [1]
    finally:
        if not process.ended.called:
            transport.signalProcess("TERM")
    # Without the timeout the server would wait on the stalled client for ever.
    exit_code = yield process.ended.addTimeout(60, reactor)
    output = process.output.decode(errors="replace")
    assert exit_code == 0, output
    assert "shutdown_timeout of 1.0 s passed: cutting off 1 connections" in output
    assert "Traceback" not in output
    stalled.transport.resumeProducing()
    yield stalled.closed.addTimeout(30, reactor)
