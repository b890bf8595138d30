"""The Pub/Sub core: clients, channels, patterns, shard channels and publishing.

This is Redis 7's ``src/pubsub.c`` as a plain Python library.  It knows nothing
of sockets, frames or event loops: a host (the WebSocket server, an embedding
application, a test) registers each of its clients with a *subscriber* object
and gets back a client id; it then calls the command methods with that id and
turns their results into whatever its wire format needs.

Data, all keyed by bytes exactly as Redis keys them:

* ``_clients``: client id -> client record (the subscriber's ``deliver`` and
  ``encoder``, and the client's own channels, patterns and shard channels, so
  that unsubscribing everything or disconnecting costs only what it held);
* ``_channels``, ``_shard_channels``, ``_patterns``: name -> ``SortedSet`` of
  client ids, or a 1-tuple while there is one subscriber (48 bytes instead
  of 1.5 KB).  Ids grow with each registration, so every set is in
  connection-age order and delivery follows it;
* ``_pattern_index``: literal-prefix length -> prefix -> {pattern: matcher}, so
  that a publish tries only the patterns whose literal prefix the channel
  starts with, never every pattern in the server.

A publish encodes its message once per encoder (one per transport kind), not
once per receiver, and hands the same frame to each receiver's ``deliver``.

An optional :class:`~pubsub.core.history.History` keeps the recent messages
of the channels it covers: a publish on one of them gets a position, which
the channel's subscribers' encoders are given (``message_at``) for the
clients that asked to see it.  A :class:`~pubsub.core.history.SharedHistory`
(the nodes', kept by a backplane) takes such a publish instead, and it comes
back with its position to ``deliver_message_at``.

Two small hooks let a host carry Pub/Sub beyond this process without the
engine knowing how: an optional :class:`Relay` is told when a channel,
pattern or shard channel gets its first subscriber or loses its last, and of
every publish; and ``deliver_message``, ``deliver_pmessage`` and
``deliver_smessage`` hand a message that arrived from elsewhere to the local
subscribers of one channel, one pattern or one shard channel only.

Nothing here may import Twisted, Autobahn or a codec.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeAlias

from sortedcontainers import SortedSet  # type: ignore[import-untyped]

from pubsub.core.glob import Matcher, compile_pattern, literal_prefix
from pubsub.core.history import History, Position, SharedHistory
from pubsub.core.vocabulary import Kind

__all__ = ["Encoder", "Engine", "Kind", "Relay", "Subscriber", "UnknownClient"]

# The members, as plain names: reading one through the Enum class is a
# lookup in its metaclass, dearer than a global.
_CHANNEL, _PATTERN, _SHARD = Kind.CHANNEL, Kind.PATTERN, Kind.SHARD

#: The subscribers of one name, in client id order: a 1-tuple or a SortedSet.
ClientIds: TypeAlias = "tuple[int] | SortedSet"

#: One (un)subscribe confirmation: the name (None for "held nothing") and the
#: client's subscription count after the change.
Confirmation = tuple[bytes | None, int]


class Encoder(Protocol):
    """Builds the frame a transport sends for each delivery: one method per
    message type (``Kind.message``).

    One encoder is shared by every client of the same transport and format,
    and it must be hashable: a publish calls each encoder of its receivers
    once and reuses the frame.
    """

    def message(self, channel: bytes, payload: bytes) -> Any: ...

    def pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> Any: ...

    def smessage(self, channel: bytes, payload: bytes) -> Any: ...

    def message_at(self, channel: bytes, payload: bytes, position: Position) -> Any:
        """A ``message`` whose channel keeps a history, with its ``position``
        (for the clients that asked for positions; others ignore it)."""
        ...


class Subscriber(Protocol):
    """What a host registers for each of its clients.

    ``deliver`` is called synchronously during a publish with a frame from
    ``encoder``.  It must not raise and must not call back into the engine
    (a host that wants to drop a client does it on a later reactor turn, as
    Twisted's transports do).
    """

    @property
    def encoder(self) -> Encoder: ...

    def deliver(self, frame: Any) -> None: ...


class Relay(Protocol):
    """Carries this engine's interest and publishes elsewhere (another node).

    ``kind`` is a :class:`Kind` (a ``str``: "channel", "pattern" or "shard").  The engine calls these
    synchronously, after its own state changed; they must not raise and must
    not call back into the engine.  ``refusal`` is for hosts, not the engine:
    after a publish that reached ``receivers`` local subscribers, the error to
    answer instead of the count when the publish could not be carried on, or
    None when it was.
    """

    def interest_gained(self, kind: Kind, name: bytes) -> None: ...

    def interest_lost(self, kind: Kind, name: bytes) -> None: ...

    def published(self, kind: Kind, channel: bytes, payload: bytes) -> None: ...

    def refusal(self, receivers: int) -> str | None: ...


class UnknownClient(KeyError):
    """A command named a client id that is not (or no longer) registered."""


class _Client:
    __slots__ = ("channels", "deliver", "encoder", "patterns", "shard_channels")

    def __init__(self, subscriber: Subscriber) -> None:
        self.deliver: Callable[[Any], None] = subscriber.deliver
        self.encoder: Encoder = subscriber.encoder
        # dicts used as insertion-ordered sets: unsubscribing everything
        # confirms in the order the client subscribed.
        self.channels: dict[bytes, None] = {}
        self.patterns: dict[bytes, None] = {}
        self.shard_channels: dict[bytes, None] = {}

    def count(self) -> int:
        """Redis's clientSubscriptionsCount: channels plus patterns."""
        return len(self.channels) + len(self.patterns)

    def shard_count(self) -> int:
        return len(self.shard_channels)

    def held(self, kind: Kind) -> dict[bytes, None]:
        """The names held as ``kind``."""
        held: dict[bytes, None] = getattr(self, _HELD_AS[kind])
        return held


#: The attribute of a client that holds the names of each kind.
_HELD_AS = {_CHANNEL: "channels", _PATTERN: "patterns", _SHARD: "shard_channels"}


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


class Engine:
    """Redis Pub/Sub semantics over a client map keyed by client id."""

    def __init__(self) -> None:
        self._client_ids = itertools.count(1)
        self._clients: dict[int, _Client] = {}
        self._channels: dict[bytes, ClientIds] = {}
        self._shard_channels: dict[bytes, ClientIds] = {}
        self._patterns: dict[bytes, ClientIds] = {}
        #: Each kind's names and their subscribers (pubsubtype's serverPubSubChannels).
        self._registries = {
            _CHANNEL: self._channels,
            _PATTERN: self._patterns,
            _SHARD: self._shard_channels,
        }
        self._pattern_index: dict[int, dict[bytes, dict[bytes, Matcher]]] = {}
        #: PUBLISH and SPUBLISH calls, and the deliveries they made, since start.
        self.publishes = 0
        self.deliveries = 0
        #: Told of first/last subscribers and of every publish; None: this node only.
        self.relay: Relay | None = None
        #: The recent messages of the channels it covers; None: none kept.
        self.history: History | SharedHistory | None = None

    # -- clients -----------------------------------------------------------

    def register(self, subscriber: Subscriber) -> int:
        """Add a client; returns its id for every later call."""
        client_id = next(self._client_ids)
        self._clients[client_id] = _Client(subscriber)
        return client_id

    def unregister(self, client_id: int) -> None:
        """Drop a client and everything it held, silently (as on disconnect).

        Unknown ids are ignored, so a host may call this from every
        close path without keeping track of which ran first.
        """
        client = self._clients.pop(client_id, None)
        if client is None:
            return
        for kind in (_CHANNEL, _SHARD, _PATTERN):
            registry = self._registries[kind]
            for name in client.held(kind):
                if self._discard(registry, name, client_id):
                    self._lost(kind, name)

    def set_encoder(self, client_id: int, encoder: Encoder) -> None:
        """Deliver to this client in another format from now on (RESP's HELLO 3)."""
        self._client(client_id).encoder = encoder

    def set_subscriber(self, client_id: int, subscriber: Subscriber) -> None:
        """Deliver to this client through ``subscriber`` (its ``deliver`` and
        ``encoder``) from now on: a host that holds a client's messages for a
        while, then gives it back its own."""
        client = self._client(client_id)
        client.deliver = subscriber.deliver
        client.encoder = subscriber.encoder

    def _client(self, client_id: int) -> _Client:
        try:
            return self._clients[client_id]
        except KeyError:
            raise UnknownClient(client_id) from None

    def subscription_count(self, client_id: int) -> int:
        """Channels, patterns and shard channels the client holds."""
        client = self._client(client_id)
        return client.count() + client.shard_count()

    def new_subscriptions(self, client_id: int, kind: Kind, names: Iterable[bytes]) -> int:
        """How many of ``names`` the client does not yet hold as ``kind``.

        Hosts use this to enforce a per-client subscription limit before
        subscribing.
        """
        held = self._client(client_id).held(kind)
        return len({name for name in names if name not in held})

    def held(self, client_id: int, kind: Kind) -> list[bytes]:
        """The names the client holds as ``kind``, in the order it subscribed to them."""
        return list(self._client(client_id).held(kind))

    # -- subscribing -------------------------------------------------------

    def subscribe(self, client_id: int, channels: Iterable[bytes]) -> list[Confirmation]:
        """SUBSCRIBE: one confirmation per name given, duplicates included."""
        return self._join(client_id, _CHANNEL, channels)

    def unsubscribe(self, client_id: int, channels: Iterable[bytes] = ()) -> list[Confirmation]:
        """UNSUBSCRIBE: the names given, or every channel held when none are."""
        return self._leave(client_id, _CHANNEL, channels)

    def psubscribe(self, client_id: int, patterns: Iterable[bytes]) -> list[Confirmation]:
        """PSUBSCRIBE: one confirmation per pattern given."""
        return self._join(client_id, _PATTERN, patterns)

    def punsubscribe(self, client_id: int, patterns: Iterable[bytes] = ()) -> list[Confirmation]:
        """PUNSUBSCRIBE: the patterns given, or every pattern held."""
        return self._leave(client_id, _PATTERN, patterns)

    def ssubscribe(self, client_id: int, channels: Iterable[bytes]) -> list[Confirmation]:
        """SSUBSCRIBE: counts only shard channels, as Redis does."""
        return self._join(client_id, _SHARD, channels)

    def sunsubscribe(self, client_id: int, channels: Iterable[bytes] = ()) -> list[Confirmation]:
        """SUNSUBSCRIBE: the shard channels given, or every one held."""
        return self._leave(client_id, _SHARD, channels)

    def _join(self, client_id: int, kind: Kind, names: Iterable[bytes]) -> list[Confirmation]:
        client = self._client(client_id)
        held, registry = client.held(kind), self._registries[kind]
        count = client.shard_count if kind.sharded else client.count
        replies: list[Confirmation] = []
        for name in names:
            if name not in held:
                held[name] = None
                if self._add(registry, name, client_id):
                    self._gained(kind, name)
            replies.append((name, count()))
        return replies

    def _leave(self, client_id: int, kind: Kind, names: Iterable[bytes]) -> list[Confirmation]:
        client = self._client(client_id)
        held, registry = client.held(kind), self._registries[kind]
        count = client.shard_count if kind.sharded else client.count
        names = list(names)
        if not names:
            if not held:
                return [(None, count())]
            names = list(held)
        replies: list[Confirmation] = []
        for name in names:
            if name in held:
                del held[name]
                if self._discard(registry, name, client_id):
                    self._lost(kind, name)
            replies.append((name, count()))
        return replies

    def _gained(self, kind: Kind, name: bytes) -> None:
        """``name`` has its first subscriber of ``kind``."""
        if kind is _PATTERN:
            self._index_pattern(name)
        if self.relay is not None:
            self.relay.interest_gained(kind, name)

    def _lost(self, kind: Kind, name: bytes) -> None:
        """``name`` lost its last subscriber of ``kind``."""
        if kind is _PATTERN:
            self._unindex_pattern(name)
        elif kind is _CHANNEL and self.history is not None and self.history.shared:
            self.history.forget(name)
        if self.relay is not None:
            self.relay.interest_lost(kind, name)

    @staticmethod
    def _add(registry: dict[bytes, ClientIds], name: bytes, client_id: int) -> bool:
        """Add ``client_id`` under ``name``; True when the name is new.

        A name with one subscriber holds a 1-tuple (48 bytes, where a
        SortedSet takes 1.5 KB): most channels of a big server have one.
        """
        client_ids = registry.get(name)
        if client_ids is None:
            registry[name] = (client_id,)
            return True
        if isinstance(client_ids, tuple):
            registry[name] = SortedSet((client_ids[0], client_id))
        else:
            client_ids.add(client_id)
        return False

    @staticmethod
    def _discard(registry: dict[bytes, ClientIds], name: bytes, client_id: int) -> bool:
        """Remove ``client_id`` from ``name``; True when that emptied the name."""
        client_ids = registry[name]
        if isinstance(client_ids, tuple):
            del registry[name]
            return True
        client_ids.discard(client_id)
        if len(client_ids) == 1:
            registry[name] = (client_ids[0],)
        return False

    def _index_pattern(self, pattern: bytes) -> None:
        prefix = literal_prefix(pattern)
        bucket = self._pattern_index.setdefault(len(prefix), {}).setdefault(prefix, {})
        bucket[pattern] = compile_pattern(pattern)

    def _unindex_pattern(self, pattern: bytes) -> None:
        prefix = literal_prefix(pattern)
        by_prefix = self._pattern_index[len(prefix)]
        bucket = by_prefix[prefix]
        del bucket[pattern]
        if not bucket:
            del by_prefix[prefix]
            if not by_prefix:
                del self._pattern_index[len(prefix)]

    # -- publishing --------------------------------------------------------

    def publish(self, channel: bytes | str, payload: bytes | str) -> int:
        """PUBLISH: deliver to channel and pattern subscribers.

        Returns what Redis returns: the number of deliveries, so a client
        subscribed to the channel and to two matching patterns counts three
        times.  Channel subscribers get their message first, then each
        matching pattern's subscribers in byte order of the pattern; within
        a channel or pattern, subscribers in connection-age order.  ``str``
        arguments are taken as UTF-8.
        """
        channel = _as_bytes(channel)
        payload = _as_bytes(payload)
        receivers = 0
        position = None
        history = self.history
        if history is not None and history.keeps(channel):
            if history.shared:
                return self._publish_shared(history, channel, payload)
            position = history.append(channel, payload)
        client_ids = self._channels.get(channel)
        if client_ids:
            if position is None:
                receivers += self._fan_out(client_ids, _CHANNEL.message, channel, payload)
            else:
                receivers += self._fan_out(client_ids, "message_at", channel, payload, position)
        if self._pattern_index:
            for pattern in self._matching_patterns(channel):
                receivers += self._fan_out(
                    self._patterns[pattern], _PATTERN.message, pattern, channel, payload
                )
        self.publishes += 1
        self.deliveries += receivers
        if self.relay is not None:
            self.relay.published(_CHANNEL, channel, payload)
        return receivers

    def _publish_shared(self, history: SharedHistory, channel: bytes, payload: bytes) -> int:
        """A publish on a channel whose history the nodes share: handed over,
        it comes back with its position (:meth:`deliver_message_at`) to every
        node, this one included.  The count is of the local subscribers it
        will reach, as a local publish counts them."""
        self.publishes += 1
        if history.publish(channel, payload):
            receivers = len(self._channels.get(channel, ()))
            for pattern in self._matching_patterns(channel) if self._pattern_index else ():
                receivers += len(self._patterns[pattern])
            return receivers
        # Not handed over (the backplane is down or behind, and says so to
        # the publisher): delivered here only, without a position.
        receivers = self._deliver(self._channels, channel, _CHANNEL.message, channel, payload)
        for pattern in self._matching_patterns(channel) if self._pattern_index else ():
            receivers += self._deliver(
                self._patterns, pattern, _PATTERN.message, pattern, channel, payload
            )
        return receivers

    def spublish(self, channel: bytes | str, payload: bytes | str) -> int:
        """SPUBLISH: deliver to the shard channel's subscribers."""
        channel = _as_bytes(channel)
        payload = _as_bytes(payload)
        self.publishes += 1
        if self.relay is not None:
            self.relay.published(_SHARD, channel, payload)
        return self._deliver(self._shard_channels, channel, _SHARD.message, channel, payload)

    # -- messages from elsewhere (a relay's other nodes) ------------------

    def deliver_message(self, channel: bytes, payload: bytes) -> int:
        """A message published elsewhere, to this channel's own subscribers only.

        Pattern subscribers are not tried: the relay hears of the same
        publish once per matching pattern, see :meth:`deliver_pmessage`.
        Returns the deliveries made; ``publishes`` does not count it.
        """
        return self._deliver(self._channels, channel, _CHANNEL.message, channel, payload)

    def deliver_message_at(self, channel: bytes, payload: bytes, position: Position) -> int:
        """A message of a channel whose history the nodes share, at ``position``
        in it, to this channel's own subscribers only (see :meth:`deliver_message`)."""
        return self._deliver(self._channels, channel, "message_at", channel, payload, position)

    def deliver_pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> int:
        """A message published elsewhere on ``channel``, to the subscribers of
        ``pattern`` only (the relay already knows that it matches)."""
        return self._deliver(self._patterns, pattern, _PATTERN.message, pattern, channel, payload)

    def deliver_smessage(self, channel: bytes, payload: bytes) -> int:
        """A shard message published elsewhere, to this shard channel's subscribers."""
        return self._deliver(self._shard_channels, channel, _SHARD.message, channel, payload)

    def _deliver(
        self, registry: dict[bytes, ClientIds], name: bytes, message_type: str, *fields: Any
    ) -> int:
        """Fan out to the subscribers of ``name`` in ``registry`` and count the deliveries."""
        client_ids = registry.get(name)
        if not client_ids:
            return 0
        receivers = self._fan_out(client_ids, message_type, *fields)
        self.deliveries += receivers
        return receivers

    def _matching_patterns(self, channel: bytes) -> list[bytes]:
        matched = []
        for length, by_prefix in self._pattern_index.items():
            bucket = by_prefix.get(channel[:length])
            if bucket:
                for pattern, matcher in bucket.items():
                    if matcher(channel) is not None:
                        matched.append(pattern)
        matched.sort()
        return matched

    def _fan_out(self, client_ids: ClientIds, message_type: str, *fields: Any) -> int:
        """Hand each subscriber in ``client_ids`` the frame its encoder's
        ``message_type`` method builds of ``fields`` (built once per encoder)."""
        clients = self._clients
        frames: dict[Any, Any] = {}  # encoder -> frame; encoders are hashable
        for client_id in client_ids:
            client = clients[client_id]
            frame = frames.get(client.encoder)
            if frame is None:
                frame = frames[client.encoder] = getattr(client.encoder, message_type)(*fields)
            client.deliver(frame)
        return len(client_ids)

    # -- introspection (PUBSUB) -------------------------------------------

    def channels(self, pattern: bytes | None = None) -> list[bytes]:
        """PUBSUB CHANNELS: active channels matching ``pattern``, sorted."""
        return self._names(self._channels, pattern)

    def shard_channels(self, pattern: bytes | None = None) -> list[bytes]:
        """PUBSUB SHARDCHANNELS: active shard channels, sorted."""
        return self._names(self._shard_channels, pattern)

    @staticmethod
    def _names(registry: dict[bytes, ClientIds], pattern: bytes | None) -> list[bytes]:
        if pattern is None:
            return sorted(registry)
        matcher = compile_pattern(pattern)
        return sorted(name for name in registry if matcher(name) is not None)

    def patterns(self) -> list[bytes]:
        """Patterns with at least one subscriber, sorted."""
        return sorted(self._patterns)

    def numsub(self, channels: Iterable[bytes]) -> list[tuple[bytes, int]]:
        """PUBSUB NUMSUB: subscriber count per channel (patterns not counted)."""
        return [(c, len(self._channels.get(c, ()))) for c in channels]

    def shard_numsub(self, channels: Iterable[bytes]) -> list[tuple[bytes, int]]:
        """PUBSUB SHARDNUMSUB: subscriber count per shard channel."""
        return [(c, len(self._shard_channels.get(c, ()))) for c in channels]

    def numpat(self) -> int:
        """PUBSUB NUMPAT: distinct patterns subscribed to, as Redis 7 counts."""
        return len(self._patterns)

    # -- figures for health checks and metrics ----------------------------

    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def subscription_total(self) -> int:
        """Channel, pattern and shard channel subscriptions of every client."""
        return sum(
            len(client_ids)
            for registry in (self._channels, self._patterns, self._shard_channels)
            for client_ids in registry.values()
        )

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def shard_channel_count(self) -> int:
        return len(self._shard_channels)
