"""What an input costs the server: CPU and memory linear in the bytes actually
received, and nothing for a declared length or count until its bytes arrive.

Each test runs the installed ``twistd pubsub`` with a WebSocket and a RESP port,
attacks it the cheap way (a big request trickled in a few bytes at a time;
headers declaring huge counts or lengths, then a close) and reads the server's
own CPU time (utime + stime, /proc/<pid>/stat) around the attack.  Meanwhile a
well-behaved client on each port publishes and pings (:class:`Probe`): every
round must be answered promptly and every message reach a subscriber on each
port.  Waits are on events; the only clock is the probe's spacing of its rounds
and the timeouts.
"""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from tests.integration.test_hostile import Raw, gather, raw, raw_websocket, rss_kib
from tests.integration.test_twistd import TWISTD, ServerWithResp, clean_environment
from tests.support import wsframes
from tests.support.resp3 import command

TICKS = os.sysconf("SC_CLK_TCK")

#: Seconds a well-behaved client may wait for any answer.  The fixed server
#: answers mostly within milliseconds under these attacks (the slowest round seen:
#: 1.3 s, with the 2-core machine's load average at 4 to 5); the server before
#: the fix froze for 2.4 s on one ``*1000000000``, 4.9 s on one
#: ``*2147483647``, and for minutes on fifty (56 s for 50 of the first, 256 s
#: for 50 of the second).
ANSWER_WITHIN = 5.0

#: A trickled big request may cost the server this many times what the same
#: number of bytes costs it, read the same way, as small whole requests.
#:
#: Read a few bytes at a time, a byte costs the server mostly its read: a
#: wakeup, the reactor's turn, the protocol's call (30 to 45 us a read, 12 to
#: 19 us a byte, on a 2-core VM, loaded or not).  A reader that looks again at
#: all it holds of an unfinished request on every read adds a cost growing
#: with that, up to ~0.5 ms a read for a 64 KiB frame: before the fix, 64 KiB
#: WebSocket frames cost 4.2 to 4.5 times what small frames cost a byte (59 to
#: 63 us), and this test gave up on them at 2x after 67 to 80% of their bytes.
#: The fixed reader costs 0.6 to 1.0 times the small frames (they also run a
#: command every 130 bytes), so 2 is about the geometric middle, with a
#: factor of 2 or more each side.  A bound 20 times above the linear cost
#: would never fail: averaged over 64 KiB, the largest frame the fast reader
#: takes, the re-reading adds only 3 to 4 times the cost of the reads
#: themselves.  And a ratio measured in the same run, under the same load,
#: leaves out the machine's speed and how busy it is, which an absolute
#: number of microseconds a byte would not.
TRICKLE_RATIO = 2.0

#: And, whatever the ratio, a byte trickled in may cost at most this much
#: (about 7x what it costs here): a server slow at every read fails too.
TRICKLE_CEILING = 100e-6

#: Server CPU allowed on top of the bounds: the probe's rounds, a garbage
#: collection, and the 10 ms granularity of the kernel's CPU accounting.
SLACK = 0.3

#: Server CPU an attacking connection may cost: accepted, read, closed (a
#: WebSocket one also upgraded): 0.1 to 0.4 ms here.  Before the fix one
#: ``*1000000000`` cost 2.2 s, and one ``*2147483647`` 4.4 s.
PER_CONNECTION = 0.01

#: How many times the huge declarations come 20 of each at once, after 3 of
#: each (which froze the server before the fix for about 20 s).
WAVES = 5

#: A request limit large enough that every declared length below is allowed
#: and must be waited for, not refused at once.
BIG_LIMIT = str(2**30)


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far (user + system), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def sleeps(pid: int) -> int:
    """How many times the process's main thread has blocked (its voluntary
    context switches): a reactor blocks only when it has nothing to read."""
    with open(f"/proc/{pid}/task/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches in /proc/{pid}/task/{pid}/status")


