"""``pubsub-cli``: subscribe, publish and look at a pubsub server from a shell.

Built on the asyncio client (``pubsub.client.asyncio``). Every output line is
either for a person or, with ``--json``, one JSON object. Errors are one line
on stderr and exit status 1; Ctrl-C ends ``sub``/``psub`` with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from typing import Any, TextIO

from pubsub.client import CONNECTED, DISCONNECTED, Message, Recovery, RecoveryFailed, ReplyError
from pubsub.client._core import Position
from pubsub.client.asyncio import PubSubClient, connect

__all__ = ["main"]

PROG = "pubsub-cli"
DEFAULT_URL = "ws://127.0.0.1:9000/"

_DESCRIPTION = "Subscribe to, publish on and inspect a pubsub server over WebSocket."
_SUB_HELP = (
    "Print every message until interrupted (Ctrl-C exits 0) or until --count "
    "messages. When the connection drops, the client reconnects with growing, "
    "jittered delays and subscribes again, saying so on stderr; messages "
    "published while it was away are lost, as in Redis. With --no-reconnect a "
    "lost connection ends the command with status 1, and so does a token the "
    "server refuses or lets expire (close 4001): the token is fixed, so "
    "reconnecting with it would be refused again."
)
_RESUME_HELP = (
    "With --resume (or --from, for one channel) sub subscribes with RESUME "
    "instead: after a reconnect the server sends what was published while "
    "the client was away, from the channel's history (channels matching the "
    "server's history_channels), so every message is printed once and in "
    "order. Where that cannot be done (the history no longer holds them, or "
    "the channel keeps none), one line on stderr names the channel and why, "
    "and sub goes on with the live messages. Each channel's RESUME prints "
    "'resumed CHANNEL at EPOCH:OFFSET' (--json: a \"resume\" object), and each "
    "message its position: 'CHANNEL [EPOCH:OFFSET]: DATA' (--json: a "
    '"position" field); give such a position to --from to start after it.'
)


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """--url, --token, --json; accepted before or after the subcommand."""
    # Below the subcommand the defaults are suppressed, or they would undo
    # what was given before it.
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--url", default=default(DEFAULT_URL), help=f"server URL, ws:// or wss:// [{DEFAULT_URL}]"
    )
    parser.add_argument(
        "--token",
        default=default(os.environ.get("PUBSUB_TOKEN")),
        help="access token (JWT) sent as ?token=; default: $PUBSUB_TOKEN",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON object per line",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(10.0),
        help="seconds to wait for the connection to open [10]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION)
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, what in (("sub", "CHANNEL"), ("psub", "PATTERN")):
        kind = "channels" if name == "sub" else "glob patterns"
        description = f"{_SUB_HELP} {_RESUME_HELP}" if name == "sub" else _SUB_HELP
        sub = commands.add_parser(
            name, help=f"subscribe to {kind} and print messages", description=description
        )
        sub.add_argument("names", nargs="+", metavar=what)
        sub.add_argument("--count", type=int, default=0, help="exit 0 after N messages")
        sub.add_argument(
            "--no-reconnect",
            dest="reconnect",
            action="store_false",
            help="exit 1 when the connection drops instead of reconnecting",
        )
        if name == "sub":  # only channels have a history
            sub.add_argument(
                "--resume",
                action="store_true",
                help="RESUME each channel, so that reconnects recover what was missed",
            )
            sub.add_argument(
                "--from",
                dest="start",
                type=_position,
                metavar="EPOCH:OFFSET",
                help="RESUME the one CHANNEL, first printing what was published after "
                "this position (as printed by --resume; ':0' for everything kept)",
            )
        _common(sub, top=False)
    pub = commands.add_parser("pub", help="publish a message and print the receiver count")
    pub.add_argument("channel", metavar="CHANNEL")
    pub.add_argument("message", metavar="MESSAGE")
    _common(pub, top=False)
    stats = commands.add_parser(
        "stats", help="channels with their subscriber counts, and the pattern count"
    )
    stats.add_argument("pattern", nargs="?", metavar="PATTERN", help="only channels matching it")
    _common(stats, top=False)
    return parser


def _position(text: str) -> Position:
    """``--from``'s EPOCH:OFFSET (the epoch may be empty: ``:0``)."""
    epoch, colon, offset = text.rpartition(":")
    if not colon or not (offset.isascii() and offset.isdigit()):
        raise argparse.ArgumentTypeError(f"not EPOCH:OFFSET (e.g. 9f2c1a0b:42): {text!r}")
    return epoch, int(offset)


def _where(position: Position) -> str:
    """A position as --from takes it."""
    return f"{position[0]}:{position[1]}"


def _wire_position(position: Position | None) -> dict[str, Any] | None:
    """A position as the protocol writes it."""
    return None if position is None else {"epoch": position[0], "offset": position[1]}


