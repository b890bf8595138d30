"""The command table every transport shares: names, arities, handlers, limits.

A transport decodes a request into a list of byte strings (the command name
first, exactly as Redis receives it), calls :func:`execute` with the client's
:class:`Session`, and encodes the results it gets back.  Results are
transport-neutral: :class:`Confirm` for (un)subscribe confirmations,
:class:`Reply` for a command's value, :class:`Pong` and :class:`Error`.

Validation follows Redis 7 word for word (arity errors, unknown commands and
subcommands), then this server's own limits, which Redis does not have:
subscriptions per client and the length of a channel name or pattern.  Nothing
here knows about sockets or frames.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from pubsub.core.engine import Engine, Kind

__all__ = [
    "COMMANDS",
    "AuthError",
    "Command",
    "Confirm",
    "Error",
    "Frame",
    "Limits",
    "Pong",
    "Reply",
    "ReplyValue",
    "Result",
    "Session",
    "Status",
    "Verbatim",
    "authenticate",
    "error_kind",
    "execute",
    "help_reply",
    "refused",
    "resolve",
]


class AuthError(Exception):
    """A token that cannot be used; the text says why, for the client.

    Declared here, where AUTH turns it into an error reply, so that this
    layer needs nothing of the token policy that raises it
    (:mod:`pubsub.policy.auth`).
    """


@dataclass(frozen=True)
class Confirm:
    """An (un)subscribe confirmation: ``verb`` is the command's, e.g. "subscribe"."""

    verb: str
    name: bytes | None
    count: int


#: What a :class:`Reply` carries: HELLO's map holds a list, so the type nests.
ReplyValue: TypeAlias = "int | bytes | list[ReplyValue] | dict[bytes, ReplyValue] | None"


@dataclass(frozen=True)
class Reply:
    """A command's value: None, an integer, bytes, or a list or dict of these.

    Bytes are binary-safe strings, unless they are a :class:`Status` or
    :class:`Verbatim`; transports without those kinds send them as strings.
    """

    value: ReplyValue


class Status(bytes):
    """A short status text (RESP's ``+OK``), never binary and never a line break."""


class Verbatim(bytes):
    """A text meant for a person, such as INFO's (RESP3's verbatim string)."""


@dataclass(frozen=True)
class Pong:
    """PING's answer; ``payload`` is None when PING had no argument."""

    payload: bytes | None


@dataclass(frozen=True)
class Error:
    """A command that could not run; ``message`` starts with a Redis error code."""

    message: str


@dataclass(frozen=True)
class Frame:
    """A frame of one of this server's own extensions, as ``[kind, *fields]``
    (the JSON protocol's recovery frames: docs/protocol.md).  Fields are
    bytes (sent as text or base64, as payloads are), ints, strings, None,
    and lists or dicts of these.  No RESP command answers with one.
    """

    kind: str
    fields: tuple[Any, ...]


Result = Confirm | Reply | Pong | Error | Frame

_ERROR_KINDS = (
    ("Protocol error", "protocol"),
    ("ERR unknown command", "unknown_command"),
    ("ERR unknown subcommand", "unknown_command"),
    ("wrong number of arguments", "wrong_arity"),
    ("Can't execute", "subscribed_mode"),
    ("limit", "limit"),
    ("max number of clients", "limit"),
    ("WRONGPASS", "auth"),
    ("NOPERM", "auth"),
    ("NOAUTH", "auth"),
    ("BACKPLANE", "backplane"),
    ("the server's middleware", "middleware"),
)


def error_kind(message: str) -> str:
    """What an error reply was about, for the metrics: protocol,
    unknown_command, wrong_arity, subscribed_mode, limit, auth, backplane,
    middleware (one that failed or did not answer in time) or other."""
    for marker, kind in _ERROR_KINDS:
        if marker in message:
            return kind
    return "other"


@dataclass(frozen=True)
class Limits:
    """Per-client limits the command layer enforces (0 means unlimited)."""

    max_subscriptions: int = 10_000
    max_name_length: int = 4096

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """The matching fields of :class:`pubsub.operations.config.Settings`."""
        return cls(settings.max_subscriptions, settings.max_name_length)


