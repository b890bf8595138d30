"""The words the server, the backplane and the clients share.

- :class:`Kind`: the three kinds of subscription, each with what Redis's
  ``pubsubtype`` declares of it (``src/pubsub.c``): its commands, the type of
  its messages, and which of a client's two counts it adds to.
- The WebSocket close codes the server sends, and the reasons that are fixed
  texts, so that a client tells one close from another by its code.

It imports nothing: the engine, the transports, the backplane and the
Python client (which knows nothing else of the server) all read it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOKEN",
    "REASON_INTERNAL_ERROR",
    "REASON_SHUTDOWN",
    "Kind",
]


class Kind(StrEnum):
    """A kind of subscription: a channel, a pattern or a shard channel.

    Each member is its name as a string (``Kind.CHANNEL == "channel"``), so
    code written against the bare names goes on working.
    """

    #: The command that subscribes (and the type of its confirmation).
    subscribe: str
    #: The command that unsubscribes (and the type of its confirmation).
    unsubscribe: str
    #: The type of the messages it delivers, and the ``Encoder`` method
    #: that builds them.
    message: str
    #: What its names are called in error texts ("channel name").
    noun: str
    #: Whether it adds to the client's shard count (SSUBSCRIBE's replies)
    #: rather than to its count of channels and patterns.
    sharded: bool

    def __new__(
        cls, name: str, subscribe: str, unsubscribe: str, message: str, noun: str, sharded: bool
    ) -> Self:
        member = str.__new__(cls, name)
        member._value_ = name
        member.subscribe = subscribe
        member.unsubscribe = unsubscribe
        member.message = message
        member.noun = noun
        member.sharded = sharded
        return member

    CHANNEL = ("channel", "subscribe", "unsubscribe", "message", "channel name", False)
    PATTERN = ("pattern", "psubscribe", "punsubscribe", "pmessage", "pattern", False)
    SHARD = ("shard", "ssubscribe", "sunsubscribe", "smessage", "shard channel name", True)


# -- WebSocket close codes (RFC 6455 7.4) ----------------------------------------------------

#: The client closed, or the server closed at the client's request.
CLOSE_NORMAL = 1000
#: The server is shutting down (twistd stopping); reconnect elsewhere or later.
CLOSE_GOING_AWAY = 1001
#: A frame broke RFC 6455 (Autobahn's own closes; 1007 and 1009 are its too).
CLOSE_PROTOCOL_ERROR = 1002
#: A policy ended the connection: origin refused, idle, output buffer over
#: its limit. The reason says which; retrying as it was will meet it again.
CLOSE_POLICY = 1008
#: An unexpected fault in the server while handling the connection.
CLOSE_INTERNAL_ERROR = 1011
#: The connection's token was refused, expired, or no longer allows what
#: the connection holds, or no token came in time (from the private-use
#: range, 4000-4999): a new token is needed. Servers before this code used
#: 1008 with one of the reasons the Python client still recognises.
CLOSE_TOKEN = 4001

#: The reason sent with :data:`CLOSE_GOING_AWAY` at shutdown.
REASON_SHUTDOWN = "server shutting down"
#: The reason sent with :data:`CLOSE_INTERNAL_ERROR`.
REASON_INTERNAL_ERROR = "internal error"