def _wire(value: Any) -> Any:
    """str as it is, bytes as the protocol's base64 object."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    return value


def _text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


class Output:
    """Lines for a person, or JSON objects, on stdout."""

    def __init__(self, as_json: bool, stream: TextIO) -> None:
        self.as_json = as_json
        self.stream = stream

    def emit(self, obj: dict[str, Any], text: str) -> None:
        line = json.dumps(obj, ensure_ascii=False) if self.as_json else text
        print(line, file=self.stream, flush=True)

    def message(self, message: Message) -> None:
        obj: dict[str, Any] = {"type": message.type, "channel": _wire(message.channel)}
        where = _text(message.channel)
        if message.pattern is not None:
            obj["pattern"] = _wire(message.pattern)
            where += f" ({_text(message.pattern)})"
        if message.position is not None:
            where += f" [{_where(message.position)}]"
        obj["data"] = _wire(message.data)
        if message.position is not None:
            obj["position"] = _wire_position(message.position)
        self.emit(obj, f"{where}: {_text(message.data)}")

    def recovery(self, recovery: Recovery) -> None:
        obj = {
            "type": "resume",
            "channel": recovery.channel,
            "recovered": recovery.recovered,
            "position": _wire_position(recovery.position),
            "reason": recovery.reason,
        }
        if recovery.position is None:
            text = f"resumed {recovery.channel}, which keeps no history"
        else:
            text = f"resumed {recovery.channel} at {_where(recovery.position)}"
        if not recovery.recovered:
            text += ", not recovered"
        self.emit(obj, text)


def _note(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _report_states(client: PubSubClient) -> None:
    """Say on stderr when the connection drops and comes back."""
    lost = False

    def changed(state: str, reason: str | None) -> None:
        nonlocal lost
        if state == DISCONNECTED:
            lost = True
            _note(f"disconnected ({reason}); reconnecting")
        elif state == CONNECTED and lost:
            lost = False
            _note(f"reconnected to {client.url}, subscribing again")

    client.on_state(changed)


def _report_recovery_failed(failure: RecoveryFailed) -> None:
    """One line on stderr for a channel whose missed messages cannot come."""
    now = "" if failure.position is None else f" (now at {_where(failure.position)})"
    _note(f"cannot recover what was missed on {failure.channel}: {failure.reason}{now}")


async def _subscribe(args: argparse.Namespace, out: Output) -> int:
    client = await connect(args.url, args.token, reconnect=args.reconnect, timeout=args.timeout)
    why: list[str | None] = [None]
    client.on_state(lambda state, reason: why.__setitem__(0, reason))
    _report_states(client)
    try:
        stream = client.messages()
        patterns = args.command == "psub"
        if not patterns and (args.resume or args.start is not None):
            client.on_recovery_failed(_report_recovery_failed)
            for name in args.names:
                out.recovery(await client.resume(name, position=args.start))
        else:
            count = await (client.psubscribe if patterns else client.subscribe)(*args.names)
            kind = "psubscribe" if patterns else "subscribe"
            out.emit(
                {"type": kind, "names": args.names, "count": count},
                f"{kind}d to {', '.join(args.names)}",
            )
        received = 0
        async for message in stream:
            out.message(message)
            received += 1
            if args.count and received >= args.count:
                return 0
        raise ConnectionError(why[0] or f"connection to {args.url} closed")
    finally:
        await client.close()


async def _publish(args: argparse.Namespace, out: Output) -> int:
    async with await connect(args.url, args.token, reconnect=False, timeout=args.timeout) as c:
        receivers = await c.publish(args.channel, args.message)
    noun = "receiver" if receivers == 1 else "receivers"
    out.emit({"type": "published", "receivers": receivers}, f"{receivers} {noun}")
    return 0


async def _stats(args: argparse.Namespace, out: Output) -> int:
    async with await connect(args.url, args.token, reconnect=False, timeout=args.timeout) as c:
        channels = await c.pubsub_channels(args.pattern)
        # A name is text over WebSocket: one that is not UTF-8 (subscribed
        # over RESP) is listed, but its count can only be asked over RESP.
        text = [name for name in channels if isinstance(name, str)]
        asked = await c.pubsub_numsub(*text) if text else {}
        counts = {name: asked.get(name) if isinstance(name, str) else None for name in channels}
        numpat = await c.pubsub_numpat()
    obj = {
        "type": "stats",
        "channels": {_text(name): count for name, count in counts.items()},
        "numpat": numpat,
    }
    lines = [
        f"{_text(name)}: {count if count is not None else 'unknown (not UTF-8: ask over RESP)'}"
        for name, count in counts.items()
    ] or ["no channels"]
    lines.append(f"patterns: {numpat}")
    out.emit(obj, "\n".join(lines))
    return 0


_RUN = {"sub": _subscribe, "psub": _subscribe, "pub": _publish, "stats": _stats}


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "start", None) is not None and len(args.names) != 1:
        parser.error("--from resumes one CHANNEL from its position; give exactly one")
    out = Output(args.json, sys.stdout)
    try:
        return asyncio.run(_RUN[args.command](args, out))
    except KeyboardInterrupt:
        return 0
    except ReplyError as error:
        _note(f"server error: {error}")
    except (ConnectionError, ValueError) as error:
        _note(str(error))
    except BrokenPipeError:  # `pubsub-cli sub x | head -1`: the reader went away
        sys.stderr.close()
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
