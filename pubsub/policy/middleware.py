"""Middleware: an application's own policies, called where Redis checks ACLs.

A middleware is any object with some of the hooks of :class:`Middleware`
(subclass it and override what you need).  The server calls them for
WebSocket and RESP clients alike:

* ``on_accept(host)`` when a connection from the address ``host`` arrives,
  before a byte of it is read (on the WebSocket port, any HTTP request):
  return to let it in, raise :class:`Refused` to close it at once (HTTP
  503, RESP ``-ERR <reason>``); it must answer at once.  ``on_close(host)``
  follows, once, when a connection it let in closes;
* ``on_connect(client)`` once a client has connected, before any of its
  commands runs: return to accept (set ``client.identity`` to remember who
  it is), raise :class:`Refused` to turn it away (WebSocket: the refusal's
  close code, 1008 unless it says otherwise, with the reason; RESP:
  ``-ERR <reason>``, then the connection closes);
* ``on_subscribe(client, kind, name)`` for each name of a SUBSCRIBE,
  PSUBSCRIBE or SSUBSCRIBE (and the channel of the JSON protocol's RESUME
  and HISTORY), after the command's lookup and arity and the
  server's own token and permission checks, as Redis checks its ACLs:
  raise :class:`Refused` to refuse the command (``-NOPERM <reason>``, or
  the refusal's own error code, and nothing is subscribed);
* ``on_publish(client, kind, channel, payload)`` for PUBLISH and SPUBLISH:
  return None to allow, bytes to deliver those instead of the payload, or
  raise :class:`Refused` (``-NOPERM <reason>``, nothing delivered); any
  other answer is a fault;
* ``on_refused(client, command, error)`` when one of this server's
  middlewares refuses a command or a client, and ``on_disconnect(client)``
  when an accepted client goes: observe only (audit logs, metrics).

The server's own policies are middlewares too, and come first, in this
order, each only when its settings turn it on: the per-address limit
(``on_accept``), the origin allow-list (WebSocket's ``on_connect``), tokens
(the handshake's token at ``on_connect``, channel permissions at
``on_subscribe`` and ``on_publish``) and the publish rate (``on_publish``).
With none of them on and no middleware of the application's, a port has
no chain at all, and pays nothing for it.

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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pubsub.core.commands import Error
from pubsub.core.vocabulary import Kind
from pubsub.operations.config import ConfigError
from pubsub.policy.hooks import Client, Middleware, Refused

__all__ = ["Chain", "Client", "Middleware", "Refused", "load"]

_log = Logger()


#: The commands a middleware screens, and the kind of subscription or message each names.
_SUBSCRIBERS = {kind.subscribe: kind for kind in Kind}
_PUBLISHERS = {"publish": Kind.CHANNEL, "spublish": Kind.SHARD}
#: The JSON protocol's commands that read one channel, its first argument
#: (RESUME subscribes to it, HISTORY reads it): screened as a SUBSCRIBE of it.
_READERS = {"resume": Kind.CHANNEL, "history": Kind.CHANNEL}


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


#: One step of a decision: a hook and its arguments (a publish's payload apart).
_Step = tuple[Callable[..., Any], tuple[Any, ...]]


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
        #: Each middleware's on_accept and on_close, either None if it has none.
        self._accept: list[tuple[Callable[[str], Any] | None, Callable[[str], Any] | None]] = []
        for middleware in middlewares:
            accept = _overriding([middleware], "on_accept")
            close = _overriding([middleware], "on_close")
            if accept or close:
                self._accept.append((accept[0] if accept else None, close[0] if close else None))
        #: Whether a middleware screens connections as they arrive (on_accept).
        self.accepts = bool(self._accept)
        self._connect = _overriding(middlewares, "on_connect")
        self._subscribe = _overriding(middlewares, "on_subscribe")
        self._publish = _overriding(middlewares, "on_publish")
        self._refused = _overriding(middlewares, "on_refused")
        self._disconnect = _overriding(middlewares, "on_disconnect")
        #: Whether a middleware has a say once a client is hosted (every
        #: hook but on_accept and on_close): else its clients need no Client.
        self.hosts = any(
            (self._connect, self._subscribe, self._publish, self._refused, self._disconnect)
        )
        #: Connections, clients and commands refused by a middleware (the
        #: built-in ones included), since start-up.
        self.refusals = 0
        #: Answers that failed (an exception other than Refused) or came too late.
        self.failures = 0

    @classmethod
    def build(cls, middlewares: Sequence[Any], clock: Any, timeout: float) -> Chain | None:
        """The chain of ``middlewares``, or None when there are none."""
        return cls(middlewares, clock, timeout) if middlewares else None

    # -- the decisions ------------------------------------------------------------------

    def accept(self, host: str) -> Refused | None:
        """None to let in a connection from ``host`` (then :meth:`close` it
        when it ends), else the refusal that turns it away."""
        for index, (hook, _) in enumerate(self._accept):
            if hook is None:
                continue
            try:
                answer = hook(host)
                if answer is not None:
                    raise TypeError(f"on_accept must answer at once with None, not {answer!r:.80}")
            except Exception as error:  # noqa: BLE001 - a refusal or a fault: told, never raised
                # The ones that let it in before this one see it close.
                self._closed(host, self._accept[:index])
                return self._accept_refusal(Failure(error), host)
        return None

    def close(self, host: str) -> None:
        """A connection :meth:`accept` let in has closed."""
        self._closed(host, self._accept)

    def _closed(
        self, host: str, accepted: Sequence[tuple[Any, Callable[[str], Any] | None]]
    ) -> None:
        for _, hook in accepted:
            if hook is not None:
                self._observe(hook, host)

    def _accept_refusal(self, failure: Failure, host: str) -> Refused:
        if failure.check(Refused):
            self.refusals += 1
            return cast(Refused, failure.value)
        self.failures += 1
        _log.failure("middleware failed on a connection from {host}; refused", failure, host=host)
        return Refused("the server's middleware failed; connection refused", code="ERR")

    def connect(self, client: Client) -> Any:
        """None to accept ``client``, else the :class:`Refused` that turns it
        away (a Deferred of either once a middleware answers later)."""
        steps = [(hook, (client,)) for hook in self._connect]
        return self._decide(steps, None, client, "connect", "ERR")

    def screen(self, client: Client, name: str, args: Sequence[bytes]) -> Any:
        """The verdict on the resolved command ``name`` with ``args``: None
        (run it as asked), new arguments (a payload replaced), the Error the
        client is answered with, or a Deferred of one of them.

        Every Deferred the chain answers with is a plain one it made, so a
        caller tells it by its type: ``isinstance`` would cost an ABC check
        (a Deferred is an ``Awaitable``) on every command."""
        kind = _SUBSCRIBERS.get(name)
        names = args[1:]
        if kind is None and name in _READERS:
            kind, names = _READERS[name], args[1:2]
        if kind is not None:
            if not self._subscribe:
                return None
            # Each middleware in its turn, on every name.
            steps = [
                (hook, (client, kind, channel)) for hook in self._subscribe for channel in names
            ]
            return self._decide(steps, None, client, name, "NOPERM")
        kind = _PUBLISHERS.get(name)
        if kind is None or not self._publish:
            return None
        steps = [(hook, (client, kind, args[1])) for hook in self._publish]
        return self._decide(
            steps, args if type(args) is list else list(args), client, name, "NOPERM"
        )

    def _decide(self, steps: list[_Step], value: Any, client: Client, what: str, code: str) -> Any:
        """Run ``steps`` in order on ``value``: its final form (a publish's
        arguments, the payload maybe replaced), or an Error (a
        :class:`Refused`, refusing a client); a Deferred of either once a
        step answers later."""
        try:
            outcome = self._go_on(iter(steps), value)
        except Exception as error:  # noqa: BLE001 - a refusal or a fault: told, never raised
            return self._refusal(Failure(error), client, what, code)
        if type(outcome) is defer.Deferred:  # _go_on's own
            # Whatever the cancelled Deferred fails with (an HTTP client's
            # own errors, say), it is late.
            outcome.addTimeout(self._timeout, self._clock, onTimeoutCancel=_late)
            outcome.addErrback(self._refusal, client, what, code)
        return outcome

    def _go_on(self, steps: Iterator[_Step], value: Any) -> Any:
        """The steps left, from ``value``: a value, or a Deferred once one answers later."""
        for hook, args in steps:
            # A publish's hooks get its payload as the ones before left it.
            result = hook(*args) if value is None else hook(*args, value[2])
            if result is None:
                continue  # allowed, as it was: the built-in policies' answer
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

    def _refusal(self, failure: Failure, client: Client, what: str, code: str) -> Any:
        """What a refused command is answered with (an Error), or for a
        refused client, the :class:`Refused` that turns it away."""
        if failure.check(Refused):
            self.refusals += 1
            refusal = cast(Refused, failure.value)
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
            refusal = Refused(
                f"the server's middleware {'did not answer in time' if late else 'failed'}"
                f"; {what} refused",
                code="ERR",
            )
        message = f"{refusal.code or code} {refusal}"
        self.observe_refusal(client, what, message)
        return refusal if what == "connect" else Error(message)

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
        if result is not None and isinstance(result, defer.Deferred):
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
