"""The JSON wire format of docs/protocol.md: text frames to commands, results to frames.

A command frame is one JSON array: the command name, then its arguments, all
strings; where a command takes a message payload (see ``Command.payload_index``)
the argument may instead be ``{"base64": "..."}`` to carry any bytes.  Strings
become UTF-8 bytes, so the engine sees exactly what a Redis client would send.

Going out, every byte string (channel, pattern, payload) becomes a JSON string
when it is valid UTF-8 and ``{"base64": "..."}`` otherwise, so no byte is lost.

Pure functions over bytes: no Twisted, no Autobahn.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import orjson

from pubsub.core.commands import Confirm, Error, Frame, Pong, Reply, Result, lookup
from pubsub.core.history import Position
from pubsub.core.wire import wire_value

__all__ = [
    "ProtocolError",
    "decode_command",
    "encode_result",
    "message_frame",
    "pmessage_frame",
    "positioned_message_frame",
    "smessage_frame",
    "wire_value",
]

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ProtocolError(ValueError):
    """A frame that is not a well-formed command; ``str(error)`` is the reply text."""


def _argument(value: Any, position: int, payload_index: int | None) -> bytes:
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(
                f"ERR Protocol error: argument {position} is not valid Unicode text"
            ) from None
    if position == payload_index and isinstance(value, dict):
        encoded = value.get("base64")
        if len(value) == 1 and isinstance(encoded, str):
            try:
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError(
                    f"ERR Protocol error: argument {position} is not valid base64"
                ) from None
    what = 'a string or {"base64": ...}' if position == payload_index else "a string"
    raise ProtocolError(f"ERR Protocol error: argument {position} must be {what}")


def decode_command(frame: bytes | str) -> list[bytes]:
    """Parse one text frame into the command's arguments, name first."""
    try:
        # orjson reads JSON as the json module does, in C. What it
        # refuses (lone surrogates, NaN, Infinity, nesting past 1,024) the
        # json module judges, as it always has; the numbers it reads
        # otherwise (integers past 64 bits) are refused as arguments anyway.
        value = orjson.loads(frame)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(frame)
        except (ValueError, RecursionError):
            raise ProtocolError("ERR Protocol error: the frame is not valid JSON") from None
    if not isinstance(value, list) or not value:
        raise ProtocolError("ERR Protocol error: a command is a non-empty JSON array of strings")
    if not isinstance(value[0], str):
        raise ProtocolError("ERR Protocol error: the command name must be a string")
    name = _argument(value[0], 0, None)
    command = lookup(name)
    payload_index = command.payload_index if command is not None else None
    return [name] + [
        _argument(item, position, payload_index) for position, item in enumerate(value[1:], start=1)
    ]


def _wire_deep(item: Any) -> Any:
    """``item`` with every bytes in it, however deep, as the wire writes bytes."""
    if isinstance(item, bytes):
        return wire_value(item)
    if isinstance(item, list):
        return [_wire_deep(value) for value in item]
    if isinstance(item, dict):
        return {key: _wire_deep(value) for key, value in item.items()}
    return item


def _frame(value: list[Any]) -> bytes:
    try:
        # orjson writes what _dumps writes (compact, UTF-8), in C.
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # Error texts may hold undecodable bytes as lone surrogates, which
        # orjson refuses; they become "?".
        return _dumps(value).encode("utf-8", "replace")


def encode_result(result: Result) -> bytes:
    """One command result as one text frame."""
    if isinstance(result, Confirm):
        return _frame([result.verb, wire_value(result.name), result.count])
    if isinstance(result, Reply):
        value = result.value
        if type(value) is int:  # PUBLISH's count: the reply sent most
            return b'["reply",%d]' % value
        if isinstance(value, list):
            value = _wire_deep(value)
        elif isinstance(value, bytes):  # AUTH's OK, say
            value = wire_value(value)
        return _frame(["reply", value])
    if isinstance(result, Pong):
        return _frame(["pong", wire_value(result.payload) if result.payload is not None else ""])
    if isinstance(result, Error):
        return _frame(["error", result.message])
    if isinstance(result, Frame):
        return _frame([result.kind, *(_wire_deep(field) for field in result.fields)])
    raise TypeError(f"not a command result: {result!r}")


def message_frame(channel: bytes, payload: bytes) -> bytes:
    return _frame(["message", wire_value(channel), wire_value(payload)])


def positioned_message_frame(channel: bytes, payload: bytes, position: Position) -> bytes:
    """A ``message`` with its place in the channel's history, for the
    clients that asked for positions (docs/protocol.md, Recovery)."""
    where = {"epoch": position.epoch, "offset": position.offset}
    return _frame(["message", wire_value(channel), wire_value(payload), where])


def pmessage_frame(pattern: bytes, channel: bytes, payload: bytes) -> bytes:
    return _frame(["pmessage", wire_value(pattern), wire_value(channel), wire_value(payload)])


def smessage_frame(channel: bytes, payload: bytes) -> bytes:
    return _frame(["smessage", wire_value(channel), wire_value(payload)])