class Session:
    """One client's view of the engine: its client id, the limits it runs
    under, and its :class:`pubsub.policy.auth.Guard` when tokens are in use (else None)."""

    __slots__ = ("client_id", "engine", "guard", "limits")

    def __init__(
        self,
        engine: Engine,
        client_id: int,
        limits: Limits = Limits(),
        guard: Any = None,
    ) -> None:
        self.engine = engine
        self.client_id = client_id
        self.limits = limits
        self.guard = guard


#: A command's handler: the session (a :class:`Session`, or a transport's
#: richer one for its own commands) and the arguments, to the results.
Handler = Callable[[Any, Sequence[bytes]], list[Result]]


@dataclass(frozen=True)
class Command:
    """One table entry.  ``arity`` follows Redis: N exact, -N at least N.

    ``payload_index`` is the argument position that carries a message payload
    (transports may accept binary forms there), or None.  A command with
    ``subcommands`` has its second argument looked up there, and the
    subcommand's arity checked, before the handler runs.
    """

    name: str
    arity: int
    handler: Handler | None  # None for a container of subcommands
    payload_index: int | None = None
    subcommands: dict[str, Command] | None = None


def _text(data: bytes) -> str:
    """Bytes in an error message: lossless, and never a line break (as Redis)."""
    return data.decode("utf-8", "surrogateescape").replace("\r", " ").replace("\n", " ")


def _quoted(data: bytes, limit: int = 128) -> bytes:
    """What Redis's ``%.128s`` prints: a C string, so up to a NUL, at most ``limit`` bytes."""
    return data.split(b"\0", 1)[0][:limit]


def _arity_ok(arity: int, argc: int) -> bool:
    return argc == arity if arity >= 0 else argc >= -arity


def _wrong_arity(name: str) -> Error:
    return Error(f"ERR wrong number of arguments for '{name}' command")


def _unknown_command(args: Sequence[bytes]) -> Error:
    # Redis quotes the arguments until the list reaches 128 bytes.
    quoted = b""
    for arg in args[1:]:
        if len(quoted) >= 128:
            break
        quoted += b"'" + _quoted(arg, 128 - len(quoted)) + b"' "
    return Error(
        f"ERR unknown command '{_text(_quoted(args[0]))}', "
        f"with args beginning with: {_text(quoted)}"
    )


def _name_too_long(session: Session, names: Sequence[bytes], what: str) -> Error | None:
    limit = session.limits.max_name_length
    if limit and any(len(name) > limit for name in names):
        return Error(f"ERR {what} is longer than the limit of {limit} bytes")
    return None


def _subscription_limit(session: Session, kind: Kind, names: Sequence[bytes]) -> Error | None:
    limit = session.limits.max_subscriptions
    if not limit:
        return None
    engine, client_id = session.engine, session.client_id
    wanted = engine.subscription_count(client_id) + engine.new_subscriptions(client_id, kind, names)
    if wanted > limit:
        return Error(
            f"ERR subscription limit reached: a client may hold at most {limit} "
            "channels, patterns and shard channels"
        )
    return None


def _subscriber(kind: Kind) -> Handler:
    """SUBSCRIBE, PSUBSCRIBE and SSUBSCRIBE: checked, then all or nothing."""
    verb, noun = kind.subscribe, kind.noun

    def handler(session: Session, args: Sequence[bytes]) -> list[Result]:
        names = args[1:]
        error = _name_too_long(session, names, noun) or _subscription_limit(session, kind, names)
        if error:
            return [error]
        confirmations = getattr(session.engine, verb)(session.client_id, names)
        return [Confirm(verb, name, count) for name, count in confirmations]

    return handler


def _unsubscriber(kind: Kind) -> Handler:
    """UNSUBSCRIBE, PUNSUBSCRIBE and SUNSUBSCRIBE: the names given, or all held."""
    verb = kind.unsubscribe

    def handler(session: Session, args: Sequence[bytes]) -> list[Result]:
        confirmations = getattr(session.engine, verb)(session.client_id, args[1:])
        return [Confirm(verb, name, count) for name, count in confirmations]

    return handler


