"""Middleware: an application's own policies, called where Redis checks ACLs.

A middleware is any object with some of the hooks of :class:`Middleware`
(subclass it and override what you need).  The server calls them for
WebSocket and RESP clients alike:

* ``on_connect(client)`` once a client has connected, before any of its
  commands runs: return to accept (set ``client.identity`` to remember who
  it is), raise :class:`Refused` to turn it away (WebSocket: close code
  1008 with the reason; RESP: ``-ERR <reason>``, then the connection
  closes);
* ``on_subscribe(client, kind, name)`` for each name of a SUBSCRIBE,
  PSUBSCRIBE or SSUBSCRIBE, after the command's lookup and arity and the
  server's own token and permission checks, as Redis checks its ACLs:
  raise :class:`Refused` to refuse the command (``-NOPERM <reason>``, and
  nothing is subscribed);
* ``on_publish(client, kind, channel, payload)`` for PUBLISH and SPUBLISH:
  return None to allow, bytes to deliver those instead of the payload, or
  raise :class:`Refused` (``-NOPERM <reason>``, nothing delivered); any
  other answer is a fault;
* ``on_refused(client, command, error)`` when one of this server's
  middlewares refuses a command, and ``on_disconnect(client)`` when an
  accepted client goes: observe only (audit logs, metrics).

A hook may answer at once or later: a Deferred (or a coroutine) for a
database or an HTTP call.  The client's commands wait their turn meanwhile,
in order, and the connection reads nothing more until the answer.  An
answer that does not come within ``middleware_timeout`` seconds, and any
exception but :class:`Refused`, refuses (``-ERR``), and is logged: a
client is never left waiting, nor an error lost.  Middlewares run in the
order given; the first refusal ends it, and a replaced payload is what the
next one sees.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pubsub.core.commands import Error
from pubsub.core.vocabulary import Kind
from pubsub.operations.config import ConfigError

__all__ = ["Chain", "Client", "Middleware", "Refused", "load"]

_log = Logger()


class Refused(Exception):
    """Raised by a middleware hook (or a Deferred's failure) to refuse; its
    text is what the client is told."""


class Client:
    """What a middleware knows of one client, the same object in every hook.

    ``transport`` is "websocket" or "resp"; ``peer`` the address it comes
    from; ``path``, ``params`` and ``headers`` those of its WebSocket
    handshake (empty for RESP).  ``identity`` is the middleware's own, None
    until one sets it.  ``claims`` are the claims of the token the client
    authenticated with, when tokens are in use (else None).
    """

    __slots__ = (
        "_guard",
        "client_id",
        "headers",
        "identity",
        "params",
        "path",
        "peer",
        "transport",
    )

    def __init__(
        self,
        transport: str,
        client_id: int,
        peer: str,
        path: str = "",
        params: Mapping[str, Sequence[str]] | None = None,
        headers: Mapping[str, str] | None = None,
        guard: Any = None,
    ) -> None:
        self.transport = transport
        self.client_id = client_id
        self.peer = peer
        self.path = path
        self.params: Mapping[str, Sequence[str]] = params if params is not None else {}
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self.identity: Any = None
        self._guard = guard

    @property
    def claims(self) -> Mapping[str, Any] | None:
        grant = self._guard.grant if self._guard is not None else None
        return grant.claims if grant is not None else None

    def __repr__(self) -> str:
        return f"<Client {self.transport} #{self.client_id} from {self.peer}>"


class Middleware:
    """The hooks, each allowing by default; override the ones you need."""

    def on_connect(self, client: Client) -> Any:
        return None

    def on_subscribe(self, client: Client, kind: Kind, name: bytes) -> Any:
        return None

    def on_publish(self, client: Client, kind: Kind, channel: bytes, payload: bytes) -> Any:
        return None

    def on_refused(self, client: Client, command: str, error: str) -> None:
        return None

    def on_disconnect(self, client: Client) -> None:
        return None


#: The commands a middleware screens, and the kind of subscription or message each names.
_SUBSCRIBERS = {kind.subscribe: kind for kind in Kind}
_PUBLISHERS = {"publish": Kind.CHANNEL, "spublish": Kind.SHARD}


def _now_or_later(answer: defer.Deferred[Any]) -> tuple[Any, defer.Deferred[Any] | None]:
    """``(result, None)`` when ``answer`` has fired already (a Failure for an
    error), else ``(None, later)``: a Deferred that fires with it, and
    cancels it when cancelled.

    A middleware that answers with an already-fired Deferred (``succeed``,
    a coroutine that never waited) has answered at once, and the steps
    after it run in the same loop: chained as callbacks, each would nest
    one level deeper, and a SUBSCRIBE of thousands of names would overflow
    the stack.
    """
    now: list[Any] = []
    later: defer.Deferred[Any] | None = None

    def landed(result: Any) -> None:
        if later is None:
            now.append(result)
        elif isinstance(result, Failure):
            later.errback(result)
        else:
            later.callback(result)

    answer.addBoth(landed)
    if now:
        return now[0], None
    later = defer.Deferred(lambda _: answer.cancel())
    return None, later


def _late(result: Any, timeout: float) -> Failure:
    return Failure(defer.TimeoutError(f"no answer within {timeout:g} s"))


def _step(hook: Callable[..., Any], *args: Any) -> Callable[[Any], Any]:
    """``hook(*args)`` as a step that does not read the value so far."""
    return lambda _value: hook(*args)


def _overriding(middlewares: Sequence[Any], hook: str) -> list[Callable[..., Any]]:
    """The bound ``hook`` of each middleware that has its own, in order."""
    default = getattr(Middleware, hook)
    found = []
    for middleware in middlewares:
        method = getattr(type(middleware), hook, None)
        if method is not None and method is not default:
            found.append(getattr(middleware, hook))
    return found


class Chain:
    """A port's middlewares in their order, and how their answers are awaited."""

    def __init__(self, middlewares: Sequence[Any], clock: Any, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._connect = _overriding(middlewares, "on_connect")
        self._subscribe = _overriding(middlewares, "on_subscribe")
        self._publish = _overriding(middlewares, "on_publish")
        self._refused = _overriding(middlewares, "on_refused")
        self._disconnect = _overriding(middlewares, "on_disconnect")
        #: Commands and connections refused by a middleware, since start-up.
        self.refusals = 0
        #: Answers that failed (an exception other than Refused) or came too late.
        self.failures = 0

    @classmethod
    def build(cls, middlewares: Sequence[Any], clock: Any, timeout: float) -> Chain | None:
        """The chain of ``middlewares``, or None when there are none."""
        return cls(middlewares, clock, timeout) if middlewares else None

    # -- the decisions ------------------------------------------------------------------

    def connect(self, client: Client) -> Any:
        """None to accept ``client``, else the Error that turns it away."""
        steps = [_step(hook, client) for hook in self._connect]
        return self._decide(steps, None, client, "connect", "ERR")

    def screen(self, client: Client, name: str, args: Sequence[bytes]) -> Any:
        """The verdict on the resolved command ``name`` with ``args``: None
        (run it as asked), new arguments (a payload replaced), the Error the
        client is answered with, or a Deferred of one of them."""
        kind = _SUBSCRIBERS.get(name)
        if kind is not None:
            if not self._subscribe:
                return None
            steps = [
                _step(hook, client, kind, channel)
                for channel in args[1:]
                for hook in self._subscribe
            ]
            return self._decide(steps, None, client, name, "NOPERM")
        kind = _PUBLISHERS.get(name)
        if kind is None or not self._publish:
            return None
        channel = args[1]

        def publishing(hook: Callable[..., Any]) -> Callable[[Any], Any]:
            return lambda current: hook(client, kind, channel, current[2])

        return self._decide(
            [publishing(hook) for hook in self._publish], list(args), client, name, "NOPERM"
        )

    def _decide(
        self, steps: list[Callable[[Any], Any]], value: Any, client: Client, what: str, code: str
    ) -> Any:
        """Run ``steps`` in order on ``value``: its final form (a payload
        replaced), or an Error; a Deferred of either once a step answers later."""
        try:
            outcome = self._go_on(iter(steps), value)
        except Exception as error:  # noqa: BLE001 - a refusal or a fault: told, never raised
            return self._refusal(Failure(error), client, what, code)
        if isinstance(outcome, defer.Deferred):
            # Whatever the cancelled Deferred fails with (an HTTP client's
            # own errors, say), it is late.
            outcome.addTimeout(self._timeout, self._clock, onTimeoutCancel=_late)
            outcome.addErrback(self._refusal, client, what, code)
        return outcome

    def _go_on(self, steps: Iterator[Callable[[Any], Any]], value: Any) -> Any:
        """The steps left, from ``value``: a value, or a Deferred once one answers later."""
        for step in steps:
            result = step(value)
            if inspect.isawaitable(result) and not isinstance(result, defer.Deferred):
                result = defer.ensureDeferred(cast(Any, result))
            if isinstance(result, defer.Deferred):
                result, later = _now_or_later(result)
                if later is not None:
                    return later.addCallback(self._then, value).addCallback(
                        lambda after: self._go_on(steps, after)
                    )
                if isinstance(result, Failure):
                    result.raiseException()
            value = self._then(result, value)
        return value

    @staticmethod
    def _then(result: Any, value: Any) -> Any:
        """The value after one step answered ``result``: a publish's payload
        replaced when it gave bytes, else as it was."""
        if type(value) is list and result is not None:
            if type(result) is not bytes:
                # Not delivered as if allowed: a str meant as the payload, say.
                raise TypeError(f"on_publish must return None or bytes, not {result!r:.80}")
            return [*value[:2], result]
        return value

    def _refusal(self, failure: Failure, client: Client, what: str, code: str) -> Error:
        if failure.check(Refused):
            self.refusals += 1
            error = Error(f"{code} {failure.value}")
        else:
            self.failures += 1
            late = failure.check(defer.TimeoutError) is not None
            if late:
                _log.warn(
                    "middleware did not answer {what} for {client} within {timeout:g} s; refused",
                    what=what,
                    client=client,
                    timeout=self._timeout,
                )
            else:
                _log.failure(
                    "middleware failed on {what} for {client}; refused",
                    failure,
                    what=what,
                    client=client,
                )
            error = Error(
                f"ERR the server's middleware {'did not answer in time' if late else 'failed'}"
                f"; {what} refused"
            )
        self.observe_refusal(client, what, error.message)
        return error

    # -- what is observed ---------------------------------------------------------------

    def observe_refusal(self, client: Client, command: str, error: str) -> None:
        for hook in self._refused:
            self._observe(hook, client, command, error)

    def disconnect(self, client: Client) -> None:
        for hook in self._disconnect:
            self._observe(hook, client)

    @staticmethod
    def _observe(hook: Callable[..., Any], *args: Any) -> None:
        try:
            result = hook(*args)
        except Exception:  # noqa: BLE001 - an observer's fault is logged, never the client's
            _log.failure("middleware observer {hook} failed", hook=hook)
            return
        if isinstance(result, defer.Deferred):
            result.addErrback(
                lambda failure: _log.failure(
                    "middleware observer {hook} failed", failure, hook=hook
                )
            )


def load(specs: str) -> list[Any]:
    """The middlewares the ``middleware`` setting names: comma-separated
    ``package.module:factory``, each built by calling ``factory()``."""
    loaded = []
    for spec in (part.strip() for part in specs.split(",")):
        if not spec:
            continue
        module_name, colon, attribute = spec.partition(":")
        if not colon or not module_name or not attribute:
            raise ConfigError(f"setting middleware: {spec!r} is not package.module:factory")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 - any import failure stops the start-up
            raise ConfigError(
                f"setting middleware: cannot import {module_name!r} ({spec}): "
                f"{type(error).__name__}: {error}"
            ) from None
        factory: Any = module
        for name in attribute.split("."):
            factory = getattr(factory, name, None)
            if factory is None:
                raise ConfigError(f"setting middleware: {module_name!r} has no {attribute!r}")
        if not callable(factory):
            raise ConfigError(f"setting middleware: {spec} is not callable")
        try:
            loaded.append(factory())
        except Exception as error:  # noqa: BLE001 - any failure to build stops the start-up
            raise ConfigError(
                f"setting middleware: {spec}() failed: {type(error).__name__}: {error}"
            ) from None
    return loaded
