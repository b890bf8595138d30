"""A middleware that asks an HTTP backend: for applications not written in Python.

With the ``middleware_url`` setting, the server POSTs a small JSON document
to that URL for each connect, subscribe (one per name) and publish, and
follows the answer.  The document::

    {"event": "connect" | "subscribe" | "publish",
     "client": {"id": 7, "transport": "websocket", "peer": "10.0.0.5:51234",
                "subject": "alice", "identity": null, "path": "/",
                "params": {"room": ["blue"]}},
     "kind": "channel", "channel": "news", "payload": "..."}

``kind`` and ``channel`` come with subscribe and publish, ``payload`` with
publish; a name or payload that is not UTF-8 is ``{"base64": "..."}``, as in
docs/protocol.md.  ``subject`` is the client's token subject, when tokens
are in use; ``identity`` what the backend answered at connect.

The answer, with status 200: ``{"allow": true}``, or ``{"allow": false,
"reason": "..."}``; a publish's may carry ``"payload"`` (a string, or
``{"base64": ...}``) to deliver instead, a connect's ``"identity"`` (any
JSON value) to remember.  Any other answer (another status, not JSON, no
boolean ``allow``) is a failure: refused and logged, as a backend that does
not answer within ``middleware_timeout``.

At most ``middleware_concurrency`` requests are in flight at once; more wait
their turn (and count against the timeout).  With ``middleware_cache`` a
subscribe decision is reused for that many seconds for the same token
subject (or, without tokens, the same client), kind and name: what a client
may subscribe to rarely changes from one second to the next, and a client
that resubscribes after a reconnect costs no request.  Publishes are never
cached: their payload is the backend's to judge.
"""

from __future__ import annotations

import base64
import json
from io import BytesIO
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

from pubsub.core.wire import wire_value
from pubsub.operations.config import ConfigError, Settings
from pubsub.policy.middleware import Client, Middleware, Refused

__all__ = ["HttpCallback"]

#: Most subscribe decisions kept at once; the oldest go first.
CACHE_SIZE = 10_000

#: What an answer may hold besides a replaced payload (which may be twice
#: max_message_size in base64): past it the answer is not read further.
ANSWER_MAX = 64 * 1024

_HEADERS = Headers(
    {b"content-type": [b"application/json"], b"user-agent": [b"pubsub middleware_url"]}
)


class BackendError(Exception):
    """The backend's answer cannot be followed."""