def _publisher(method_name: str, what: str) -> Handler:
    def handler(session: Session, args: Sequence[bytes]) -> list[Result]:
        error = _name_too_long(session, args[1:2], what)
        if error:
            return [error]
        engine = session.engine
        receivers = getattr(engine, method_name)(args[1], args[2])
        # When a backplane could not carry the publish on (down, behind) it
        # reached this node only: say so instead of a count that looks like success.
        refusal = engine.relay.refusal(receivers) if engine.relay is not None else None
        return [Error(refusal) if refusal else Reply(receivers)]

    return handler


def _ping(session: Session, args: Sequence[bytes]) -> list[Result]:
    if len(args) > 2:
        return [_wrong_arity("ping")]
    return [Pong(args[1] if len(args) == 2 else None)]


def _list_names(method_name: str) -> Handler:
    """PUBSUB CHANNELS / SHARDCHANNELS [pattern]."""

    def handler(session: Session, args: Sequence[bytes]) -> list[Result]:
        if len(args) > 3:
            return [
                Error(
                    "ERR unknown subcommand or wrong number of arguments for "
                    f"'{_text(_quoted(args[1]))}'. Try PUBSUB HELP."
                )
            ]
        pattern = args[2] if len(args) == 3 else None
        if pattern is not None:
            error = _name_too_long(session, [pattern], Kind.PATTERN.noun)
            if error:
                return [error]
        return [Reply(getattr(session.engine, method_name)(pattern))]

    return handler


def _count_subscribers(method_name: str) -> Handler:
    """PUBSUB NUMSUB / SHARDNUMSUB: a flat [name, count, ...] list."""

    def handler(session: Session, args: Sequence[bytes]) -> list[Result]:
        flat: list[ReplyValue] = []
        for name, count in getattr(session.engine, method_name)(args[2:]):
            flat += (name, count)
        return [Reply(flat)]

    return handler


def _numpat(session: Session, args: Sequence[bytes]) -> list[Result]:
    return [Reply(session.engine.numpat())]


def authenticate(session: Session, username: bytes | None, token: bytes) -> Error | None:
    """AUTH's work, shared with RESP's HELLO: None when the client is now
    authenticated, else the error to send."""
    guard = session.guard
    if guard is None:
        # No tokens in use: Redis's default user with nopass, for whom any
        # password is right, and no other user exists.
        if username in (None, b"default"):
            return None
        return Error("WRONGPASS invalid username-password pair or user is disabled.")
    try:
        guard.login(token, username, session)
    except AuthError as error:
        return Error(f"WRONGPASS {error}")
    return None


def _auth(session: Session, args: Sequence[bytes]) -> list[Result]:
    if len(args) > 3:
        return [Error("ERR syntax error")]
    if len(args) == 2 and session.guard is None:
        return [
            Error(
                "ERR AUTH <password> called without any password configured for the "
                "default user. Are you sure your configuration is correct?"
            )
        ]
    username = args[1] if len(args) == 3 else None
    return [authenticate(session, username, args[-1]) or Reply(Status(b"OK"))]


def help_reply(*lines: bytes) -> Handler:
    """A HELP command's handler: its lines as status texts, as Redis sends them."""
    reply = Reply([Status(line) for line in lines])

    def handler(session: Any, args: Sequence[bytes]) -> list[Result]:
        return [reply]

    return handler


# Redis's own PUBSUB HELP reply, line for line: clients may show or compare it.
_pubsub_help = help_reply(
    b"PUBSUB <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    b"CHANNELS [<pattern>]",
    b"    Return the currently active channels matching a <pattern> (default: '*').",
    b"NUMPAT",
    b"    Return number of subscriptions to patterns.",
    b"NUMSUB [<channel> ...]",
    b"    Return the number of subscribers for the specified channels, excluding",
    b"    pattern subscriptions(default: no channels).",
    b"SHARDCHANNELS [<pattern>]",
    b"    Return the currently active shard level channels matching a <pattern> (default: '*').",
    b"SHARDNUMSUB [<shardchannel> ...]",
    b"    Return the number of subscribers for the specified shard level channel(s)",
    b"HELP",
    b"    Prints this help.",
)


