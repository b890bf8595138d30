"""The installed ``pubsub-cli`` as a user runs it, against the test's server.

The script runs as a child process on the reactor, so the in-process server
keeps serving while it runs; ``sub`` says when it has subscribed, and the
test publishes only then.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.server import Site

from pubsub.web.front import FrontFactory
from tests.integration.test_auth import SECRET, token
from tests.integration.test_twistd import clean_environment

CLI = str(Path(sys.executable).with_name("pubsub-cli"))
WAIT = 60  # seconds; a bound on hangs, never a delay


class Cli(protocol.ProcessProtocol):
    """stdout line by line in ``lines``; ``ended`` fires with (status, stdout, stderr)."""

    def __init__(self) -> None:
        self.lines: defer.DeferredQueue = defer.DeferredQueue()
        self.ended: defer.Deferred = defer.Deferred()
        self.out = b""
        self.err = b""
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        self.out += data
        *whole, self._partial = (self._partial + data).split(b"\n")
        for line in whole:
            self.lines.put(line.decode())

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback((reason.value.exitCode, self.out.decode(), self.err.decode()))


def start(*args: str, env: dict[str, str] | None = None) -> Cli:
    cli = Cli()
    reactor.spawnProcess(cli, CLI, [CLI, *args], env=env or clean_environment())
    cli.ended.addTimeout(WAIT, reactor)
    return cli


def run(*args: str, env: dict[str, str] | None = None) -> defer.Deferred:
    """Fires with (exit status, stdout, stderr)."""
    return start(*args, env=env).ended


def url(server) -> str:
    return f"ws://127.0.0.1:{server.port}/"


@pytest_twisted.inlineCallbacks
def test_sub_json_prints_each_message_and_exits_after_count(server, connect):
    sub = start("--url", url(server), "sub", "news", "sport", "--count", "2", "--json")
    confirmation = json.loads((yield sub.lines.get().addTimeout(WAIT, reactor)))
    assert confirmation == {"type": "subscribe", "names": ["news", "sport"], "count": 2}
    publisher = yield connect(server.port)
    assert (yield publisher.call("PUBLISH", "news", "hello")) == [["reply", 1]]
    assert (yield publisher.call("PUBLISH", "sport", {"base64": "AP8="})) == [["reply", 1]]
    status, out, err = yield sub.ended
    assert status == 0, err
    assert [json.loads(line) for line in out.splitlines()[1:]] == [
        {"type": "message", "channel": "news", "data": "hello"},
        {"type": "message", "channel": "sport", "data": {"base64": "AP8="}},
    ]


@pytest_twisted.inlineCallbacks
def test_psub_prints_lines_for_people(server, connect):
    sub = start("psub", "news.*", "--count", "1", "--url", url(server))
    assert (yield sub.lines.get().addTimeout(WAIT, reactor)) == "psubscribed to news.*"
    publisher = yield connect(server.port)
    assert (yield publisher.call("PUBLISH", "news.uk", "tea")) == [["reply", 1]]
    status, out, err = yield sub.ended
    assert status == 0, err
    assert out.splitlines()[1:] == ["news.uk (news.*): tea"]


@pytest_twisted.inlineCallbacks
def test_sub_keeps_its_subscription_through_a_server_drop(server, connect):
    sub = start("--url", url(server), "sub", "news", "--count", "1")
    assert (yield sub.lines.get().addTimeout(WAIT, reactor)) == "subscribed to news"
    yield server.factory.close_all()
    publisher = yield connect(server.port)
    # The CLI is back once its resubscription counts; ask until it does.
    while (yield publisher.call("PUBSUB", "NUMSUB", "news")) != [["reply", ["news", 1]]]:
        yield publisher.call("PING")
    assert (yield publisher.call("PUBLISH", "news", "back")) == [["reply", 1]]
    status, out, err = yield sub.ended
    assert status == 0, err
    assert out.splitlines()[1:] == ["news: back"]
    assert "disconnected (1001 server shutting down); reconnecting" in err
    assert f"reconnected to {url(server)}" in err


@pytest_twisted.inlineCallbacks
def test_pub_prints_the_receiver_count(server, connect):
    subscriber = yield connect(server.port)
    yield subscriber.call("SUBSCRIBE", "news")
    status, out, err = yield run("--url", url(server), "pub", "news", "hello")
    assert (status, out, err) == (0, "1 receiver\n", "")
    assert (yield subscriber.next_frame()) == ["message", "news", "hello"]
    status, out, _ = yield run("--url", url(server), "--json", "pub", "empty", "x")
    assert (status, json.loads(out)) == (0, {"type": "published", "receivers": 0})


@pytest_twisted.inlineCallbacks
def test_stats_lists_channels_numsub_and_numpat(server, connect):
    alice = yield connect(server.port)
    bob = yield connect(server.port)
    yield alice.call("SUBSCRIBE", "news", "sport")
    yield bob.call("SUBSCRIBE", "news")
    yield bob.call("PSUBSCRIBE", "n*")
    status, out, err = yield run("--url", url(server), "stats", "--json")
    assert status == 0, err
    assert json.loads(out) == {"type": "stats", "channels": {"news": 2, "sport": 1}, "numpat": 1}
    status, out, err = yield run("--url", url(server), "stats", "s*")
    assert (status, out) == (0, "sport: 1\npatterns: 1\n")


@pytest_twisted.inlineCallbacks
def test_stats_lists_a_channel_whose_name_is_not_utf8_without_a_count(server, connect):
    """Such a name comes from a RESP client; over WebSocket it can be listed, not asked about."""
    alice = yield connect(server.port)
    yield alice.call("SUBSCRIBE", "news")
    token = server.engine.register(_Silent())
    server.engine.subscribe(token, [b"caf\xe9"])
    status, out, err = yield run("--url", url(server), "stats")
    assert (status, out) == (
        0,
        "caf\\xe9: unknown (not UTF-8: ask over RESP)\nnews: 1\npatterns: 0\n",
    ), err
    status, out, err = yield run("--url", url(server), "stats", "--json")
    assert status == 0, err
    assert json.loads(out)["channels"] == {"caf\\xe9": None, "news": 1}


class _Silent:
    encoder = None

    def deliver(self, frame: object) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_an_unreachable_server_is_one_line_and_status_1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"ws://127.0.0.1:{s.getsockname()[1]}/"
    for args in (("pub", "news", "x"), ("sub", "news"), ("stats",)):
        status, out, err = yield run("--url", target, *args)
        assert status == 1
        assert out == ""
        assert err.startswith(f"pubsub-cli: cannot connect to {target}: ")
        assert len(err.splitlines()) == 1, err


@pytest_twisted.inlineCallbacks
def test_a_server_error_is_reported_with_status_1(make_server):
    server = yield make_server(max_name_length=4)
    status, out, err = yield run("--url", url(server), "pub", "too-long", "x")
    assert (status, out) == (1, "")
    assert err == "pubsub-cli: server error: ERR channel name is longer than the limit of 4 bytes\n"


@pytest_twisted.inlineCallbacks
def test_the_token_comes_from_the_environment(server, monkeypatch):
    # The server keeps the URL it was asked for: the token reaches it as ?token=.
    seen = []
    original = server.factory.protocol.onConnect

    def remember(protocol, request):
        seen.append(request.params.get("token"))
        return original(protocol, request)

    monkeypatch.setattr(server.factory.protocol, "onConnect", remember)
    env = {**clean_environment(), "PUBSUB_TOKEN": "from-env"}
    status, _, err = yield run("--url", url(server), "pub", "a", "x", env=env)
    assert status == 0, err
    status, _, err = yield run("--url", url(server), "--token", "given", "pub", "a", "x")
    assert status == 0, err
    assert seen == [["from-env"], ["given"]]


@pytest_twisted.inlineCallbacks
def test_sub_exits_1_naming_the_reason_when_its_token_expires(make_server):
    server = yield make_server(jwt_secret=SECRET)
    short = token(subscribe=["news"], lifetime=1.5)
    sub = start("--url", url(server), "--token", short, "sub", "news")
    assert (yield sub.lines.get().addTimeout(WAIT, reactor)) == "subscribed to news"
    status, out, err = yield sub.ended  # the server closes it when the token expires
    assert (status, out) == (1, "subscribed to news\n")
    assert len(err.splitlines()) == 1, err
    assert err.startswith("pubsub-cli: ")
    assert "token expired (4001)" in err
    assert "reconnecting" not in err


@pytest_twisted.inlineCallbacks
def test_a_refused_token_is_one_line_and_status_1(make_server):
    server = yield make_server(jwt_secret=SECRET)
    for args in (("sub", "news"), ("pub", "news", "x")):
        status, out, err = yield run("--url", url(server), "--token", "forged", *args)
        assert (status, out) == (1, "")
        assert len(err.splitlines()) == 1, err
        assert "invalid token" in err


# -- recovery (docs/protocol.md, Recovery) ------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_sub_resume_prints_positions_and_recovers_what_it_missed_while_away(make_server, connect):
    server = yield make_server(history_channels="chat.*")
    sub = start("--url", url(server), "sub", "--resume", "chat.room", "--count", "3", "--json")
    resumed = json.loads((yield sub.lines.get().addTimeout(WAIT, reactor)))
    assert resumed == {
        "type": "resume",
        "channel": "chat.room",
        "recovered": True,
        "position": {"epoch": "", "offset": 0},
        "reason": None,
    }
    publisher = yield connect(server.port)
    yield publisher.call("PUBLISH", "chat.room", "1")
    first = json.loads((yield sub.lines.get().addTimeout(WAIT, reactor)))
    # Cut it off, and keep it off while "2" is published: only the history has it.
    port = server.port
    yield server.listening.stopListening()
    [connection] = [c for c in server.factory.connections if c._subscribed()]
    connection.transport.abortConnection()
    yield publisher.call("PUBLISH", "chat.room", "2")
    endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
    server.listening = yield endpoint.listen(FrontFactory(Site(server.resource)))
    yield publisher.call("PUBLISH", "chat.room", "3")  # replayed or live: once either way
    status, out, err = yield sub.ended
    assert status == 0, err
    epoch = first["position"]["epoch"]
    assert [json.loads(line) for line in out.splitlines()[1:]] == [
        {
            "type": "message",
            "channel": "chat.room",
            "data": str(n),
            "position": {"epoch": epoch, "offset": n},
        }
        for n in (1, 2, 3)
    ]
    assert "reconnecting" in err and "cannot recover" not in err


@pytest_twisted.inlineCallbacks
def test_sub_from_a_position_prints_what_followed_it(make_server, connect):
    server = yield make_server(history_channels="chat.*")
    publisher = yield connect(server.port)
    for number in range(1, 6):
        publisher.send("PUBLISH", "chat.room", f"m{number}")
    *_, [_, _, where, _] = yield publisher.call("HISTORY", "chat.room", "0")
    epoch = where["epoch"]
    status, out, err = yield run(
        "--url", url(server), "sub", "chat.room", "--from", f"{epoch}:3", "--count", "2"
    )
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"resumed chat.room at {epoch}:5",
        f"chat.room [{epoch}:4]: m4",
        f"chat.room [{epoch}:5]: m5",
    ]


@pytest_twisted.inlineCallbacks
def test_sub_says_on_stderr_when_what_it_missed_cannot_be_recovered(make_server, connect):
    server = yield make_server(history_channels="chat.*", history_size=2)
    publisher = yield connect(server.port)
    for number in range(1, 6):
        publisher.send("PUBLISH", "chat.room", f"m{number}")
    *_, [_, _, where, _] = yield publisher.call("HISTORY", "chat.room", "0")
    epoch = where["epoch"]
    sub = start("--url", url(server), "sub", "chat.room", "--from", f"{epoch}:1", "--count", "1")
    line = yield sub.lines.get().addTimeout(WAIT, reactor)
    assert line == f"resumed chat.room at {epoch}:5, not recovered"
    yield publisher.call("PUBLISH", "chat.room", "live")  # it goes on
    status, out, err = yield sub.ended
    assert status == 0, err
    assert out.splitlines()[1:] == [f"chat.room [{epoch}:6]: live"]
    assert err == (
        "pubsub-cli: cannot recover what was missed on chat.room: "
        f"messages after the position are no longer kept (now at {epoch}:5)\n"
    )


@pytest_twisted.inlineCallbacks
def test_sub_from_takes_one_channel_and_a_position(server):
    for args in (("a", "b", "--from", "e:1"), ("a", "--from", "e"), ("a", "--from", "e:x")):
        status, out, err = yield run("--url", url(server), "sub", *args)
        assert (status, out) == (2, ""), err
        assert "--from" in err
