"""The connection commands only RESP has, on top of the shared command table.

HELLO, RESET, QUIT, ECHO, SELECT, INFO and CLIENT, with Redis 7's arities,
replies and error texts (AUTH is the shared table's).  Each handler gets the
client's :class:`RespSession`, which is the command layer's
:class:`~pubsub.core.commands.Session` plus the connection it belongs to:
HELLO and RESET change the connection's protocol version and names, QUIT
closes it once the reply is sent.  :data:`RESP_COMMANDS` is what the RESP
protocol resolves a request against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING

from pubsub.core.commands import (
    COMMANDS,
    Command,
    Error,
    Reply,
    Result,
    Status,
    Verbatim,
    authenticate,
    help_reply,
)
from pubsub.hosting.port import HostedSession
from pubsub.resp.reader import redis_int

if TYPE_CHECKING:  # the protocol imports this module; the session only names it
    from pubsub.resp.protocol import RespProtocol

__all__ = ["REDIS_VERSION", "RESP_COMMANDS", "RespSession"]

#: The Redis release whose Pub/Sub behaviour this server reproduces.  HELLO
#: and INFO report it, since client libraries choose features by it.
REDIS_VERSION = "7.0.15"


class RespSession(HostedSession):
    """A RESP client's session: the command layer's, plus its connection."""

    __slots__ = ()
    connection: RespProtocol


def _valid_attribute(value: bytes) -> bool:
    """Redis's rule for client names and library attributes: printable, no spaces."""
    return all(0x21 <= c <= 0x7E for c in value)


_BAD_NAME = Error("ERR Client names cannot contain spaces, newlines or special characters.")


def _hello(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    connection = session.connection
    version = 3 if connection.resp3 else 2
    name: bytes | None = None
    if len(args) >= 2:
        parsed = redis_int(args[1])
        if parsed is None:
            return [Error("ERR Protocol version is not an integer or out of range")]
        version = parsed
        if version not in (2, 3):
            return [Error("NOPROTO unsupported protocol version")]
    position = 2
    while position < len(args):
        option = args[position].lower()
        more = len(args) - 1 - position
        if option == b"auth" and more >= 2:
            error = authenticate(session, args[position + 1], args[position + 2])
            if error:
                return [error]
            position += 3
        elif option == b"setname" and more >= 1:
            name = args[position + 1]
            if not _valid_attribute(name):
                return [_BAD_NAME]
            position += 2
        else:
            option_text = args[position].decode("utf-8", "surrogateescape")
            return [Error(f"ERR Syntax error in HELLO option '{option_text}'")]
    guard = session.guard
    if guard is not None and not guard.authenticated:
        return [
            Error(
                "NOAUTH HELLO must be called with the client already authenticated, "
                "otherwise the HELLO <proto> AUTH <user> <pass> option can be used to "
                "authenticate the client and select the RESP protocol version at the same time"
            )
        ]
    if name is not None:
        connection.name = name or None
    connection.use_resp(version)
    return [
        Reply(
            {
                b"server": b"pubsub",
                b"version": REDIS_VERSION.encode(),
                b"proto": version,
                b"id": session.client_id,
                b"mode": b"standalone",
                b"role": b"master",
                b"modules": [],
            }
        )
    ]


def _reset(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    engine, client_id = session.engine, session.client_id
    engine.unsubscribe(client_id)  # silently, as Redis does on RESET
    engine.punsubscribe(client_id)
    engine.sunsubscribe(client_id)
    connection = session.connection
    connection.name = connection.lib_name = connection.lib_ver = None
    connection.use_resp(2)
    if session.guard is not None:
        session.guard.logout()  # back to the default user, as Redis's RESET
    return [Reply(Status(b"RESET"))]


def _quit(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    session.connection.quitting = True
    return [Reply(Status(b"OK"))]


def _echo(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    return [Reply(args[1])]


def _select(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    # Pub/Sub ignores databases in Redis too; clients select one on connect.
    index = redis_int(args[1])
    if index is None or not -(2**31) <= index < 2**31:
        return [Error("ERR value is not an integer or out of range")]
    if not 0 <= index < 16:
        return [Error("ERR DB index is out of range")]
    return [Reply(Status(b"OK"))]


def _client_id(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    return [Reply(session.client_id)]


def _client_setname(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    if not _valid_attribute(args[2]):
        return [_BAD_NAME]
    session.connection.name = args[2] or None
    return [Reply(Status(b"OK"))]


def _client_getname(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    return [Reply(session.connection.name)]


def _client_setinfo(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    attribute = args[2].lower()
    if attribute not in (b"lib-name", b"lib-ver"):
        text = args[2].decode("utf-8", "surrogateescape")
        return [Error(f"ERR Unrecognized option '{text}'")]
    if not _valid_attribute(args[3]):
        text = attribute.decode("ascii")
        return [Error(f"ERR {text} cannot contain spaces, newlines or special characters.")]
    setattr(session.connection, attribute.decode("ascii").replace("-", "_"), args[3] or None)
    return [Reply(Status(b"OK"))]


_client_help = help_reply(
    b"CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    b"GETNAME",
    b"    Return the name of the current connection.",
    b"ID",
    b"    Return the ID of the current connection.",
    b"SETINFO <option> <value>",
    b"    Set client meta attr. Options are:",
    b"    * LIB-NAME: the client lib name.",
    b"    * LIB-VER: the client lib version.",
    b"SETNAME <name>",
    b"    Assign the name <name> to the current connection.",
    b"HELP",
    b"    Prints this help.",
)


def _version() -> str:
    try:
        return metadata.version("pubsub")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def _info(session: RespSession, args: Sequence[bytes]) -> list[Result]:
    factory = session.connection.factory
    engine = session.engine
    sections: dict[str, list[tuple[str, str | int]]] = {
        "server": [
            ("redis_version", REDIS_VERSION),
            ("pubsub_version", _version()),
            ("redis_mode", "standalone"),
            ("process_id", os.getpid()),
            ("uptime_in_seconds", int(factory.reactor.seconds() - factory.started)),
        ],
        "clients": [("connected_clients", engine.client_count)],
        "stats": [
            ("pubsub_channels", engine.channel_count),
            ("pubsub_patterns", engine.numpat()),
            ("pubsubshard_channels", engine.shard_channel_count),
            ("client_output_buffer_limit_disconnections", factory.slow_consumers),
        ],
    }
    wanted = {arg.decode("latin-1").lower() for arg in args[1:]}
    if not wanted or wanted & {"default", "all", "everything"}:
        wanted = set(sections)
    text = "\r\n".join(
        f"# {name.capitalize()}\r\n" + "".join(f"{key}:{value}\r\n" for key, value in fields)
        for name, fields in sections.items()
        if name in wanted
    )
    return [Reply(Verbatim(text.encode("ascii")))]


def _table(*commands: Command) -> dict[str, Command]:
    return {command.name: command for command in commands}


_CLIENT_SUBCOMMANDS = _table(
    Command("id", 2, _client_id),
    Command("setname", 3, _client_setname),
    Command("getname", 2, _client_getname),
    Command("setinfo", 4, _client_setinfo),
    Command("help", 2, _client_help),
)

#: The shared command table plus the connection commands of RESP.
RESP_COMMANDS: dict[str, Command] = {
    **COMMANDS,
    **_table(
        Command("hello", -1, _hello),
        Command("reset", 1, _reset),
        Command("quit", -1, _quit),
        Command("echo", 2, _echo),
        Command("select", 2, _select),
        Command("info", -1, _info),
        Command("client", -2, None, subcommands=_CLIENT_SUBCOMMANDS),
    ),
}
