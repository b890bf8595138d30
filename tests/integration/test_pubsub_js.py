"""The browser client, pubsub/static/pubsub.js, run in Node.

tests/clients/pubsub_js.mjs uses the module against a real server as an
application would, with the ``ws`` package as its WebSocket, and prints what
it saw. When it prints DROP, this test drops every connection from the server
side, so reconnecting and resubscribing are tested against what a server
really does; CUT /path drops only the connections made to that path.
tests/clients/pubsub_js_recovery.mjs does the same for recovery, against a
server that keeps a history. tests/clients/pubsub_js_unit.mjs (node's test
runner) plays the server itself with mocked timers, for the backoff and
keep-alive rules and recovery frame by frame. `make test`
installs ``ws`` (npm ci in tests/clients); without node or the package the
test skips, and under PUBSUB_REQUIRE_REDIS (set by `make test`) it fails.
"""

from __future__ import annotations

import json
import os
import re
import time

import jwt
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.support.processes import NODE_CLIENTS, node_with


class NodeScript(protocol.ProcessProtocol):
    """Runs the script; each DROP line it prints aborts every server
    connection, each ``CUT /path`` line those made to that path."""

    def __init__(self, server) -> None:
        self.server = server
        self.out = b""
        self.err = b""
        self.drops = 0
        self.cuts = 0
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        done = self.out.count(b"\n")
        self.out += data
        for line in self.out.split(b"\n")[done:-1]:
            if line == b"DROP":
                self.drops += 1
                self._abort(None)
            elif line.startswith(b"CUT "):
                self.cuts += 1
                self._abort(line[4:].decode())

    def _abort(self, path: str | None) -> None:
        """Aborts the connections made to ``path``, or every one."""
        for connection in list(self.server.factory.connections):
            if path is None or connection.http_request_path == path:
                connection.transport.abortConnection()

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.inlineCallbacks
def test_pubsub_js_in_node(make_server, monkeypatch):
    node = node_with("ws")
    server = yield make_server(max_subscriptions=4)
    requests: list[tuple[str, str | None]] = []
    protocol_class = server.factory.protocol
    original = protocol_class.onConnect

    def remember(self, request):
        requests.append((request.path, (request.params.get("token") or [None])[0]))
        return original(self, request)

    monkeypatch.setattr(protocol_class, "onConnect", remember)
    script = NodeScript(server)
    reactor.spawnProcess(
        script,
        node,
        [node, str(NODE_CLIENTS / "pubsub_js.mjs"), f"ws://127.0.0.1:{server.port}/live"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        path=str(NODE_CLIENTS),
    )
    code = yield script.ended
    assert code == 0, (script.out, script.err)
    assert script.drops == 2
    seen = json.loads(script.out.decode().strip().splitlines()[-1])
    refused = {"name": "PubSubError", "code": "ERR", "isPubSubError": True}
    assert seen == {
        "subscribe": 2,
        "psubscribe": 3,
        "publish": 2,
        "message": ["hello", "news"],
        "pmessage": ["n*", "news", "hello"],
        "publish_unicode": 1,
        "message_unicode": "héllo ✓",
        "publish_bytes": 1,
        "bytes": {"isUint8Array": True, "values": [0, 255, 10, 13]},
        "numsub": ["news", 1, "nobody", 0],
        "numpat": 1,
        "ping": ["", "hi"],
        "unknown_subcommand": refused,
        "over_the_limit": refused,
        "channels_after_refusal": ["news", "sport"],
        "after_errors": "still here",
        "unsubscribe": 2,
        "handlers_called": [
            ["news", "hello"],
            ["sport", "héllo ✓"],
            ["sport", "bytes"],
            ["news", "again"],
        ],
        "lost_code": 1006,
        "resubscribed": {"channels": ["news"], "patterns": ["n*"], "shardChannels": []},
        "queued": "queued while away",
        "publish_after_reconnect": 2,
        "message_after_reconnect": ["again", "news"],
        "unsubscribe_all": 1,
        "punsubscribe_all": 0,
        "held_at_the_end": [[], []],
        "states": ["reconnecting", "connecting", "open", "closed"],
        "after_close": {"name": "PubSubError", "code": "CLOSED", "isPubSubError": True},
        "publish_after_close": 0,
        "no_reconnect": ["closed", 1006],
        "bad_url": {"name": "TypeError", "isPubSubError": False},
    }
    # The token function was called again for the reconnect, and each token
    # reached the server in the URL; bob and the last client sent none.
    tokens = [token for _, token in requests if token is not None]
    assert tokens == ["token-1", "token-2"]
    assert {path for path, _ in requests} == {"/live"}
    assert len(requests) == 5
    assert server.engine.client_count == 0


@pytest_twisted.inlineCallbacks
def test_pubsub_js_rules_against_a_scripted_server():
    node = node_with("ws")
    out, err, code = yield getProcessOutputAndValue(
        node,
        ["--test", str(NODE_CLIENTS / "pubsub_js_unit.mjs")],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        path=str(NODE_CLIENTS),
    )
    report = out.decode(errors="replace")
    assert code == 0, report + err.decode(errors="replace")
    total = int(re.search(r"^# tests (\d+)$", report, re.MULTILINE).group(1))
    assert total > 0 and f"# pass {total}\n" in report


@pytest_twisted.inlineCallbacks
def test_pubsub_js_with_tokens(make_server):
    node = node_with("ws")
    secret = "a secret for the pubsub.js token test, 32 bytes or more"
    server = yield make_server(jwt_secret=secret)
    good = jwt.encode(
        {"sub": "web", "exp": time.time() + 600, "subscribe": ["news"], "publish": ["news"]},
        secret,
        algorithm="HS256",
    )
    expired = jwt.encode({"sub": "web", "exp": time.time() - 5}, secret, algorithm="HS256")
    out, err, code = yield getProcessOutputAndValue(
        node,
        [str(NODE_CLIENTS / "pubsub_js_auth.mjs"), f"ws://127.0.0.1:{server.port}/", good, expired],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        path=str(NODE_CLIENTS),
    )
    assert code == 0, (out, err)
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen == {
        "before_auth": {
            "code": "NOAUTH",
            "isPubSubError": True,
            "message": "NOAUTH Authentication required.",
        },
        "bad_auth": {
            "code": "WRONGPASS",
            "isPubSubError": True,
            "message": "WRONGPASS token has expired",
        },
        "auth": "OK",
        "subscribe": 1,
        "not_allowed": {
            "code": "NOPERM",
            "isPubSubError": True,
            "message": "NOPERM User web has no permissions to access the 'secret' channel",
        },
        "publish": 1,
        "message": ["with a token", "news"],
    }


def run_node_script(node: str, script: str, server, *args: str) -> NodeScript:
    """Starts ``script`` (in tests/clients) against ``server``; ``.ended`` fires
    with its exit code."""
    process = NodeScript(server)
    reactor.spawnProcess(
        process,
        node,
        [node, str(NODE_CLIENTS / script), f"ws://127.0.0.1:{server.port}/", *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        path=str(NODE_CLIENTS),
    )
    return process


@pytest_twisted.inlineCallbacks
def test_pubsub_js_cut_off_gets_every_message_once_in_order(make_server):
    """A steady publisher; the subscriber cut off three times, by either side,
    each time while more is published; every message arrives once, in order."""
    node = node_with("ws")
    server = yield make_server(history_channels="room:*", history_size=1000)
    script = run_node_script(node, "pubsub_js_recovery.mjs", server, "recover")
    code = yield script.ended
    assert code == 0, (script.out, script.err)
    assert script.cuts == 2
    seen = json.loads(script.out.decode().strip().splitlines()[-1])
    epoch = seen["epoch"]
    assert epoch
    assert seen["first"] == {
        "channel": "room:1",
        "recovered": True,
        "reason": None,
        "position": {"epoch": "", "offset": 0},
        "replayed": 0,
    }
    every = {"recovered": True, "replayedAtLeast10": True}
    assert seen["cuts"] == [
        {"side": "server", "code": 1006, **every},
        {"side": "client", "code": 1006, **every},
        {"side": "server", "code": 1006, **every},
    ]
    published = seen["published"]
    assert published >= 210
    assert seen["payloads"] == [str(n) for n in range(published)] + ["last"]
    assert seen["offsets"] == list(range(1, published + 2))
    assert seen["one_epoch"] is True
    # Messages marked recovered are exactly those the RESUMEs replayed.
    assert seen["recovered"] == seen["replayed"] >= 30
    assert seen["last_recovered"] is False
    assert seen["position"] == {"epoch": epoch, "offset": published + 1}
    assert seen["failures"] == []
    assert server.engine.client_count == 0


@pytest_twisted.inlineCallbacks
def test_pubsub_js_is_told_when_what_it_missed_cannot_be_recovered(make_server):
    node = node_with("ws")
    server = yield make_server(history_channels="room:*", history_size=5)
    script = run_node_script(node, "pubsub_js_recovery.mjs", server, "gap")
    code = yield script.ended
    assert code == 0, (script.out, script.err)
    assert script.cuts == 1
    seen = json.loads(script.out.decode().strip().splitlines()[-1])
    epoch = seen["epoch"]

    def at(offset: int) -> dict:
        return {"epoch": epoch, "offset": offset}

    lost = "messages after the position are no longer kept"
    no_history = "the channel keeps no history"
    assert seen["first"]["position"] == {"epoch": "", "offset": 0}
    assert seen["plain"] == {
        "channel": "plain",
        "recovered": True,
        "reason": None,
        "position": None,
        "replayed": 0,
    }
    assert seen["code"] == 1006
    # 20 were published while away; the history keeps 5: nothing replayed.
    # The channel without history cannot say what was missed: a failure too.
    assert seen["failures"] == [
        {"channel": "room:2", "reason": lost, "position": at(21)},
        {"channel": "plain", "reason": no_history, "position": None},
    ]
    assert seen["resumed"] == [
        {**failure, "recovered": False, "replayed": 0} for failure in seen["failures"]
    ]
    assert seen["received"] == [
        {"payload": "before", "channel": "room:2", "position": at(1), "recovered": False},
        {"payload": "live", "channel": "room:2", "position": at(22), "recovered": False},
        {"payload": "live too", "channel": "plain", "position": None, "recovered": False},
    ]
    assert seen["history"] == {
        "channel": "room:2",
        "position": at(22),
        "messages": [
            {"payload": "missed 18", "position": at(20)},
            {"payload": "missed 19", "position": at(21)},
            {"payload": "live", "position": at(22)},
        ],
    }
    assert seen["history_plain"] == {"channel": "plain", "position": None, "messages": []}
    # From a position kept elsewhere: replayed while kept, else told.
    assert seen["carol_kept"] == {
        "channel": "room:2",
        "recovered": True,
        "reason": None,
        "position": at(22),
        "replayed": 3,
    }
    assert seen["carol_received"] == ["missed 18", "missed 19", "live"]
    assert seen["carol_trimmed"] == {
        "channel": "room:2",
        "recovered": False,
        "reason": lost,
        "position": at(22),
        "replayed": 0,
    }
    assert seen["carol_failures"] == [{"channel": "room:2", "reason": lost, "position": at(22)}]
