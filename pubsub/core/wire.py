"""Bytes as docs/protocol.md writes them in JSON: text when UTF-8, else base64.

The WebSocket protocol's frames and the ``middleware_url`` documents carry
channel names, patterns and payloads this way, so that no byte is lost.
"""

from __future__ import annotations

import base64
from typing import Any

__all__ = ["wire_value"]


def wire_value(data: bytes | None) -> Any:
    """``data`` as a JSON value: a string when UTF-8, else ``{"base64": ...}``."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}
