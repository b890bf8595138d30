"""The WebSocket opening handshake (RFC 6455 4.2) of the plain requests clients send.

Autobahn's handshake is general: any HTTP head, Hixie and Hybi versions,
extensions, proxies, user callbacks returning futures. Most of what it costs
is that generality, and a WebSocket connection is opened for every client.
:func:`read_upgrade` reads the one request almost every client sends (``GET``
on HTTP/1.1, one of each header, ``Sec-WebSocket-Version: 13``, no extensions
offered) and :func:`accept_response` writes the answer Autobahn would write.

Anything else, valid or not, is not judged here: :func:`read_upgrade` returns
None and the connection goes to Autobahn's handshake, which accepts or refuses
it exactly as it always has (400, 426 with the versions it speaks, 503 at
``maxConnections``). So this module only ever takes requests Autobahn would
accept, and every refusal stays Autobahn's.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

__all__ = ["Upgrade", "accept_response", "read_upgrade"]

#: RFC 6455 1.3: appended to the client's key before hashing.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


@dataclass(slots=True)
class Upgrade:
    """A plain WebSocket upgrade request, read as Autobahn reads it."""

    #: The request line (``GET /path?query HTTP/1.1``).
    line: str
    #: The request target, its path and its query parameters (``parse_qs``).
    target: str
    path: str
    params: dict[str, list[str]]
    #: The ``Host`` header without its port.
    host: str
    #: Every header by lower-case name, values stripped.
    headers: dict[str, str]
    #: The ``Origin`` header, "" without one.
    origin: str
    #: The subprotocols offered, in the client's order.
    protocols: list[str]
    key: str
    #: The extensions offered, as Autobahn parses them: only the plain
    #: permessage-deflate offers browsers send, which a server with
    #: compression off declines without a word.
    extensions: list[tuple[str, dict[str, list[Any]]]]


#: The Sec-WebSocket-Extensions values browsers and common clients send (none,
#: Firefox and Safari, Chrome and Node's ws), with what Autobahn parses from them.
_BROWSER_OFFERS: dict[str, list[tuple[str, dict[str, list[Any]]]]] = {
    "": [],
    "permessage-deflate": [("permessage-deflate", {})],
    "permessage-deflate; client_max_window_bits": [
        ("permessage-deflate", {"client_max_window_bits": [True]})
    ],
}


def _has_token(value: str, token: str) -> bool:
    """Whether a comma-separated header value lists ``token`` (lower case)."""
    value = value.lower()
    return value == token or any(part.strip() == token for part in value.split(","))


def read_upgrade(head: bytes) -> Upgrade | None:
    """The upgrade request in ``head`` (without the blank line that ends it), if
    it is a plain one that Autobahn would accept; None for anything else."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    # Autobahn splits at any line boundary (a bare LF, VT, FF, ...); a head
    # with one of those in a line is left to it.
    if len(text.splitlines()) != len(lines):
        return None
    line = lines[0]
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != "GET" or parts[2] != "HTTP/1.1":
        return None
    target = parts[1]
    # No other whitespace (Autobahn splits the line at any), and nothing that
    # urlparse would read otherwise: a netloc, ";params", a fragment.
    if (
        target[:1] != "/"
        or target[:2] == "//"
        or not target.isprintable()
        or ";" in target
        or "#" in target
    ):
        return None
    headers: dict[str, str] = {}
    for field in lines[1:]:
        name, colon, value = field.partition(":")
        name = name.strip().lower()
        # Autobahn skips a line without a name, and joins or refuses repeats.
        if not colon or not name or name in headers:
            return None
        headers[name] = value.strip()
    get = headers.get
    host = get("host")
    key = get("sec-websocket-key", "")
    if (
        host is None
        or get("sec-websocket-version") != "13"
        or get("sec-websocket-extensions", "") not in _BROWSER_OFFERS
        or not _has_token(get("upgrade", ""), "websocket")
        or not _has_token(get("connection", ""), "upgrade")
        or len(key) != 24
        or key[22:] != "=="
        or not _BASE64.issuperset(key[:22])
    ):
        return None
    if ":" in host and not host.endswith("]"):
        host, port = host.rsplit(":", 1)
        try:
            int(port)
        except ValueError:
            return None
    protocols: list[str] = []
    offered = get("sec-websocket-protocol")
    if offered is not None:
        protocols = [name.strip() for name in offered.split(",")]
        if len(set(protocols)) != len(protocols):
            return None
    path, _, query = target.partition("?")
    return Upgrade(
        line=line,
        target=target,
        path=path,
        params=parse_qs(query) if query else {},
        host=host,
        headers=headers,
        origin=get("origin", ""),
        protocols=protocols,
        key=key,
        extensions=_BROWSER_OFFERS[get("sec-websocket-extensions", "")],
    )


def accept_response(key: str, protocol: str | None, server: str | None) -> bytes:
    """The ``101 Switching Protocols`` answer, header for header as Autobahn
    writes it: ``server`` is its ``Server`` header, ``protocol`` the chosen one."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()
    return _response_head(protocol, server) + base64.b64encode(digest) + b"\r\n\r\n"


@functools.lru_cache(maxsize=8)
def _response_head(protocol: str | None, server: str | None) -> bytes:
    """Everything in the 101 answer before the accept key's value (the same
    for every connection of a server that chose the same subprotocol)."""
    lines = ["HTTP/1.1 101 Switching Protocols"]
    if server:
        lines.append(f"Server: {server}")
    lines += ["Upgrade: WebSocket", "Connection: Upgrade"]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    lines.append("Sec-WebSocket-Accept: ")
    return "\r\n".join(lines).encode("utf-8")