def _from_wire(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and isinstance(value.get("base64"), str) and len(value) == 1:
        try:
            return base64.b64decode(value["base64"], validate=True)
        except ValueError:
            pass
    raise BackendError(f"payload must be a string or {{'base64': ...}}, got {value!r}")


class _Answer(Protocol):
    """A response's body, read up to ``limit`` bytes: past it the connection
    is dropped and ``done`` fails, so an answer costs what its size allows."""

    transport: Any  # Twisted's proxy to the response's connection

    def __init__(self, limit: int, done: defer.Deferred[bytes]) -> None:
        self._limit = limit
        self._done = done
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()
            self._done.errback(BackendError(f"answered more than {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)


def _read(response: Any, limit: int) -> defer.Deferred[bytes]:
    """``response``'s body, at most ``limit`` bytes (as ``readBody``, bounded)."""
    reader: _Answer | None = None

    def cancel(_: Any) -> None:
        if reader is not None and reader.transport is not None:
            reader.transport.stopProducing()

    done: defer.Deferred[bytes] = defer.Deferred(cancel)
    reader = _Answer(limit, done)
    response.deliverBody(reader)
    return done


class HttpCallback(Middleware):
    """Asks ``url`` about every connect, subscribe and publish (see the module)."""

    def __init__(
        self,
        url: str,
        clock: Any,
        concurrency: int = 64,
        cache: float = 0.0,
        answer_limit: int = ANSWER_MAX,
    ) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ConfigError(
                f"setting middleware_url must be an http:// or https:// URL, got {url!r}"
            )
        if concurrency < 1:
            raise ConfigError(
                f"setting middleware_concurrency must be at least 1, got {concurrency}"
            )
        self.url = url.encode("utf-8")
        self._clock = clock
        pool = HTTPConnectionPool(clock, persistent=True)
        pool.maxPersistentPerHost = concurrency
        self._agent = Agent(clock, pool=pool)
        self._slots = defer.DeferredSemaphore(concurrency)
        self._cache_seconds = cache
        self._answer_limit = answer_limit
        self._cache: dict[tuple[Any, str, bytes], tuple[float, str | None]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, clock: Any) -> HttpCallback | None:
        """The callback the settings ask for, or None without ``middleware_url``."""
        url = settings.middleware_url.strip()
        if not url:
            return None
        # A replaced payload may be as large as a message, and base64 makes
        # it a third larger; without max_message_size, Redis's 512 MB bound.
        largest = settings.max_message_size or 512 * 1024 * 1024
        return cls(
            url,
            clock,
            settings.middleware_concurrency,
            settings.middleware_cache,
            ANSWER_MAX + 2 * largest,
        )

    # -- the hooks ----------------------------------------------------------------------

    def on_connect(self, client: Client) -> Any:
        return self._ask("connect", client).addCallback(self._connected, client)

    def on_subscribe(self, client: Client, kind: str, name: bytes) -> Any:
        key = (self._who(client), str(kind), name)
        cached = self._cache.get(key)
        if cached is not None:
            expires, reason = cached
            if self._clock.seconds() < expires:
                if reason is not None:
                    raise Refused(reason)
                return None
            del self._cache[key]
        asked = self._ask("subscribe", client, kind=str(kind), channel=wire_value(name))
        if self._cache_seconds:
            asked.addBoth(self._remembered, key)
        return asked

    def on_publish(self, client: Client, kind: str, channel: bytes, payload: bytes) -> Any:
        asked = self._ask(
            "publish",
            client,
            kind=str(kind),
            channel=wire_value(channel),
            payload=wire_value(payload),
        )
        return asked.addCallback(self._published)

    # -- the answers --------------------------------------------------------------------

    @staticmethod
    def _connected(answer: dict[str, Any], client: Client) -> None:
        if "identity" in answer:
            client.identity = answer["identity"]

    def _remembered(self, answer: Any, key: tuple[Any, str, bytes]) -> Any:
        """Keep a subscribe decision, a refusal (a Failure) or not."""
        if not isinstance(answer, Failure):
            self._remember(key, None)
        elif answer.check(Refused):
            self._remember(key, str(answer.value))
        return answer

    @staticmethod
    def _published(answer: dict[str, Any]) -> bytes | None:
        if "payload" in answer:
            return _from_wire(answer["payload"])
        return None

    def _remember(self, key: tuple[Any, str, bytes], reason: str | None) -> None:
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[key] = (self._clock.seconds() + self._cache_seconds, reason)

    @staticmethod
    def _who(client: Client) -> Any:
        claims = client.claims
        subject = claims.get("sub") if claims is not None else None
        return ("subject", subject) if isinstance(subject, str) else ("client", client.client_id)

    # -- the request --------------------------------------------------------------------

    def _ask(self, event: str, client: Client, **fields: Any) -> defer.Deferred[dict[str, Any]]:
        claims = client.claims
        document = {
            "event": event,
            "client": {
                "id": client.client_id,
                "transport": client.transport,
                "peer": client.peer,
                "subject": claims.get("sub") if claims is not None else None,
                "identity": client.identity,
                "path": client.path,
                "params": {name: list(values) for name, values in client.params.items()},
            },
            **fields,
        }
        body = json.dumps(document).encode("utf-8")
        asked: defer.Deferred[dict[str, Any]] = self._slots.run(self._post, body)
        return asked

    @defer.inlineCallbacks
    def _post(self, body: bytes) -> Any:
        # FileBodyProducer provides IBodyProducer (@implementer), which mypy
        # cannot see without the zope plugin.
        producer = cast(IBodyProducer, FileBodyProducer(BytesIO(body)))
        response = yield self._agent.request(b"POST", self.url, _HEADERS, producer)
        data = yield _read(response, self._answer_limit)
        if response.code != 200:
            raise BackendError(f"{self.url.decode()} answered HTTP {response.code}")
        try:
            answer = json.loads(data)
        except ValueError:
            raise BackendError(f"{self.url.decode()} answered something not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("allow"), bool):
            raise BackendError(f"{self.url.decode()} answered without a boolean allow")
        if not answer["allow"]:
            reason = answer.get("reason")
            raise Refused(reason if isinstance(reason, str) and reason else "refused")
        return answer
