"""A middleware: the channels of a room only for tokens that name the room.

Channels named ``room:<name>`` may be subscribed to and published on only by
clients whose token lists ``<name>`` in its ``rooms`` claim; other channels
are left to the server's own rules.  A pattern that could match a room's
channel is refused, since a pattern cannot prove membership.  The server
must check tokens (``jwt_secret`` or ``jwt_public_key``)::

    PYTHONPATH=docs/examples twistd -n pubsub --jwt-secret ... \\
        --middleware middleware_rooms:RoomMembers

The hooks answer at once here; a hook may also return a Deferred, or be a
coroutine, to ask a database (docs/embedding.md, "Middleware").
"""

from __future__ import annotations

from pubsub import Client, Middleware, Refused

PREFIX = b"room:"


class RoomMembers(Middleware):
    def on_subscribe(self, client: Client, kind: str, name: bytes) -> None:
        if kind == "pattern":
            if _could_match_a_room(name):
                raise Refused(f"a pattern may not cover rooms: {name.decode(errors='replace')}")
        elif name.startswith(PREFIX):
            _check_member(client, name)

    def on_publish(self, client: Client, kind: str, channel: bytes, payload: bytes) -> None:
        if channel.startswith(PREFIX):
            _check_member(client, channel)


def _check_member(client: Client, channel: bytes) -> None:
    room = channel[len(PREFIX) :].decode("utf-8", errors="replace")
    rooms = (client.claims or {}).get("rooms", [])
    if not isinstance(rooms, list) or room not in rooms:
        raise Refused(f"not a member of room {room}")


def _could_match_a_room(pattern: bytes) -> bool:
    """Whether ``pattern`` (Redis glob) could match a channel that starts with PREFIX."""
    for position, expected in enumerate(PREFIX):
        if position == len(pattern):
            return False  # the pattern ends first: it matches only shorter names
        if pattern[position] in b"*?[\\":
            return True  # a wildcard, a set or an escape: assume the worst
        if pattern[position] != expected:
            return False
    return True
