"""Recovery with real processes, one node, no backplane (issue 17, part 5).

A real ``twistd pubsub`` node keeps the history of ``chat.*``; a steady
publisher (a RESP client) publishes numbered messages; subscribers are cut
off and come back:

- the Twisted Python client, through a proxy the test controls
  (tests/support/proxy.py), cut by the network (the proxy resets the
  connection: a RST), by a silent link (the proxy forwards nothing and
  closes nothing: the client's own pings must notice), and by the server
  (see below); in each case every message arrives once and in order, and
  some were published while it was away, so the history did bring them;
- ``pubsub-cli sub --resume``, killed mid-stream and started again with
  ``--from`` the last position it printed: the two outputs hold every
  message once and in order;
- and the failures, never a silent gap: a subscriber away for more messages
  than ``history_size`` keeps is told (the client's ``RecoveryFailed``, the
  CLI's line on stderr), and so is one that comes back to a node restarted
  without a backplane, whose history (and epoch) is new.

How the server cuts a subscriber: pubsub has no CLIENT KILL, ``idle_timeout``
spares subscribers (as in Redis), and a restart loses the history (that is
the failure case here). Its output buffer limits do cut a subscriber that
stops reading, but only after the kernel's socket buffers fill, which on
loopback takes megabytes. What is left, and real, is the server's keepalive:
with ``ping_interval``/``ping_timeout`` set, the proxy drops only what the
client sends (its pongs), the server decides the client is dead and drops
the connection, and the proxy passes that close on to the client, whose own
pings (20 s) are far from noticing anything by then.

Every wait is on an event or a count (tests/support/recovery.py); the
publisher's pace only bounds the traffic. The same harness can run these
scenarios with two nodes on a backplane, the subscriber coming back to the
other node (``proxy.forward_to``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from pubsub.client import DISCONNECTED, Recovery, RecoveryFailed
from tests.integration.test_cli import Cli
from tests.integration.test_cli import start as start_cli
from tests.integration.test_metrics import figure, scrape
from tests.support.proxy import TcpProxy
from tests.support.recovery import (
    WAIT,
    Rig,
    assert_every_message_once_in_order,
    cut_off,
)

# A bound on each test, far above what it takes (a few seconds), for loaded
# CI machines; the waits inside have their own, shorter bounds (WAIT).
pytestmark = pytest.mark.timeout(120)

CHANNEL = "chat.room"
HISTORY = ("--history-channels", "chat.*")
#: Enough history for every message a recovery test publishes.
ALL_KEPT = ("--history-size", "4000")
#: The history of the tests where it is too short.
KEPT = 10
#: Messages received live before each cut, and after the last one.
LIVE = 50
#: Messages the publisher has acknowledged while a subscriber is away, at least.
AWAY = 25
#: Cuts per test: the second resumes from a position the first recovery gave.
CUTS = 2
LOST = "messages after the position are no longer kept"
EPOCH_CHANGED = "the channel's history was lost since (its epoch changed)"
#: How the client describes a connection whose TCP ended without a close frame.
DROPPED = "peer dropped the TCP connection without previous WebSocket closing handshake"


@pytest.fixture
def rig(tmp_path):
    rig = Rig(str(tmp_path))
    yield rig
    pytest_twisted.blockon(rig.close())


def through(proxy: TcpProxy) -> str:
    return f"ws://127.0.0.1:{proxy.port}/"


# -- cut off and back: every message once, in order --------------------------------------


@dataclass(frozen=True)
class Kind:
    """One way to cut a subscriber off."""

    sever: Callable[[TcpProxy], None]
    #: How the client says its connection ended.
    reason: str
    #: Whether the proxy's silence must be healed to let the client back.
    heal: bool = False
    node_options: tuple[str, ...] = ()
    client_options: dict = field(default_factory=dict)
    #: Clients the node dropped for not answering its pings, by the end.
    ping_timeouts: int = 0


KINDS = {
    # A RST on both sides, as from a NAT that dropped the flow.
    "network reset": Kind(TcpProxy.reset, DROPPED),
    # Nothing more either way, no FIN, no RST: only the client's pings notice.
    "silent link": Kind(
        TcpProxy.go_silent,
        "WebSocket ping timeout (peer did not respond with pong in time)",
        heal=True,
        client_options={"ping_interval": 0.5, "ping_timeout": 2.0},
    ),
    # The client's pongs are lost: the server's ping_timeout drops it.
    "server ping timeout": Kind(
        lambda proxy: proxy.go_silent(toward_client=False),
        DROPPED,
        heal=True,
        node_options=("--ping-interval", "1", "--ping-timeout", "2"),
        ping_timeouts=CUTS,
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest_twisted.inlineCallbacks
def test_a_subscriber_cut_off_and_back_gets_every_message_once_in_order(rig, kind):
    how = KINDS[kind]
    node = yield rig.node(*HISTORY, *ALL_KEPT, *how.node_options)
    proxy = yield rig.proxy(node.ws_port)
    subscriber = yield rig.subscriber(through(proxy), CHANNEL, **how.client_options)
    assert subscriber.resumed == Recovery(CHANNEL, True, None, ("", 0))
    publisher = yield rig.publisher(node.resp_port, CHANNEL)
    cuts = []
    taken = 0
    for _ in range(CUTS):
        yield subscriber.until(taken + LIVE)
        cut = yield cut_off(
            subscriber, publisher, proxy, lambda: how.sever(proxy), AWAY, heal=how.heal
        )
        cuts.append(cut)
        taken = cut.acked_back  # what it missed, replayed; the live ones follow
    yield subscriber.until(taken + LIVE)
    total = yield publisher.stop()
    yield subscriber.until(total)

    assert_every_message_once_in_order(subscriber.messages, total)
    assert subscriber.failures == []
    for cut in cuts:
        assert how.reason in cut.reason, cut
        # The publisher went on while the subscriber was away, and the node
        # had taken messages the subscriber lacked before it came back: the
        # history brought them.
        assert cut.published_away > 0, cut
        assert cut.missed >= AWAY, cut
    samples = yield scrape(node.ws_port)
    assert figure(samples, "pubsub_recoveries_total", result="recovered") == CUTS
    assert figure(samples, "pubsub_recoveries_total", result="failed") == 0
    assert figure(samples, "pubsub_ping_timeouts_total") == how.ping_timeouts


# -- a client restarted: pubsub-cli sub --resume, then --from -----------------------------


@pytest.fixture
def cli(rig):
    """cli(node, *sub arguments): ``pubsub-cli --json sub CHANNEL ...`` on
    the node; any still running after the test is killed."""
    running: list[Cli] = []

    def sub(node, *args: str) -> Cli:
        process = start_cli("--url", node.url, "--json", "sub", CHANNEL, *args)
        running.append(process)
        return process

    yield sub
    for process in running:
        if not process.ended.called:
            process.transport.signalProcess("KILL")
        pytest_twisted.blockon(process.ended)


@defer.inlineCallbacks
def next_object(process: Cli):
    """The next line ``process`` prints, as JSON."""
    try:
        line = yield process.lines.get().addTimeout(WAIT, reactor)
    except defer.TimeoutError:
        printed = f"stdout:\n{process.out.decode()[-2000:]}\nstderr:\n{process.err.decode()}"
        raise AssertionError(f"pubsub-cli printed nothing more in {WAIT:g} s; {printed}") from None
    return json.loads(line)


def printed_messages(out: str) -> list[dict]:
    """The message objects of ``--json`` output, whole lines only (a kill may cut one)."""
    whole = out[: out.rfind("\n") + 1].splitlines()
    return [obj for obj in map(json.loads, whole) if obj["type"] == "message"]


def at(position: dict) -> tuple[str, int]:
    return position["epoch"], position["offset"]


@pytest.mark.parametrize("history", ["all kept", "too short"])
@pytest_twisted.inlineCallbacks
def test_a_cli_restarted_from_its_last_printed_position(rig, cli, history):
    trimmed = history == "too short"
    node = yield rig.node(*HISTORY, "--history-size", str(KEPT) if trimmed else "4000")
    first = cli(node, "--resume")
    assert (yield next_object(first)) == {
        "type": "resume",
        "channel": CHANNEL,
        "recovered": True,
        "position": {"epoch": "", "offset": 0},
        "reason": None,
    }
    publisher = yield rig.publisher(node.resp_port, CHANNEL)
    for _ in range(LIVE):
        assert (yield next_object(first))["type"] == "message"
    first.transport.signalProcess("KILL")  # mid-stream: a crash, a deploy
    status, out, _ = yield first.ended
    assert status is None  # ended by the signal
    before = printed_messages(out)
    epoch, last = at(before[-1]["position"])
    # Published while no subscriber runs: only the history has them.
    yield publisher.acked_more(AWAY if not trimmed else 3 * KEPT)

    second = cli(node, "--from", f"{epoch}:{last}")
    resumed = yield next_object(second)
    assert resumed["type"] == "resume" and resumed["channel"] == CHANNEL
    now_epoch, top = at(resumed["position"])
    assert now_epoch == epoch
    assert top - last >= (AWAY if not trimmed else 3 * KEPT)
    assert (resumed["recovered"], resumed["reason"]) == ((False, LOST) if trimmed else (True, None))
    yield publisher.until_acked(top + LIVE)  # live ones too
    total = yield publisher.stop()
    while (yield next_object(second)).get("data") != str(total - 1):
        pass
    second.transport.signalProcess("INT")  # Ctrl-C
    status, out, err = yield second.ended
    assert status == 0, err
    after = printed_messages(out)

    if trimmed:
        # The gap is exactly the one reported, and said on stderr; every
        # message after it arrives once, in order.
        missed = range(last, top)
        assert err == (
            f"pubsub-cli: cannot recover what was missed on {CHANNEL}: {LOST} "
            f"(now at {epoch}:{top})\n"
        )
        assert len(missed) > KEPT
    else:
        missed = range(0)
        assert err == ""
    wanted = [n for n in range(total) if n not in missed]
    printed = before + after
    assert [m["data"] for m in printed] == [str(n) for n in wanted]
    assert [at(m["position"]) for m in printed] == [(epoch, n + 1) for n in wanted]


# -- what cannot be recovered is reported -------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_a_subscriber_away_for_more_than_the_history_keeps_is_told(rig):
    node = yield rig.node(*HISTORY, "--history-size", str(KEPT))
    proxy = yield rig.proxy(node.ws_port)
    subscriber = yield rig.subscriber(through(proxy), CHANNEL)
    publisher = yield rig.publisher(node.resp_port, CHANNEL)
    yield subscriber.until(LIVE)
    cut = yield cut_off(subscriber, publisher, proxy, proxy.reset, 3 * KEPT)
    [failure] = yield subscriber.failed()
    epoch, top = failure.position
    assert failure == RecoveryFailed(CHANNEL, LOST, (epoch, top))
    assert top - cut.received >= cut.missed > KEPT  # more were missed than the history keeps
    yield publisher.until_acked(top + LIVE)  # and live ones after
    total = yield publisher.stop()
    yield subscriber.until(cut.received + total - top)

    # Every message up to the cut, the gap exactly as reported, and every
    # message after it, once each, in order.
    kept = list(chain(range(cut.received), range(top, total)))
    assert [m.data for m in subscriber.messages] == [str(n) for n in kept]
    assert [m.position for m in subscriber.messages] == [(epoch, n + 1) for n in kept]
    assert subscriber.failures == [failure]
    samples = yield scrape(node.ws_port)
    assert figure(samples, "pubsub_recoveries_total", result="failed") == 1
    assert figure(samples, "pubsub_recoveries_total", result="recovered") == 0


@pytest_twisted.inlineCallbacks
def test_a_node_restarted_without_a_backplane_reports_the_lost_history(rig):
    old = yield rig.node(*HISTORY, *ALL_KEPT)
    proxy = yield rig.proxy(old.ws_port)
    subscriber = yield rig.subscriber(through(proxy), CHANNEL)
    publisher = yield rig.publisher(old.resp_port, CHANNEL)
    yield subscriber.until(LIVE)
    published = yield publisher.stop()
    yield subscriber.until(published)
    assert_every_message_once_in_order(subscriber.messages, published)
    [epoch] = {m.position[0] for m in subscriber.messages}

    # The node restarts (SIGTERM, then a new process): the subscriber's
    # connections wait at the proxy until the new node has published more.
    proxy.hold()
    lost = subscriber.next_state(DISCONNECTED)
    assert (yield old.stop()) == 0
    assert (yield lost) == "1001 server shutting down"
    new = yield rig.node(*HISTORY, *ALL_KEPT)
    proxy.forward_to(new.ws_port)
    again = yield rig.publisher(new.resp_port, CHANNEL)
    yield again.acked_more(AWAY)
    proxy.release()

    [failure] = yield subscriber.failed()
    new_epoch, top = failure.position
    assert failure == RecoveryFailed(CHANNEL, EPOCH_CHANGED, (new_epoch, top))
    assert new_epoch != epoch
    assert top >= AWAY
    yield again.until_acked(top + LIVE)  # and live ones after
    total = yield again.stop()
    yield subscriber.until(published + total - top)
    after = subscriber.messages[published:]
    assert [m.data for m in after] == [str(n) for n in range(top, total)]
    assert [m.position for m in after] == [(new_epoch, n + 1) for n in range(top, total)]
    assert subscriber.failures == [failure]
