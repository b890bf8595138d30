"""Outgoing WebSocket frames: built here once, written to every receiver.

A server frame is never masked, so the same bytes serve every connection:
:class:`JsonFrames` is the engine's encoder for a WebSocket port, and a
delivery is framed once per publish, not once per receiver.  With
permessage-deflate each compression group (window size and memory level)
has a framer of its own, which deflates a message once for the whole group;
:class:`DeflateAccept` makes that possible by always negotiating
``server_no_context_takeover``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from autobahn.websocket.compress import PerMessageDeflateOfferAccept

from pubsub.core.history import Position
from pubsub.websocket import json_codec

__all__ = [
    "DeflateAccept",
    "Framer",
    "JsonFrames",
    "close_reason",
    "deflating_framer",
    "text_frame",
]

#: Turns a JSON text into the bytes of the frame that carries it.
Framer = Callable[[bytes], bytes]


class JsonFrames:
    """An engine encoder: each delivery as JSON, turned into a frame by ``framer``.

    With ``positions``, the messages of channels with a history carry their
    position (for the connections that used RESUME); without, they are
    the plain ``message`` frames.
    """

    def __init__(self, framer: Framer, positions: bool = False) -> None:
        self._frame = framer
        self.positions = positions

    def message(self, channel: bytes, payload: bytes) -> bytes:
        return self._frame(json_codec.message_frame(channel, payload))

    def message_at(self, channel: bytes, payload: bytes, position: Position) -> bytes:
        if self.positions:
            return self._frame(json_codec.positioned_message_frame(channel, payload, position))
        return self.message(channel, payload)

    def pmessage(self, pattern: bytes, channel: bytes, payload: bytes) -> bytes:
        return self._frame(json_codec.pmessage_frame(pattern, channel, payload))

    def smessage(self, channel: bytes, payload: bytes) -> bytes:
        return self._frame(json_codec.smessage_frame(channel, payload))


def text_frame(payload: bytes) -> bytes:
    """A whole, uncompressed server text frame."""
    return _frame_header(0x81, len(payload)) + payload


def _frame_header(first: int, size: int) -> bytes:
    """An unmasked (server) frame header: FIN/RSV/opcode byte, then the length."""
    if size <= 125:
        return struct.pack("!BB", first, size)
    if size <= 0xFFFF:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


def close_reason(text: str) -> str:
    """``text`` cut to fit a close frame: at most 123 bytes of UTF-8."""
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


def deflating_framer(window_bits: int, mem_level: int, min_size: int) -> Framer:
    """Frame for one compression group: deflate payloads of ``min_size`` bytes or
    more, into a frame with RSV1 set; smaller ones go out as plain text frames."""

    def frame(payload: bytes) -> bytes:
        if len(payload) < min_size:
            return text_frame(payload)
        compressor = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window_bits, mem_level
        )
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        # RFC 7692: drop the 00 00 ff ff tail of the sync flush.
        return _frame_header(0xC1, len(data) - 4) + data[:-4]

    return frame


class DeflateAccept(PerMessageDeflateOfferAccept):
    """Accepts permessage-deflate and always says ``server_no_context_takeover``.

    Autobahn announces that parameter only when the client asked for it; RFC
    7692 (7.1.1.1) lets the server say it anyway, and saying it lets every
    client drop its inflate history between messages too.
    """

    def get_extension_string(self) -> str:
        extension: str = super().get_extension_string()
        if self.no_context_takeover and not self.offer.request_no_context_takeover:
            name = self.EXTENSION_NAME
            extension = name + "; server_no_context_takeover" + extension[len(name) :]
        return extension
