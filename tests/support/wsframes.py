"""Build client WebSocket frames and parse server frames, for StringTransport tests."""

from __future__ import annotations

import base64
import json
import os
import struct

HANDSHAKE_KEY = base64.b64encode(b"0123456789abcdef").decode("ascii")

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def handshake(path: str = "/", protocols: list[str] | None = None, extra: str = "") -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1:9000",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {HANDSHAKE_KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("ascii")


def client_frame(payload: bytes, opcode: int = TEXT, fin: bool = True) -> bytes:
    """One masked client-to-server frame."""
    mask = os.urandom(4)
    header = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        header += bytes([0x80 | size])
    elif size < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def command(*args: object) -> bytes:
    return client_frame(json.dumps(list(args)).encode("utf-8"))


def split_response(data: bytes) -> tuple[bytes, bytes]:
    """The HTTP handshake response and the frame bytes after it."""
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames as (opcode, payload); the data must hold whole frames."""
    frames = []
    while data:
        opcode = data[0] & 0x0F
        size = data[1] & 0x7F
        offset = 2
        if size == 126:
            (size,) = struct.unpack("!H", data[2:4])
            offset = 4
        elif size == 127:
            (size,) = struct.unpack("!Q", data[2:10])
            offset = 10
        frames.append((opcode, data[offset : offset + size]))
        data = data[offset + size :]
    return frames


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0]
