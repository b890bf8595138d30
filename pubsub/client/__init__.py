"""A Python client for the pubsub server, on Twisted or on asyncio.

Pick the host that matches your program; both have the same commands, the
same reconnect behaviour and the same :class:`Message`::

    from pubsub.client.twisted import connect   # Deferreds, Autobahn
    from pubsub.client.asyncio import connect   # coroutines, websockets

Both are thin hosts around one sans-I/O core (``pubsub.client._core``), which
holds the protocol: answers matched to requests, subscriptions held for
resubscription, positions kept for recovery, payloads as text or bytes. See
docs/clients.md.
"""

from pubsub.client._core import (
    CLOSED,
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    Message,
    ProtocolViolation,
    Recovery,
    RecoveryFailed,
    ReplyError,
    TokenRefused,
)

__all__ = [
    "CLOSED",
    "CONNECTED",
    "CONNECTING",
    "DISCONNECTED",
    "Message",
    "ProtocolViolation",
    "Recovery",
    "RecoveryFailed",
    "ReplyError",
    "TokenRefused",
]
