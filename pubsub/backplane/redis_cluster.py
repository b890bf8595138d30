"""The backplane over a Redis Cluster: capacity that grows with the cluster's shards.

One Redis serves Pub/Sub on one core, and every node's every publish passes
through it.  A Redis Cluster's classic PUBLISH is no way out: every cluster
node forwards every message to every other over the cluster bus, so the
whole cluster does the work of one.  Sharded Pub/Sub (Redis 7: SSUBSCRIBE,
SPUBLISH) is: a sharded channel lives on the shard that owns its hash slot,
as a key would, and its messages stay inside that shard.  So here:

* **Shard channels** travel as sharded channels named ``prefix + "s:" + name``.
* **Plain channels** travel as sharded channels too, named
  ``prefix + "c:" + name``: a node's PUBLISH costs one shard, not the cluster.
  The two kinds keep their own names, as Redis keeps channels and shard
  channels apart.  A name's slot is Redis's (CRC16 of the whole name, or of
  its ``{hash tag}``), so ``{user1}.in`` and ``{user1}.out`` share a shard.
* **Patterns** stay classic Pub/Sub: a node holding patterns PSUBSCRIBEs
  them (on one primary, over the channels' names), and while any node holds
  a pattern every node sends each channel publish as a classic PUBLISH too,
  which the cluster forwards to all its nodes: the cost of patterns, paid
  only while someone uses them.  Nodes learn who holds patterns from the
  *census*, a sharded channel (``prefix + "patterns"``) on which each holder
  says "on" every ``refresh_interval`` and "off" when its last pattern
  goes; a word not repeated for ``census_ttl`` lapses.  A node that has not
  yet listened to the census for ``census_ttl`` with every shard connected
  broadcasts anyway.

Each shard's primary gets its own pair of connections (:class:`_ShardLink`,
a :class:`~pubsub.backplane.redis.RedisBackplane` given that shard's share
of the names), each with the single-Redis health check, TLS and backoff.
The slot map comes from ``CLUSTER SLOTS``, asked of the known primaries
and then the seed nodes in the URL.  It is asked again when a link is
lost, when Redis answers ``MOVED``, ``ASK`` or ``CLUSTERDOWN``, when it
drops one of our subscriptions itself (a slot moved away: a failover, a
resharding), every ``refresh_interval`` seconds while anything is amiss,
and every minute anyway.  Names whose slot changed owner are unsubscribed
on the old link and subscribed on the new one; links to nodes that no
longer own slots are closed.

A publish is sent to its slot's owner as the map says.  If the map was
stale (a resharding just happened), Redis answers ``MOVED`` (or ``ASK``
while the slot migrates): each link keeps the publishes Redis has not
answered yet, and a redirected one is sent again to the node named, with
``ASKING`` first for an ``ASK`` (counted in ``redirected``); the map is
read again meanwhile.  One ``MOVED`` to a node not linked yet (a replica
just promoted) waits, in order, for the new map and for that node's link
to be up, for at most ``hold_limit`` seconds; and a link to a node that
left the map stays until that node has answered every publish sent to it
(a demoted primary answers those it paused with ``MOVED``), as long.  One
that cannot be sent again (no link to that node after the new map, not up
in time, a second redirect, ``CLUSTERDOWN``), or is never answered (its
connection lost), is counted in ``lost`` (``pubsub_backplane_lost_total``)
and logged.  A publish whose
shard's link is down is refused, as with one Redis.

When a primary hands its slots over (a failover), it drops every
subscription to them with an ``sunsubscribe`` of its own; the node renews
them on the new primary once it has the new map, a few milliseconds to a
second later.  What other nodes publish to those channels in between
reaches no one here: each such drop is logged and counted in ``dropped``
(``pubsub_backplane_dropped_total``).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pubsub.backplane.redis import (
    _PUBLISH,
    _SUBSCRIBE,
    _UNSUBSCRIBE,
    NODE_ID_SIZE,
    RESUBSCRIBE_BATCH,
    BackplaneDown,
    RedisBackplane,
    RedisTarget,
    _Connection,
    _Transport,
    command,
    escape_glob,
    health_of,
    new_node_id,
    warn_lost,
)
from pubsub.core.engine import Engine, Kind
from pubsub.core.history import Position

__all__ = [
    "ClusterTarget",
    "RedisClusterBackplane",
    "keyslot",
    "parse_cluster_url",
    "slot_tags",
]

_log = Logger()

SLOTS = 16384

#: Kinds carried as sharded channels, and the part of their name after the
#: prefix: the engine's channels and shard channels, and the census, the one
#: sharded channel (``prefix + "patterns"``) on which nodes say whether they
#: hold patterns.
_CARRIED: dict[str, bytes] = {Kind.CHANNEL: b"c:", Kind.SHARD: b"s:", "census": b""}
_CENSUS = b"patterns"
#: Every kind a link holds names of: patterns live on the census's shard.
_KINDS = (*_CARRIED, Kind.PATTERN)

#: Replies that say the slot map we hold is out of date.
_REDIRECTS = ("MOVED ", "ASK ", "CLUSTERDOWN ", "TRYAGAIN ")
#: Redirects one publish may follow before it counts as lost.
_MAX_HOPS = 2
#: The counters a cluster sums over its links.
_COUNTS = ("sent", "received", "failed", "reconnects", "timeouts", "redirected", "dropped")


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


@functools.lru_cache(maxsize=65536)
def keyslot(name: bytes) -> int:
    """Redis Cluster's hash slot of ``name`` (``keyHashSlot`` in Redis's
    cluster.c): CRC16-XMODEM mod 16384, of the first ``{...}`` with
    something between the braces if there is one, else of the whole name."""
    start = name.find(b"{")
    if start >= 0:
        end = name.find(b"}", start + 1)
        if end > start + 1:
            name = name[start + 1 : end]
    crc = 0
    table = _CRC16
    for byte in name:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc & (SLOTS - 1)


@functools.cache
def slot_tags() -> list[bytes]:
    """A short name in each hash slot: ``keyslot(slot_tags()[slot]) == slot``.

    A key that begins with ``{tag}`` is in the tag's slot whatever follows,
    since Redis hashes the first ``{...}`` only: so a key can be put in the
    slot of any name, where ``{name}`` cannot when the name has braces of its
    own.  Letters and digits, 1 to 3 of them, the shortest for each slot;
    made once, the first time (a fifth of a second)."""
    alphabet = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    tags: list[bytes | None] = [None] * SLOTS
    missing = SLOTS
    table = _CRC16
    names = [(b"", 0)]  # (a name, its CRC16), one length at a time
    while missing:
        longer = []
        for name, crc in names:
            for byte in alphabet:
                more = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
                tag = name + bytes((byte,))
                longer.append((tag, more))
                slot = more & (SLOTS - 1)
                if tags[slot] is None:
                    tags[slot] = tag
                    missing -= 1
        names = longer
    return cast(list[bytes], tags)


@dataclass(frozen=True)
class ClusterTarget:
    """A Redis Cluster, from ``redis+cluster://[user[:password]@]host:port,host:port,...``
    (``rediss+cluster://`` for TLS): the seed nodes to ask for the slot map,
    and the credentials every node shares."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def node(self, host: str, port: int) -> RedisTarget:
        return RedisTarget(host, port, self.username, self.password, self.tls)

    @property
    def display(self) -> str:
        """The URL without the password."""
        user = f"{self.username}@" if self.username else ""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        nodes = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.seeds)
        return f"{scheme}://{user}{nodes}/"