def _table(*commands: Command) -> dict[str, Command]:
    return {command.name.lower(): command for command in commands}


_PUBSUB_SUBCOMMANDS = _table(
    Command("channels", -2, _list_names("channels")),
    Command("numsub", -2, _count_subscribers("numsub")),
    Command("numpat", 2, _numpat),
    Command("shardchannels", -2, _list_names("shard_channels")),
    Command("shardnumsub", -2, _count_subscribers("shard_numsub")),
    Command("help", 2, _pubsub_help),
)


COMMANDS: dict[str, Command] = _table(
    Command("subscribe", -2, _subscriber(Kind.CHANNEL)),
    Command("unsubscribe", -1, _unsubscriber(Kind.CHANNEL)),
    Command("psubscribe", -2, _subscriber(Kind.PATTERN)),
    Command("punsubscribe", -1, _unsubscriber(Kind.PATTERN)),
    Command("ssubscribe", -2, _subscriber(Kind.SHARD)),
    Command("sunsubscribe", -1, _unsubscriber(Kind.SHARD)),
    Command("publish", 3, _publisher("publish", Kind.CHANNEL.noun), payload_index=2),
    Command("spublish", 3, _publisher("spublish", Kind.SHARD.noun), payload_index=2),
    Command("pubsub", -2, None, subcommands=_PUBSUB_SUBCOMMANDS),
    Command("ping", -1, _ping),
    Command("auth", -2, _auth),
)


def lookup(name: bytes, table: Mapping[str, Command] = COMMANDS) -> Command | None:
    """The table entry for a command name given in any case, or None."""
    return table.get(name.lower().decode("latin-1"))


def resolve(args: Sequence[bytes], table: Mapping[str, Command] = COMMANDS) -> Command | Error:
    """The entry that runs ``args`` (a subcommand's for a container command).

    Checks what Redis checks before anything else: that the command and
    subcommand exist and the arity fits.  A subcommand's entry comes back
    with its full name, as Redis spells it in errors ("pubsub|channels").
    """
    command = lookup(args[0], table)
    if command is None:
        return _unknown_command(args)
    if not _arity_ok(command.arity, len(args)):
        return _wrong_arity(command.name)
    if command.subcommands is None:
        return command
    sub = command.subcommands.get(args[1].lower().decode("latin-1"))
    if sub is None:
        return Error(
            f"ERR unknown subcommand '{_text(_quoted(args[1]))}'. Try {command.name.upper()} HELP."
        )
    full_name = f"{command.name}|{sub.name}"
    if not _arity_ok(sub.arity, len(args)):
        return _wrong_arity(full_name)
    return Command(full_name, sub.arity, sub.handler, sub.payload_index)


def execute(
    session: Any, args: Sequence[bytes], table: Mapping[str, Command] = COMMANDS
) -> list[Result]:
    """Run one command (``args[0]`` is its name); returns its results in order.

    ``session`` is a :class:`Session`, or a transport's richer one for the
    commands of its own ``table``.
    """
    command = resolve(args, table)
    if isinstance(command, Error):
        return [command]
    refusal = refused(session, command)
    if refusal is not None:
        return [refusal]
    assert command.handler is not None
    return command.handler(session, args)


def refused(session: Any, command: Command) -> Error | None:
    """``NOAUTH`` for a resolved command a client that must authenticate
    first may not run yet, else None: Redis checks it after the command's
    name and arity, before anything else (its ACLs next, where a port's
    middlewares decide: :mod:`pubsub.policy.middleware`)."""
    guard = session.guard
    if guard is None or guard.authenticated:
        return None  # no tokens in use, or logged in: nothing more to pay per command
    refusal = guard.check(command.name.partition("|")[0])
    return None if refusal is None else Error(refusal)
