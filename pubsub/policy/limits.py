"""Connection policies both transports apply around the command table.

What lives here decides whether a client may connect, publish or stay, and
nothing else: the origin allow-list (WebSocket), connections per IP address,
the publish rate limit (a token bucket per client) and the idle timeout.  Each
is built from :class:`~pubsub.operations.config.Settings`, keeps its time through an
injected clock (``IReactorTime``: the reactor, or a ``Clock`` in tests), and
knows nothing about frames or sockets.  The first three are middlewares
(:mod:`pubsub.policy.middleware`), which a port puts at the head of its
chain when their settings are on; the engine and the command table know
nothing about any of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from autobahn.util import wildcards2patterns

from pubsub.core.vocabulary import Kind
from pubsub.policy.hooks import Client, Middleware, Refused

__all__ = [
    "IdleTimer",
    "OriginPolicy",
    "PeerCounter",
    "PublishLimit",
    "TokenBucket",
]


# -- origins ----------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _with_port(wildcard: str) -> str:
    """An allow-list entry as Autobahn matches it, ``scheme://host:port``: an entry
    without a port means the scheme's default one (any port for other schemes)."""
    scheme, separator, rest = wildcard.partition("://")
    if not separator or rest.rsplit("]", 1)[-1].find(":") >= 0:
        return wildcard
    return f"{wildcard}:{_DEFAULT_PORTS.get(scheme.lower(), '*')}"


class OriginPolicy(Middleware):
    """The ``allowed_origins`` setting: which browser origins may connect.

    Entries are Autobahn's wildcards (``*`` matches anything) compiled by
    Autobahn's own :func:`~autobahn.util.wildcards2patterns`, and matched as
    Autobahn matches them, against ``scheme://host:port``.  ``null`` (pages
    from files, sandboxed frames) is allowed only when listed.  An empty
    list allows every origin.

    A WebSocket port's middleware when the list is not empty: a refused
    client's handshake completes, then it is closed with 1008 and the
    reason, which a browser's script sees (an HTTP 403 would reach it as a
    bare failure).
    """

    def __init__(self, setting: str) -> None:
        entries = [entry.strip() for entry in setting.split(",") if entry.strip()]
        self.allow_all = not entries
        self.allow_null = "null" in entries
        self._patterns = wildcards2patterns([_with_port(e) for e in entries if e != "null"])
        #: Clients refused for their origin since start-up.
        self.refused = 0

    def on_connect(self, client: Client) -> None:
        # Autobahn and the lean handshake both name headers in lower case.
        origin = client.headers.get("origin")
        if not self.allows(origin or None):
            self.refused += 1
            raise Refused(f"origin not allowed: {origin}")

    def allows(self, origin: str | None) -> bool:
        """Whether a handshake with this ``Origin`` header may open.

        No header at all is a client that is not a browser, which an origin
        check cannot protect against anyway: it is let in.
        """
        if self.allow_all or origin is None:
            return True
        if origin.strip().lower() == "null":
            return self.allow_null
        try:
            parts = urlsplit(origin.strip())
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        except ValueError:
            return False
        if not parts.hostname:
            return False
        normal = f"{parts.scheme.lower()}://{parts.hostname}:{port}"
        return any(pattern.match(normal) for pattern in self._patterns)


# -- connections per address --------------------------------------------------------------


class PeerCounter(Middleware):
    """Open connections per IP address, under the ``max_connections_per_ip``
    limit: a port's middleware when the limit is set."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()
        #: Connections refused at the limit since start-up.
        self.refused = 0

    def on_accept(self, host: str) -> None:
        if not self.acquire(host):
            raise Refused("max number of clients reached for this address", code="ERR")

    def on_close(self, host: str) -> None:
        self.release(host)

    def acquire(self, host: str) -> bool:
        """Count a new connection from ``host``; False (not counted) at the limit."""
        if self.limit and self._open[host] >= self.limit:
            self.refused += 1
            return False
        self._open[host] += 1
        return True

    def release(self, host: str) -> None:
        """A connection counted by :meth:`acquire` has closed."""
        left = self._open[host] - 1
        if left > 0:
            self._open[host] = left
        else:
            del self._open[host]

    def open_from(self, host: str) -> int:
        """How many connections from ``host`` are open."""
        return self._open.get(host, 0)


def peer_host(address: Any) -> str:
    """The IP address (or UNIX path) a connection comes from, as counted."""
    host = getattr(address, "host", None)
    return str(host if host is not None else getattr(address, "name", address))


# -- publish rate ---------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Any) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock.seconds()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = self._clock.seconds()
        tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


class PublishLimit(Middleware):
    """The ``publish_rate`` / ``publish_burst`` settings: one bucket per
    client, spent by each PUBLISH and SPUBLISH the middlewares before it
    allowed; a port's middleware when the rate is set."""

    def __init__(self, rate: float, burst: int, clock: Any) -> None:
        self.rate = rate
        self.burst = burst or max(1, int(rate))
        self._clock = clock
        self._reason = (
            f"publish rate limit exceeded: at most {rate:g} publishes per second "
            f"(burst {self.burst}); the message was not delivered"
        )
        #: Publishes refused since start-up.
        self.refused = 0

    @classmethod
    def from_settings(cls, settings: Any, clock: Any) -> PublishLimit:
        return cls(settings.publish_rate, settings.publish_burst, clock)

    def on_publish(self, client: Client, kind: Kind, channel: bytes, payload: bytes) -> None:
        bucket = client.state.get(self)
        if bucket is None:
            # Made at the first publish, full: as it would be had it been
            # made at the connect and filled since.
            bucket = client.state[self] = TokenBucket(self.rate, self.burst, self._clock)
        if not bucket.take():
            self.refused += 1
            raise Refused(self._reason, code="ERR")


# -- idle clients -----------------------------------------------------------------------------


class IdleTimer:
    """Calls ``expire`` once a client has sent no command for ``seconds``,
    unless ``exempt()`` says otherwise when the time comes (subscribers, as
    Redis never times out a Pub/Sub client); then it waits another period.

    The hot path only stores a time (:meth:`touch`); the timer itself wakes
    once per period at most.
    """

    def __init__(
        self,
        clock: Any,
        seconds: float,
        exempt: Callable[[], bool],
        expire: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._seconds = seconds
        self._exempt = exempt
        self._expire = expire
        self.last = clock.seconds()
        self._call = clock.callLater(seconds, self._check)

    def touch(self) -> None:
        """The client has just sent something that counts as activity."""
        self.last = self._clock.seconds()

    def _check(self) -> None:
        now = self._clock.seconds()
        due = self.last + self._seconds
        if now < due:
            self._call = self._clock.callLater(due - now, self._check)
        elif self._exempt():
            self.last = now
            self._call = self._clock.callLater(self._seconds, self._check)
        else:
            self._call = None
            self._expire()

    def cancel(self) -> None:
        """The connection has ended: stop watching it."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