def is_cluster_url(url: str) -> bool:
    return url.strip().lower().startswith(("redis+cluster://", "rediss+cluster://"))


def parse_cluster_url(url: str) -> ClusterTarget:
    """The seeds and credentials of a ``redis+cluster://`` URL; ValueError
    says what is wrong with it.  A seed without a port is on 6379."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("redis+cluster", "rediss+cluster"):
        raise ValueError(f"Redis Cluster URL must start with redis+cluster://, got {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    seeds = []
    for seed in hosts.split(","):
        seed = seed.strip()
        if seed.startswith("["):
            host, _, rest = seed[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = seed.partition(":")
        if not host:
            raise ValueError(f"Redis Cluster URL has a seed without a host: {url!r}")
        try:
            port = int(port_text) if port_text else 6379
        except ValueError:
            raise ValueError(f"Redis Cluster URL has a bad port in {seed!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"Redis Cluster URL has a bad port in {seed!r}")
        seeds.append((host, port))
    return ClusterTarget(tuple(seeds), username, password, parts.scheme == "rediss+cluster")


class _Query(Protocol):
    """Send some commands, collect their replies, close."""

    transport: _Transport | None  # type: ignore[assignment]  # Twisted's ITransport: see _Transport

    def __init__(self, commands: list[bytes]) -> None:
        self._commands = commands
        self._reader = hiredis.Reader()
        self.replies: list[Any] = []
        # Cancelled (timed out): the connection goes too.
        self.done: defer.Deferred[list[Any]] = defer.Deferred(lambda _: self._close())

    def connectionMade(self) -> None:
        assert self.transport is not None  # makeConnection has set it
        self.transport.write(b"".join(self._commands))

    def dataReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                self.replies.append(reply)
        except hiredis.ProtocolError as error:
            self._finish(error)
            return
        if len(self.replies) >= len(self._commands):
            self._finish(None)

    def connectionLost(self, reason: Any = None) -> None:
        self._finish(ConnectionError("closed before answering"))

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def _finish(self, error: Exception | None) -> None:
        if self.done.called:
            return
        self._close()
        if error is None:
            self.done.callback(self.replies)
        else:
            self.done.errback(error)


def _named_node(message: str) -> tuple[str, int] | None:
    """The node a ``MOVED``/``ASK`` redirect names (``MOVED 3999 host:port``)."""
    word, _, rest = message.partition(" ")
    host, _, port = (rest.split() or [""])[-1].rpartition(":")
    return (host, int(port)) if word in ("MOVED", "ASK") and port.isdigit() else None


def parse_slots(reply: Any, asked: str) -> dict[tuple[int, int], tuple[str, int]]:
    """``CLUSTER SLOTS``'s answer as {(first, last): (host, port) of the primary}.
    A primary announced with an empty or unknown address is on ``asked``'s host."""
    if not isinstance(reply, list):  # an error reply (hiredis.ReplyError), say
        raise ValueError(f"CLUSTER SLOTS answered {reply!r}")  # noqa: TRY004 - Redis's answer
    ranges = {}
    for entry in reply:
        first, last, primary = entry[0], entry[1], entry[2]
        host = primary[0].decode() if primary[0] not in (b"", b"?") else asked
        ranges[(int(first), int(last))] = (host, int(primary[1]))
    return ranges