class Twistd:
    """``twistd -n pubsub`` with a WebSocket and a RESP port on free loopback ports."""

    def __init__(self, cwd: str, *options: str) -> None:
        self.process = ServerWithResp()
        local = "tcp:0:interface=127.0.0.1"
        args = [TWISTD, "-n", "--pidfile=", "pubsub", "--port", local, "--resp-port", local]
        self.transport = reactor.spawnProcess(
            self.process, TWISTD, [*args, *options], env=clean_environment(), path=cwd
        )
        self.pid = self.transport.pid
        self.port = self.resp_port = 0

    @defer.inlineCallbacks
    def start(self):
        self.port, self.resp_port = yield self.process.listening.addTimeout(30, reactor)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def _ended(self, timeout: float) -> defer.Deferred:
        """Fires once the process has ended; fails after ``timeout`` seconds."""
        ended: defer.Deferred = defer.Deferred()
        self.process.ended.addBoth(lambda result: ended.callback(result) or result)
        return ended.addTimeout(timeout, reactor)

    @defer.inlineCallbacks
    def stop(self):
        if not self.process.ended.called:
            self.transport.signalProcess("TERM")
        try:
            yield self._ended(15)
        except defer.TimeoutError:
            # A server stuck in one long call cannot act on SIGTERM.
            self.transport.signalProcess("KILL")
            yield self._ended(30)


@pytest.fixture
def twistd(tmp_path):
    """Start ``twistd pubsub`` with options; every one stops after the test."""
    servers: list[Twistd] = []

    @defer.inlineCallbacks
    def start(*options: str):
        server = Twistd(str(tmp_path), *options)
        servers.append(server)
        yield server.start()
        return server

    yield start
    for server in servers:
        pytest_twisted.blockon(server.stop())


# -- trickling ----------------------------------------------------------------------------


class OverBudget(AssertionError):
    pass


def trickle(
    server: Twistd, streams: list[tuple[Raw, bytes]], seed: int, budget: float
) -> defer.Deferred:
    """Send each ``(client, data)``'s data 1 to 4 bytes at a time, a piece to
    every client a round, TCP_NODELAY; fires once all is sent.

    The next round goes once the server has blocked again since the last one
    was sent: it then had nothing left to read, so it got every piece in a
    read of its own, as from slow links, instead of many at once because it
    fell behind (which would hide a cost that grows with what it buffers).
    Pieces go straight to the socket, so the count of the server's blocks is
    read just before they reach it.  Fails with OverBudget as soon as the
    server has spent ``budget`` seconds of CPU."""
    rng = random.Random(seed)
    for client, _ in streams:
        client.transport.setTcpNoDelay(True)
    done: defer.Deferred = defer.Deferred()
    start = server.cpu()
    positions = [0] * len(streams)
    state = {"sleeps": -1, "turns": 0}

    def step() -> None:
        state["turns"] += 1
        if state["turns"] % 64 == 0 and server.cpu() - start > budget:
            sent = sum(positions)
            done.errback(OverBudget(f"the server spent over {budget:.2f} s on {sent} bytes"))
            return
        now = sleeps(server.pid)
        if now == state["sleeps"]:
            reactor.callLater(0, step)  # still reading, or not yet woken
            return
        state["sleeps"] = now
        for i, (client, data) in enumerate(streams):
            pos = positions[i]
            if pos < len(data):
                size = rng.randint(1, 4)
                try:
                    client.transport.socket.send(data[pos : pos + size])
                except OSError as e:
                    done.errback(ConnectionError(f"stream {i} ended after {pos} bytes: {e}"))
                    return
                positions[i] = pos + size
        if all(pos >= len(data) for pos, (_, data) in zip(positions, streams, strict=True)):
            done.callback(None)
        else:
            reactor.callLater(0, step)

    reactor.callLater(0, step)
    return done


