"""The middleware API's types: the hooks, the client they are told about, a refusal.

What :mod:`pubsub.policy.middleware` calls, and what the built-in policies
(:mod:`pubsub.policy.auth`, :mod:`pubsub.policy.limits`) are made of; no
Twisted here, so a policy can be written and tested without a reactor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pubsub.core.vocabulary import CLOSE_POLICY, Kind

__all__ = ["Client", "Middleware", "Refused"]


class Refused(Exception):
    """Raised by a middleware hook (or a Deferred's failure) to refuse; its
    text is what the client is told.

    ``code`` is the error code a refused command is answered with
    (``NOPERM`` unless given: ``ERR``, say, for a limit rather than a
    permission); ``close_code`` the WebSocket close code a refused client
    gets: 1008 (policy violation) unless given, else one of the
    application's own, 3000 to 4999.
    """

    def __init__(
        self, reason: str = "", *, code: str | None = None, close_code: int = CLOSE_POLICY
    ) -> None:
        if code is not None and not (code.isascii() and code.isalpha() and code.isupper()):
            raise ValueError(f"an error code is one upper-case word, not {code!r}")
        if close_code != CLOSE_POLICY and not 3000 <= close_code <= 4999:
            raise ValueError(f"a close code is 1008 or 3000 to 4999, not {close_code}")
        super().__init__(reason)
        self.code = code
        self.close_code = close_code


class Client:
    """What a middleware knows of one client, the same object in every hook.

    ``transport`` is "websocket" or "resp"; ``peer`` the address it comes
    from; ``path``, ``params`` and ``headers`` those of its WebSocket
    handshake (empty for RESP).  ``identity`` is the middleware's own, None
    until one sets it; ``state`` a dict for middlewares to keep what they
    need per client (each under a key of its own).  ``claims`` are the
    claims of the token the client authenticated with, when tokens are in
    use (else None).
    """

    __slots__ = (
        "_guard",
        "client_id",
        "headers",
        "identity",
        "params",
        "path",
        "peer",
        "state",
        "transport",
    )

    def __init__(
        self,
        transport: str,
        client_id: int,
        peer: str,
        path: str = "",
        params: Mapping[str, Sequence[str]] | None = None,
        headers: Mapping[str, str] | None = None,
        guard: Any = None,
    ) -> None:
        self.transport = transport
        self.client_id = client_id
        self.peer = peer
        self.path = path
        self.params: Mapping[str, Sequence[str]] = params if params is not None else {}
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self.identity: Any = None
        self.state: dict[Any, Any] = {}
        self._guard = guard

    @property
    def claims(self) -> Mapping[str, Any] | None:
        grant = self._guard.grant if self._guard is not None else None
        return grant.claims if grant is not None else None

    def __repr__(self) -> str:
        return f"<Client {self.transport} #{self.client_id} from {self.peer}>"


class Middleware:
    """The hooks, each allowing by default; override the ones you need."""

    def on_accept(self, host: str) -> None:
        return None

    def on_close(self, host: str) -> None:
        return None

    def on_connect(self, client: Client) -> Any:
        return None

    def on_subscribe(self, client: Client, kind: Kind, name: bytes) -> Any:
        return None

    def on_publish(self, client: Client, kind: Kind, channel: bytes, payload: bytes) -> Any:
        return None

    def on_refused(self, client: Client, command: str, error: str) -> None:
        return None

    def on_disconnect(self, client: Client) -> None:
        return None