class _ShardLink(RedisBackplane):
    """The two connections to one shard's primary, carrying the names whose
    slots it owns (both kinds as sharded channels)."""

    def __init__(self, cluster: RedisClusterBackplane, host: str, port: int) -> None:
        super().__init__(
            cluster.engine,
            cluster.target.node(host, port),
            prefix=cluster.prefix,
            clock=cluster.clock,
            max_delay=cluster.max_delay,
            node_id=cluster.node_id,
            endpoint=cluster.endpoint_for(host, port),
            buffer_limit=cluster.buffer_limit,
            ping_interval=cluster.ping_interval,
            timeout=cluster.timeout,
            trust_root=cluster.trust_root,
            client_certificate=cluster.client_certificate,
            interest={kind: set() for kind in _KINDS},
        )
        self.cluster = cluster
        self.preamble = cluster.preamble  # the same for every shard
        self.address = (host, port)
        self.redirected = 0  # publishes sent again where Redis redirected them
        self.dropped = 0  # our subscriptions Redis dropped (its slot moved away)
        #: Set once the map no longer has this node: the call that closes
        #: the link at the latest (see retire); True once closed.
        self._retired: Any = None
        #: The publishes on the current publisher connection that Redis has
        #: not answered yet: (their request number, the command, times
        #: redirected), to send again where Redis redirects one.
        self._in_flight: deque[tuple[int, bytes, int]] = deque()
        self._redirect: str | None = None  # the redirect the reply at hand is
        #: (kind, name) of our subscriptions Redis dropped, until renewed.
        self._dropped: set[tuple[str, bytes]] = set()
        for kind, part in _CARRIED.items():
            self._subscribing[kind] = _SUBSCRIBE[Kind.SHARD]
            self._unsubscribing[kind] = _UNSUBSCRIBE[Kind.SHARD]
            self._publishing[kind] = self._publishing[Kind.SHARD]
            self._wire_prefix[kind] = cluster.prefix + part
        self._channels = cluster.prefix + _CARRIED[Kind.CHANNEL]
        self._shards = cluster.prefix + _CARRIED[Kind.SHARD]
        self._census = cluster.prefix + _CENSUS
        # Patterns stay classic Pub/Sub (PSUBSCRIBE), over the channels'
        # names: they hear the classic PUBLISH a node sends besides SPUBLISH
        # while some node holds a pattern ("broadcast").
        self._pattern_prefix = escape_glob(self._channels)
        self._wire_prefix[Kind.PATTERN] = self._pattern_prefix
        self._publishing["broadcast"] = _PUBLISH[Kind.CHANNEL]
        self._wire_prefix["broadcast"] = self._channels

    def _resubscribe(self, connection: _Connection) -> None:
        """Everything this shard carries for us, then a PING.  A cluster takes
        one slot's names per SSUBSCRIBE (else CROSSSLOT), so they go by slot."""
        by_slot: dict[int, list[bytes]] = {}
        for kind in _CARRIED:
            for name in self.interest[kind]:
                wire = self._wire_name(kind, name)
                by_slot.setdefault(keyslot(wire), []).append(wire)
        batches = [(_SUBSCRIBE[Kind.SHARD], names) for names in by_slot.values()]
        patterns = [self._wire_name(Kind.PATTERN, name) for name in self.interest[Kind.PATTERN]]
        batches.append((_SUBSCRIBE[Kind.PATTERN], patterns))
        for subscribe, names in batches:
            for start in range(0, len(names), RESUBSCRIBE_BATCH):
                connection.send(subscribe, *names[start : start + RESUBSCRIBE_BATCH])
        connection.ping()

    def _local(self, name: bytes) -> bytes:
        return name[len(self._channels) :]  # a pmessage's channel

    def _smessage(self, channel: bytes, data: bytes) -> None:
        if channel.startswith(self._channels):
            name = channel[len(self._channels) :]
            self._deliver(self.engine.deliver_message, data, name, at=self.cluster.positioned)
        elif channel.startswith(self._shards):
            self._deliver(self.engine.deliver_smessage, data, channel[len(self._shards) :])
        elif channel == self._census and data[:NODE_ID_SIZE] != self.node_id:
            self.cluster.census_heard(data[:NODE_ID_SIZE], data[NODE_ID_SIZE + 1 :])

    def announce(self, word: bytes) -> None:
        """Say ``word`` on the census (not a publish: not counted as one)."""
        if self._publisher is not None and self.state == "connected":
            self._publisher.send(b"SPUBLISH", self._census, self._envelope_head + word)

    def connection_made(self, connection: _Connection) -> None:
        if connection.role == "publisher":
            self._in_flight.clear()  # a new connection: its requests count from 0
        super().connection_made(connection)

    def _lose_unanswered(self, connection: _Connection) -> None:
        if self._in_flight:
            # Sent, never answered: Redis may have taken them or not.
            self.lose("no answer before the connection was lost", len(self._in_flight))
            self._in_flight.clear()

    def lose(self, why: str, count: int = 1) -> None:
        self.cluster.lose(self.url, why, count)

    def retire(self, limit: float) -> None:
        """The map no longer has this link's node: close the link once Redis
        has answered every publish sent on it (a primary just demoted
        answers those it had paused with MOVED, and they go on to the new
        one), at most ``limit`` seconds from now."""
        if self._in_flight:
            self._retired = self.clock.callLater(limit, self._close_retired)
        else:
            self._close_retired()

    def stopService(self) -> defer.Deferred[list[tuple[bool, None]]]:
        if self._retired not in (None, True) and self._retired.active():
            self._retired.cancel()
        return super().stopService()

    def _close_retired(self) -> None:
        if self._retired is True:
            return
        if self._retired is not None and self._retired.active():
            self._retired.cancel()
        self._retired = True
        if self._in_flight:
            self.lose("no answer before its node left the slot map", len(self._in_flight))
            self._in_flight.clear()
        self.cluster.closed(self)

    def _write(self, publisher: _Connection, data: bytes, hops: int = 0) -> None:
        super()._write(publisher, data)
        self._in_flight.append((publisher.requests, data, hops))

    def forward(self, data: bytes, hops: int, asking: bool) -> bool:
        """Send a publish another shard redirected here (with ASKING first for
        an ``ASK``); False when this link cannot take it now."""
        publisher = self._publisher
        if publisher is None or self.state != "connected":
            return False
        if asking:
            publisher.send(b"ASKING")
        self._write(publisher, data, hops)
        self.redirected += 1
        return True

    def reply_received(self, connection: _Connection, reply: Any) -> None:
        self._redirect = None
        super().reply_received(connection, reply)
        if connection is self._publisher:
            self._answered(connection.replies)
            return
        # Redis drops our subscriptions of a slot it no longer owns (a
        # failover, a resharding): one of ours, gone, means the map moved.
        if (
            type(reply) is list
            and len(reply) == 3
            and reply[0] == b"sunsubscribe"
            and connection is self._subscriber
        ):
            wanted = self._still_wanted(reply[1])
            if wanted is not None:
                self.dropped += 1
                self._dropped.add(wanted)
                self.cluster.map_changed(
                    f"{self.url} dropped our subscription of {reply[1]!r}", self.address
                )

    def _still_wanted(self, wire: bytes) -> tuple[str, bytes] | None:
        """(kind, name) of a sharded name this link carries, or None."""
        for kind in _CARRIED:  # every prefix is checked: the census's is a prefix of the others
            prefix = self._wire_prefix[kind]
            if wire.startswith(prefix) and wire[len(prefix) :] in self.interest[kind]:
                return kind, wire[len(prefix) :]
        return None

    def renew_dropped(self) -> bool:
        """Subscribe again to the names Redis dropped that the map still puts
        here (it may be out of date: then Redis answers MOVED, and the map is
        asked for again); whether there were any."""
        dropped = [(k, n) for k, n in self._dropped if n in self.interest[k]]
        self._dropped.clear()
        if dropped and self._subscriber is not None:
            for kind, name in dropped:
                self._subscriber.send(_SUBSCRIBE[Kind.SHARD], self._wire_name(kind, name))
        return bool(dropped)

    def _answered(self, replies: int) -> None:
        """The publisher's reply number ``replies`` came: if it answered a
        publish with a redirect, that publish goes where Redis says."""
        in_flight = self._in_flight
        while in_flight and in_flight[0][0] < replies:
            in_flight.popleft()  # not expected: each publish gets its reply
        if in_flight and in_flight[0][0] == replies:
            _, data, hops = in_flight.popleft()
            if self._redirect is not None:
                self.cluster.redirect(self, self._redirect, data, hops)
        if self._retired is not None and not in_flight:
            self._close_retired()  # every publish answered: it can go

    def _reply_error(self, connection: _Connection, reply: hiredis.ReplyError) -> None:
        message = str(reply)
        if message.startswith(_REDIRECTS):
            self._redirect = message
            self.cluster.map_changed(f"{self.url} answered {message}", _named_node(message))
            return
        super()._reply_error(connection, reply)

    def _update_state(self, quiet: bool = False) -> None:
        before = self.state
        super()._update_state(quiet=True)  # the cluster says it, for all shards
        if self.state != before:
            self.cluster.link_changed(self)