def text(size: int, seed: int) -> str:
    """``size`` bytes of UTF-8 in two-byte characters: pieces end within
    characters too, and a reader's UTF-8 check cannot take the ASCII fast path."""
    rng = random.Random(seed)
    return "".join(rng.choice("éàüöñçøåæßðþ") for _ in range(size // 2))


def ws_text_frame(*args: str) -> bytes:
    """A masked text frame carrying ``args`` as JSON, non-ASCII left as UTF-8."""
    return wsframes.client_frame(json.dumps(list(args), ensure_ascii=False).encode())


# -- the well-behaved clients ---------------------------------------------------------------


class Probe:
    """A well-behaved client on each port, and a subscriber on each port.

    Every ``interval`` seconds each client publishes a numbered message to
    "probe" and pings.  An answer slower than ``bound`` seconds ends the
    probe (``late`` says which); :meth:`stop` checks that every message
    published reached both subscribers, in each publisher's order."""

    def __init__(self, bound: float = ANSWER_WITHIN, interval: float = 0.05) -> None:
        self.bound = bound
        self.interval = interval
        self.slowest = 0.0
        self.rounds = {"WebSocket": 0, "RESP": 0}
        self.late: str | None = None
        self._late_waiters: list[defer.Deferred] = []
        self._running = False
        self._loops: list[defer.Deferred] = []

    @defer.inlineCallbacks
    def start(self, server: Twistd, connect, resp_connect):
        self.ws = yield connect(server.port)
        self.resp = yield resp_connect(server.resp_port)
        self.ws_subscriber = yield connect(server.port)
        self.resp_subscriber = yield resp_connect(server.resp_port)
        assert (yield self.ws_subscriber.call("SUBSCRIBE", "probe")) == [["subscribe", "probe", 1]]
        assert (yield self.resp_subscriber.call("SUBSCRIBE", "probe")) == [
            [b"subscribe", b"probe", 1]
        ]
        self._running = True
        self._loops = [
            self._rounds("WebSocket", self._ws_round),
            self._rounds("RESP", self._resp_round),
        ]

    def kept_waiting(self) -> defer.Deferred:
        """Fires once a well-behaved client has waited too long."""
        if self.late is not None:
            return defer.succeed(self.late)
        waiter: defer.Deferred = defer.Deferred()
        self._late_waiters.append(waiter)
        return waiter

    def _kept_waiting(self, why: str) -> None:
        if self.late is None:
            self.late = why
            waiters, self._late_waiters = self._late_waiters, []
            for waiter in waiters:
                if not waiter.called:  # not cancelled
                    waiter.callback(why)

    @defer.inlineCallbacks
    def _ws_round(self, n: int):
        self.ws.send("PUBLISH", "probe", f"WebSocket {n}")
        self.ws.send("PING", str(n))
        reply = yield self.ws.next_frame().addTimeout(self.bound, reactor)
        pong = yield self.ws.next_frame().addTimeout(self.bound, reactor)
        assert (reply, pong) == (["reply", 2], ["pong", str(n)])

    @defer.inlineCallbacks
    def _resp_round(self, n: int):
        self.resp.send("PUBLISH", "probe", f"RESP {n}")
        self.resp.send("PING", str(n))
        reply = yield self.resp.next_value(timeout=self.bound)
        pong = yield self.resp.next_value(timeout=self.bound)
        assert (reply, pong) == (2, str(n).encode())

    @defer.inlineCallbacks
    def _rounds(self, name: str, one_round):
        n = 0
        while self._running:
            start = reactor.seconds()
            try:
                yield one_round(n)
            except defer.TimeoutError:
                self._kept_waiting(f"a {name} client waited over {self.bound} s for an answer")
                return
            except Exception as e:  # noqa: BLE001 - a wrong answer, or closed by the test's end
                self._kept_waiting(f"a {name} client's round {n} failed: {e!r}")
                return
            self.slowest = max(self.slowest, reactor.seconds() - start)
            n += 1
            self.rounds[name] = n
            yield task.deferLater(reactor, self.interval, lambda: None)

    @defer.inlineCallbacks
    def stop(self):
        """Ends the rounds; checks that every message arrived."""
        self._running = False
        yield defer.gatherResults(self._loops, consumeErrors=True)
        assert self.late is None, self.summary()
        expected = {
            name: [f"{name} {n}" for n in range(count)] for name, count in self.rounds.items()
        }
        ws = [payload for _, _, payload in (yield self.ws_subscriber.drain())]
        resp = [payload.decode() for _, _, payload in (yield self.resp_subscriber.drain())]
        for got in (ws, resp):
            assert len(got) == sum(self.rounds.values())
            for name, messages in expected.items():
                assert [m for m in got if m.startswith(name + " ")] == messages

    def summary(self) -> str:
        late = f"; {self.late}" if self.late else ""
        return f"well-behaved clients: {self.rounds} rounds, slowest {self.slowest:.3f} s{late}"


@defer.inlineCallbacks
def still_serving(server: Twistd, connect, resp_connect):
    """A fresh client on each port is answered: the server is done with
    everything sent before."""
    client = yield connect(server.port)
    assert (yield client.call("PING", "fresh")) == [["pong", "fresh"]]
    client.sendClose()
    yield client.closed
    client = yield resp_connect(server.resp_port)
    assert (yield client.call("PING", "fresh")) == [b"fresh"]
    yield client.close()


@defer.inlineCallbacks
def settled(server: Twistd, probe: Probe, connect, resp_connect, cpu_before: float):
    """Fires once the server serves fresh clients again; fails at once if the
    probe was kept waiting meanwhile."""
    index, _ = yield defer.race(
        [still_serving(server, connect, resp_connect), probe.kept_waiting()]
    )
    spent = server.cpu() - cpu_before
    assert index == 0, f"{probe.summary()}; the server has spent {spent:.2f} s since the attack"


# -- a big request trickled in ---------------------------------------------------------------


@defer.inlineCallbacks
def trickled_cost(server: Twistd, streams, seed: int, budget: float, answered):
    """The server CPU for trickling in ``streams`` until ``answered()`` fires."""
    start = server.cpu()
    yield trickle(server, streams, seed, budget)
    yield answered()
    return server.cpu() - start


@defer.inlineCallbacks
def trickle_against_baseline(server: Twistd, baseline, attack, seed: int):
    """Server CPU for ``baseline`` then ``attack``, each a list of (client,
    data) trickled in, then a callable firing once its requests are answered;
    the attack fails as soon as it is over its bound."""
    baseline_bytes = sum(len(data) for _, data in baseline[0])
    attack_bytes = sum(len(data) for _, data in attack[0])
    budget = TRICKLE_CEILING * baseline_bytes
    linear = yield trickled_cost(server, baseline[0], seed, budget, baseline[1])
    per_byte = linear / baseline_bytes
    bound = min(TRICKLE_RATIO * per_byte, TRICKLE_CEILING) * attack_bytes + SLACK
    figures = (
        f"small requests: {per_byte * 1e6:.1f} us a byte ({baseline_bytes} bytes, "
        f"{linear:.2f} s); the big ones: {attack_bytes} bytes, bound {bound:.2f} s"
    )
    try:
        cost = yield trickled_cost(server, attack[0], seed + 1, bound, attack[1])
    except OverBudget as e:
        raise AssertionError(f"{e}; {figures}") from None
    return cost, bound, figures


@defer.inlineCallbacks
def publish_trickled_in(server: Twistd, connect, resp_connect, open_client, encode, reply):
    """Two PUBLISH requests of 64 KiB, ``encode``d and trickled in at once
    from clients that ``open_client`` opens, cost the server CPU linear in
    their bytes, and arrive intact on both transports.  ``reply(n)`` is
    the answer to a PUBLISH that reached ``n`` subscribers."""
    probe = Probe()
    yield probe.start(server, connect, resp_connect)
    ws_subscriber = yield connect(server.port)
    resp_subscriber = yield resp_connect(server.resp_port)
    assert (yield ws_subscriber.call("SUBSCRIBE", "c")) == [["subscribe", "c", 1]]
    assert (yield resp_subscriber.call("SUBSCRIBE", "c")) == [[b"subscribe", b"c", 1]]
    # The baseline: small requests, to a channel nobody hears.
    count = 150
    small = b"".join(encode("PUBLISH", "nobody", text(100, n)) for n in range(count))
    payloads = [text(65_500, seed) for seed in (1, 2)]
    requests = [encode("PUBLISH", "c", payload) for payload in payloads]
    clients = []
    for _ in range(len(requests) + 1):
        clients.append((yield open_client()))
    cpu_before = server.cpu()
    cost, bound, figures = yield trickle_against_baseline(
        server,
        ([(clients[0], small)], lambda: clients[0].until(reply(0), count)),
        (
            list(zip(clients[1:], requests, strict=True)),
            lambda: gather(client.until(reply(2)) for client in clients[1:]),
        ),
        seed=3,
    )
    assert cost <= bound, f"the server spent {cost:.2f} s; {figures}"
    # Intact, on both transports.
    got = []
    for _ in payloads:
        got.append((yield ws_subscriber.next_frame()))
    assert sorted(got) == sorted(["message", "c", payload] for payload in payloads)
    got = []
    for _ in payloads:
        got.append((yield resp_subscriber.next_value()))
    assert sorted(got) == sorted([b"message", b"c", payload.encode()] for payload in payloads)
    yield settled(server, probe, connect, resp_connect, cpu_before)
    yield probe.stop()


@pytest_twisted.inlineCallbacks
def test_a_websocket_publish_trickled_in_costs_cpu_linear_in_its_bytes(
    twistd, connect, resp_connect
):
    server = yield twistd()
    # The largest frames the fast reader takes (a 16-bit length).
    assert len(ws_text_frame("PUBLISH", "c", text(65_500, 1))) < 65_536
    yield publish_trickled_in(
        server,
        connect,
        resp_connect,
        lambda: raw_websocket(server.port),
        ws_text_frame,
        lambda n: b'["reply",%d]' % n,
    )


@pytest_twisted.inlineCallbacks
def test_a_resp_publish_trickled_in_costs_cpu_linear_in_its_bytes(twistd, connect, resp_connect):
    server = yield twistd()
    yield publish_trickled_in(
        server,
        connect,
        resp_connect,
        lambda: raw(server.resp_port),
        command,
        lambda n: b":%d\r\n" % n,
    )


# -- huge declared counts and lengths, then a close --------------------------------------------


@defer.inlineCallbacks
def hit_and_run(open_client, heads: list[bytes]):
    """Each head from a connection of its own, all at once, then closed."""
    clients = yield gather(open_client() for _ in heads)
    for client, head in zip(clients, heads, strict=True):
        client.transport.write(head)
        client.transport.loseConnection()
    yield defer.DeferredList([client.closed for client in clients])


@defer.inlineCallbacks
def survives_declared_sizes(server: Twistd, connect, resp_connect, open_client, heads):
    """Send each of ``heads`` from connections of its own, 3 of each at once,
    then in waves of 20 of each; the server's CPU and memory stay bounded,
    the well-behaved clients are answered throughout and fresh ones after
    each step."""
    probe = Probe()
    yield probe.start(server, connect, resp_connect)
    yield still_serving(server, connect, resp_connect)  # every code path run once
    rss_before = rss_kib(server.pid)
    steps = [heads * 3] + [heads * 20] * WAVES
    for count, step in enumerate(steps, 1):
        cpu_before = server.cpu()
        yield hit_and_run(open_client, step)
        yield settled(server, probe, connect, resp_connect, cpu_before)
        cost = server.cpu() - cpu_before
        bound = PER_CONNECTION * len(step) + SLACK
        assert cost <= bound, (
            f"step {count}: {len(step)} connections cost the server "
            f"{cost:.2f} s (bound {bound:.2f} s); {probe.summary()}"
        )
    grown = rss_kib(server.pid) - rss_before
    assert grown < 64 * 1024, f"the server grew by {grown} KiB"
    yield probe.stop()


@pytest_twisted.inlineCallbacks
def test_huge_resp_counts_and_lengths_cost_nothing_until_their_bytes_arrive(
    twistd, connect, resp_connect
):
    server = yield twistd("--max-message-size", BIG_LIMIT)
    heads = [
        b"*1000000000\r\n",
        b"*2147483647\r\n",
        b"*1\r\n$536870000\r\n",
        b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$536870000\r\nsome",
    ]
    yield survives_declared_sizes(
        server, connect, resp_connect, lambda: raw(server.resp_port), heads
    )


@pytest_twisted.inlineCallbacks
def test_huge_websocket_lengths_cost_nothing_until_their_bytes_arrive(
    twistd, connect, resp_connect
):
    server = yield twistd("--max-message-size", BIG_LIMIT)
    mask = b"\x01\x02\x03\x04"
    heads = [
        # Over the limit: refused unread.
        b"\x81\xff" + struct.pack("!Q", 2**62) + mask + b"x" * 10,
        # Within it: waited for.
        b"\x81\xff" + struct.pack("!Q", 2**30) + mask + b"x" * 10,
        b"\x82\xff" + struct.pack("!Q", 2**29) + mask + b"x" * 10,
        b"\x81\xfe\xff\xff" + mask + b"x" * 10,
        # The first fragment of a message, declared 64 KiB long.
        b"\x01\xfe\xff\xff" + mask,
    ]
    yield survives_declared_sizes(
        server, connect, resp_connect, lambda: raw_websocket(server.port), heads
    )