class RedisClusterBackplane(MultiService):
    """This node's side of a Redis Cluster backplane; the engine's Relay.

    Takes the settings of :class:`~pubsub.backplane.redis.RedisBackplane`,
    for every shard's link, and ``refresh_interval``: how often the slot map
    is asked for again while a link is down or the map is in doubt.
    """

    #: Ask for the slot map this often even when all is well (new shards).
    calm_refresh = 60.0

    def __init__(
        self,
        engine: Engine,
        url: str,
        prefix: bytes = b"pubsub:",
        clock: Any = None,
        max_delay: float = 5.0,
        node_id: bytes | None = None,
        buffer_limit: int = 8 * 1024 * 1024,
        ping_interval: float = 1.0,
        timeout: float = 3.0,
        trust_root: Any = None,
        client_certificate: Any = None,
        refresh_interval: float = 1.0,
        endpoint_for: Callable[[str, int], Any] | None = None,
    ) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.engine = engine
        self.target = parse_cluster_url(url)
        if not self.target.tls and (trust_root is not None or client_certificate is not None):
            raise ValueError("TLS settings need a rediss+cluster:// URL (TLS)")
        self.url = self.target.display
        self.prefix = prefix
        self.clock = clock
        self.max_delay = max_delay
        self.node_id = node_id if node_id is not None else new_node_id()
        if len(self.node_id) != NODE_ID_SIZE:
            raise ValueError(f"node id must be {NODE_ID_SIZE} bytes")
        self.buffer_limit = buffer_limit
        self.ping_interval = ping_interval
        self.timeout = timeout
        self.trust_root = trust_root
        self.client_certificate = client_certificate
        self.refresh_interval = refresh_interval
        #: Seconds a publish redirected to a node whose link is not up yet
        #: waits for it, before it counts as lost.
        self.hold_limit = max(timeout, 1.0) * 2
        self._endpoint_for = endpoint_for
        #: Commands each link's publisher connection sends first (the
        #: history's SCRIPT LOADs), where positioned messages go, and whom to
        #: tell when the whole is connected again, as RedisBackplane's.
        self.preamble: list[tuple[bytes, ...]] = []
        self.positioned: Callable[[bytes, bytes, Position], int] = engine.deliver_message_at
        self.came_back: Callable[[], None] | None = None
        self.interest: dict[str, set[bytes]] = {
            Kind.CHANNEL: set(engine.channels()),
            Kind.PATTERN: set(engine.patterns()),
            Kind.SHARD: set(engine.shard_channels()),
            "census": {_CENSUS},
        }
        #: Nodes that said they hold patterns, and when they last said so.
        self._holders: dict[bytes, float] = {}
        #: How long a node's word on the census holds (it says it every tick).
        self.census_ttl = 3 * refresh_interval
        #: Whether each channel publish is sent as a classic PUBLISH too, for
        #: the patterns of other nodes.  Until the census has been heard for
        #: a while, assume so.
        self.broadcast = True
        self._quiet_since: float | None = None
        self.links: dict[tuple[str, int], _ShardLink] = {}
        #: The link of each slot's primary, None until the map is known.
        self._slots: list[_ShardLink | None] = [None] * SLOTS
        self._refused_by: _ShardLink | None = None
        self._refreshing: defer.Deferred[None] | None = None
        self._again = False  # news came while asking: ask once more after
        self._ask_first: tuple[str, int] | None = None
        self._doubt: str | None = "starting"  # why the map must be asked for again
        self._ticker: LoopingCall | None = None
        self._since_calm = 0.0
        self.state = "connecting"
        self.since = clock.seconds()
        self._unmapped = 0  # publishes refused before there was a slot map
        #: Publishes redirected to a node not linked yet, or whose link is
        #: not up yet (a replica just promoted): (its address, the command,
        #: hops, since when), sent once the new map has it and its link is
        #: up; at most buffer_limit bytes, for at most hold_limit seconds.
        self._held: list[tuple[tuple[str, int], bytes, int, float]] = []
        self._held_bytes = 0
        #: The counts of links closed since (their nodes no longer serve slots),
        #: and the links closing (see _ShardLink.retire), counted as linked.
        self._retired = dict.fromkeys(_COUNTS, 0)
        self._retiring: set[_ShardLink] = set()
        self._lost = 0  # publishes that may not have reached the other nodes (see lose)
        self.refreshes = 0
        engine.relay = self

    # -- connections -------------------------------------------------------------

    def endpoint_for(self, host: str, port: int) -> Any:
        if self._endpoint_for is not None:
            return self._endpoint_for(host, port)
        from twisted.internet import reactor

        # An IStreamClientEndpoint by zope's @implementer, which mypy cannot see.
        endpoint = cast(IStreamClientEndpoint, HostnameEndpoint(reactor, host, port, timeout=5))
        if self.target.tls:
            trust = self.trust_root if self.trust_root is not None else platformTrust()
            options = optionsForClientTLS(
                host, trustRoot=trust, clientCertificate=self.client_certificate
            )
            endpoint = wrapClientTLS(options, endpoint)
        return endpoint

    def _ask(self, host: str, port: int, *args: bytes) -> defer.Deferred[Any]:
        """One command to one cluster node on a connection of its own; its reply."""
        commands = []
        if self.target.password is not None:
            auth = [self.target.username.encode()] if self.target.username else []
            commands.append(command(b"AUTH", *auth, self.target.password.encode()))
        commands.append(command(*args))
        query = _Query(commands)
        factory = Factory.forProtocol(lambda: query)
        factory.noisy = False
        connecting = self.endpoint_for(host, port).connect(factory)

        def not_connected(failure: Any) -> None:
            if not query.done.called:
                query.done.errback(failure)

        connecting.addErrback(not_connected)
        done = query.done.addTimeout(max(self.timeout, 1.0) * 2, self.clock)
        return done.addCallback(lambda replies: replies[-1])

    # -- the service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # as in __init__
        _log.info("backplane: asking {url} for its slot map", url=self.url)
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self.clock
        self._ticker.start(self.refresh_interval, now=True)

    def stopService(self) -> defer.Deferred[Any]:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        return defer.maybeDeferred(super().stopService)

    def _tick(self) -> None:
        self._since_calm += self.refresh_interval
        if self._doubt is not None or self._since_calm >= self.calm_refresh:
            self._refresh()
        if self.interest[Kind.PATTERN]:
            self._announce(b"on")
        self._count_holders()
        if self._held:
            self._send_held()  # those held too long are lost

    # -- the census: does any other node hold a pattern? ----------------------------

    def _announce(self, word: bytes) -> None:
        link = self._owner("census", _CENSUS)
        if link is not None:
            link.announce(word)

    def census_heard(self, node: bytes, word: bytes) -> None:
        if word == b"on":
            self._holders[node] = self.clock.seconds()
            self.broadcast = True
        elif word == b"off":
            self._holders.pop(node, None)
            self._count_holders()

    def _count_holders(self) -> None:
        """Forget holders not heard for ``census_ttl``; broadcast while any is
        left, and until the census has been listened to for ``census_ttl``
        (a holder says so every tick) with every shard connected."""
        now = self.clock.seconds()
        for node, heard in list(self._holders.items()):
            if now - heard > self.census_ttl:
                del self._holders[node]
        if self.state != "connected":
            self._quiet_since = None  # the census may have been missed
        elif self._quiet_since is None:
            self._quiet_since = now
        settled = self._quiet_since is not None and now - self._quiet_since >= self.census_ttl
        self.broadcast = bool(self._holders) or not settled

    def map_changed(self, why: str, ask: tuple[str, int] | None = None) -> None:
        """Something says the slot map moved: ask for it now, of ``ask``
        first (the node that said so, or that a redirect names)."""
        if self._doubt is None:
            _log.warn("backplane: {why}; asking for the slot map again", why=why)
        self._doubt = why
        if ask is not None:
            self._ask_first = ask
        self._refresh()

    def redirect(self, link: _ShardLink, message: str, data: bytes, hops: int) -> None:
        """Redis answered a publish sent on ``link`` with ``message`` (MOVED,
        ASK, CLUSTERDOWN, TRYAGAIN): send it again where it says, now or, for
        a node not linked yet, once the new map is in; else it is lost."""
        word = message.partition(" ")[0]
        address = _named_node(message)
        if address is None or hops >= _MAX_HOPS:
            self.lose(link.url, f"answered {message}; not sent again")
            return
        target = self.links.get(address)
        if target is not None and target.forward(data, hops + 1, asking=word == "ASK"):
            return
        if word == "MOVED" and self._held_bytes + len(data) <= self.buffer_limit:
            self._held.append((address, data, hops + 1, self.clock.seconds()))
            self._held_bytes += len(data)
            return
        self.lose(link.url, f"answered {message}; not sent again")

    def lose(self, url: str, why: str, count: int = 1) -> None:
        """Count ``count`` publishes sent to ``url`` lost, for ``why``; the first is logged."""
        if self._lost == 0:
            warn_lost(url, why)
        self._lost += count

    def _send_held(self) -> None:
        """Send the held publishes whose node's link is up; hold on to those
        whose link is still connecting, up to ``hold_limit``; lose the rest."""
        now = self.clock.seconds()
        held, self._held, self._held_bytes = self._held, [], 0
        for address, data, hops, since in held:
            target = self.links.get(address)
            if target is not None and target.forward(data, hops, asking=False):
                continue
            if target is not None and now - since < self.hold_limit:
                self._held.append((address, data, hops, since))
                self._held_bytes += len(data)
                continue
            self.lose(f"redis://{address[0]}:{address[1]}/", "MOVED there; its link not up in time")

    def link_changed(self, link: _ShardLink) -> None:
        if self.links.get(link.address) is not link:
            return  # retired: its node no longer serves slots
        if link.state == "connected" and self._held:
            self._send_held()
        if link.state != "connected" and self._doubt is None:
            self._doubt = f"{link.url} is {link.state}"
            self._refresh()
        self._update_state()

    def _refresh(self) -> None:
        if self._refreshing is not None:
            self._again = True  # what it learns may predate this news: once more after
            return
        if not self.running:
            return
        self._since_calm = 0.0
        self._refreshing = defer.ensureDeferred(self._ask_for_map())
        self._refreshing.addBoth(self._refreshed)

    def _refreshed(self, result: Any) -> None:
        self._refreshing = None
        if isinstance(result, Failure):
            _log.failure("backplane: fault applying the slot map of {url}", result, url=self.url)
        if self._again:
            self._again = False
            self._refresh()

    def _candidates(self) -> Iterator[tuple[str, int]]:
        seen = set()
        first = [self._ask_first] if self._ask_first is not None else []
        self._ask_first = None
        up = [a for a, link in self.links.items() if link.state == "connected"]
        for address in (*first, *up, *self.links, *self.target.seeds):
            if address not in seen:
                seen.add(address)
                yield address

    async def _ask_for_map(self) -> None:
        errors = []
        for host, port in self._candidates():
            try:
                reply = await self._ask(host, port, b"CLUSTER", b"SLOTS")
                ranges = parse_slots(reply, host)
            except Exception as error:  # noqa: BLE001 - any node that does not answer: the next
                errors.append(f"{host}:{port}: {error}")
                continue
            covered = sum(last - first + 1 for first, last in ranges)
            if covered < SLOTS:
                errors.append(f"{host}:{port}: only {covered} of {SLOTS} slots served")
                continue
            self._apply(ranges)
            return
        _log.warn(
            "backplane: no node of {url} gave a whole slot map ({errors})",
            url=self.url,
            errors="; ".join(errors),
        )

    def _apply(self, ranges: dict[tuple[int, int], tuple[str, int]]) -> None:
        """Use this slot map: links for its primaries, every name on its owner's."""
        self.refreshes += 1
        slots: list[_ShardLink | None] = [None] * SLOTS
        owners = set(ranges.values())
        for address in owners:
            if address not in self.links:
                link = _ShardLink(self, *address)
                self.links[address] = link
                link.setServiceParent(self)  # as in __init__
        for (first, last), address in ranges.items():
            link = self.links[address]
            slots[first : last + 1] = [link] * (last - first + 1)
        self._slots = slots
        for link in list(self.links.values()):
            for kind in _KINDS:
                for name in [n for n in link.interest[kind] if self._owner(kind, n) is not link]:
                    link.interest_lost(kind, name)
        for kind in _KINDS:
            for name in self.interest[kind]:
                owner = self._owner(kind, name)
                if owner is not None and name not in owner.interest[kind]:
                    owner.interest_gained(kind, name)
        for address in [a for a in self.links if a not in owners]:
            link = self.links.pop(address)
            self._retiring.add(link)
            link.retire(self.hold_limit)
        # Names dropped that this map still places where they were: renewed
        # there, and the map asked for again until it moves them, or Redis
        # takes them back.
        renewed = [link.renew_dropped() for link in self.links.values()]
        if all(link.state == "connected" for link in self.links.values()) and not any(renewed):
            self._doubt = None
        self._update_state()
        if self._held:
            self._send_held()

    def closed(self, link: _ShardLink) -> None:
        """A link to a node that no longer serves slots is done: keep its counts."""
        self._retiring.discard(link)
        for name in _COUNTS:
            self._retired[name] += getattr(link, name)
        if link.parent is not None:
            link.disownServiceParent()  # as in __init__

    def _owner(self, kind: str, name: bytes) -> _ShardLink | None:
        if kind == Kind.PATTERN:
            kind, name = "census", _CENSUS
        return self._slots[keyslot(self.prefix + _CARRIED[kind] + name)]

    def _update_state(self) -> None:
        links = self.links.values()
        up = bool(links) and all(link.state == "connected" for link in links)
        state = "connected" if up else ("down" if self.state != "connecting" else "connecting")
        if state == self.state:
            return
        back = state == "connected" and self.state == "down"
        self.state = state
        self.since = self.clock.seconds()
        if state == "connected":
            _log.info(
                "backplane: connected to {url} ({shards} shards)", url=self.url, shards=len(links)
            )
        elif self.running:
            _log.warn(
                "backplane: {url} is {state}: {shards}",
                url=self.url,
                state=state,
                shards=", ".join(f"{link.url} {link.state}" for link in links),
            )
        if back and self.came_back is not None:
            self.came_back()

    # -- the engine's Relay --------------------------------------------------------

    def interest_gained(self, kind: str, name: bytes) -> None:
        names = self.interest[kind]
        names.add(name)
        owner = self._owner(kind, name)
        if owner is not None:
            owner.interest_gained(kind, name)
        if kind == Kind.PATTERN and len(names) == 1:
            self._announce(b"on")  # other nodes broadcast from now on

    def interest_lost(self, kind: str, name: bytes) -> None:
        names = self.interest[kind]
        names.discard(name)
        owner = self._owner(kind, name)
        if owner is not None and name in owner.interest[kind]:
            owner.interest_lost(kind, name)
        if kind == Kind.PATTERN and not names:
            self._announce(b"off")

    def published(self, kind: str, channel: bytes, payload: bytes) -> None:
        link = self._slots[keyslot(self.prefix + _CARRIED[kind] + channel)]
        self._refused_by = link
        if link is None:
            self._unmapped += 1
            return
        link.published(kind, channel, payload)
        if self.broadcast and kind == Kind.CHANNEL and link.refusal(0) is None:
            link.published("broadcast", channel, payload)

    def refusal(self, receivers: int) -> str | None:
        link = self._refused_by
        if link is None:
            noun = "subscriber" if receivers == 1 else "subscribers"
            return (
                f"BACKPLANE {self.url} has no slot map yet: "
                f"delivered to {receivers} local {noun} only"
            )
        return link.refusal(receivers)

    # -- what a history in Redis needs (pubsub.backplane.history) ---------------

    def history_names(self, channel: bytes) -> tuple[bytes, bytes, bytes, tuple[bytes, ...]]:
        """As :meth:`RedisBackplane.history_names`, on the shard that carries
        ``channel``.  The history's script writes the keys and SPUBLISHes
        the message in one step, so the keys must be in the slot of the
        channel's sharded name: they begin with a hash tag of that slot
        (:func:`slot_tags`).  While any node, this one included, holds
        patterns, the script PUBLISHes the message cluster-wide too."""
        wire = self.prefix + _CARRIED[Kind.CHANNEL] + channel
        head = b"{%s}%s" % (slot_tags()[keyslot(wire)], self.prefix)
        patterns = self.broadcast or bool(self.interest[Kind.PATTERN])
        return (
            head + b"history:" + channel,
            head + b"history-position:" + channel,
            wire,
            (b"SPUBLISH", b"PUBLISH") if patterns else (b"SPUBLISH",),
        )

    def carry(self, channel: bytes, data: bytes) -> bool:
        """:meth:`RedisBackplane.carry` on the shard that carries ``channel``."""
        link = self._owner(Kind.CHANNEL, channel)
        self._refused_by = link
        if link is None:
            self._unmapped += 1
            return False
        return link.carry(channel, data)

    def call(self, channel: bytes, *args: bytes) -> defer.Deferred[Any]:
        """:meth:`RedisBackplane.call` on the shard that carries ``channel``."""
        link = self._owner(Kind.CHANNEL, channel)
        return self._unmapped_failure() if link is None else link.call(channel, *args)

    def barrier(self, channel: bytes) -> defer.Deferred[Any]:
        """:meth:`RedisBackplane.barrier` on the shard that carries ``channel``."""
        link = self._owner(Kind.CHANNEL, channel)
        return self._unmapped_failure() if link is None else link.barrier(channel)

    def _unmapped_failure(self) -> defer.Deferred[Any]:
        return defer.fail(BackplaneDown(f"{self.url} has no slot map yet"))

    # -- figures -----------------------------------------------------------------

    def _total(self, name: str) -> int:
        links = (*self.links.values(), *self._retiring)
        linked: int = sum(getattr(link, name) for link in links)  # _COUNTS: ints
        return self._retired[name] + linked

    @property
    def failed(self) -> int:
        return self._unmapped + self._total("failed")

    @property
    def lost(self) -> int:
        return self._lost

    sent = property(lambda self: self._total("sent"))
    received = property(lambda self: self._total("received"))
    reconnects = property(lambda self: self._total("reconnects"))
    timeouts = property(lambda self: self._total("timeouts"))
    redirected = property(lambda self: self._total("redirected"))
    dropped = property(lambda self: self._total("dropped"))

    def health(self) -> dict[str, Any]:
        """What /healthz shows of the backplane: the whole, then each shard."""
        return {
            **health_of(self),
            # Channel publishes also go cluster-wide, for patterns on other nodes.
            "broadcast": self.broadcast,
            "shards": [
                {"url": link.url, "state": link.state, "since": round(float(link.since), 3)}
                for link in self.links.values()
            ],
        }
