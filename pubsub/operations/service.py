"""Build the server from settings: used by the twistd plugin and by embedders.

:func:`make_service` turns :class:`~pubsub.operations.config.Settings` into a
``MultiService`` that listens on the configured endpoint; :class:`Options` and
:func:`makeService` are the ``twistd pubsub`` command line around it.  The
plugin module itself holds no logic.
"""

from __future__ import annotations

import gc
import signal
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any, ClassVar, cast

import txaio
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger, jsonFileLogObserver
from twisted.python import usage
from twisted.python.logfile import LogFile
from twisted.web.server import Site

from pubsub.backplane import RedisBackplane, RedisClusterBackplane, is_cluster_url
from pubsub.backplane.history import RedisHistory
from pubsub.backplane.tls import backplane_tls
from pubsub.core.engine import Engine
from pubsub.internals import forget_exit_signal, plain_debug_values
from pubsub.operations.config import (
    ConfigError,
    Settings,
    endpoint_description,
    listen_description,
    load_settings,
)
from pubsub.policy.http_callback import HttpCallback
from pubsub.policy.middleware import load as load_middleware
from pubsub.resp.protocol import RespFactory, RespProtocol
from pubsub.web.front import FrontFactory
from pubsub.web.site import PubSubResource
from pubsub.websocket.protocol import PubSubServerFactory, PubSubServerProtocol

__all__ = [
    "Options",
    "PubSubService",
    "build_factory",
    "build_resource",
    "makeService",
    "make_service",
]

log = Logger()


def build_factory(
    engine: Engine | None = None,
    settings: Settings | None = None,
    middleware: Sequence[Any] = (),
) -> PubSubServerFactory:
    """A WebSocket server factory whose connections share ``engine``, under
    ``middleware`` (:class:`~pubsub.policy.middleware.Middleware`s, in order)."""
    return PubSubServerFactory(engine, settings, middleware=middleware)


def build_resource(
    engine: Engine | None = None,
    settings: Settings | None = None,
    middleware: Sequence[Any] = (),
) -> PubSubResource:
    """A twisted.web resource serving pub/sub WebSocket connections on ``engine``.

    Mount it in any ``Site``: ``root.putChild(b"pubsub", build_resource(engine))``.
    """
    return PubSubResource(build_factory(engine, settings, middleware))


class PubSubService(MultiService):
    """The whole server; ``engine`` is there for publishing from application code.

    ``factory`` serves WebSocket; ``resp_factory`` serves RESP, or is None
    when no ``resp_port`` is set; ``backplane`` joins other nodes, or is None
    when no ``backplane`` is set.
    """

    def __init__(
        self,
        factory: PubSubServerFactory,
        settings: Settings,
        reactor: Any,
        resp_factory: RespFactory | None = None,
    ) -> None:
        super().__init__()
        self.factory = factory
        self.resp_factory = resp_factory
        self.engine = factory.engine
        self.settings = settings
        self._reactor = reactor
        self._endpoints: dict[Service, tuple[str, str]] = {}
        self.backplane: RedisBackplane | RedisClusterBackplane | None = None
        #: The log observer twistd should use instead of its own (log_format = json).
        self.log_observer: Any = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd makes the application, then starts logging to the observer
        # the application names, if any: the one way a plugin chooses it.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)  # Twisted's, as above

    def listen(self, setting: str, factory: Any) -> None:
        """Serve ``factory`` while running, on the port the setting names."""
        value = getattr(self.settings, setting)
        description = endpoint_description(self.settings, value)
        try:
            # strports raises at start-up when the port cannot be bound, so
            # twistd stops with the reason instead of running without a port.
            listener = strports.service(
                listen_description(self.settings, value), factory, reactor=self._reactor
            )
        except Exception as error:  # noqa: BLE001 - endpoint parsers raise anything
            raise ConfigError(f"setting {setting}: cannot use {value!r}: {error}") from None
        listener.setServiceParent(self)
        self._endpoints[listener] = ("RESP" if setting == "resp_port" else "WebSocket", description)

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        for listener in self._endpoints:
            what, endpoint = self._endpoints[listener]
            log.info("pubsub starting: {what} on {endpoint}", what=what, endpoint=endpoint)
            try:
                listener.privilegedStartService()
            except (CannotListenError, OSError) as error:
                # One clear line instead of twistd's traceback, and a non-zero
                # exit; a UNIX socket path fails with a plain OSError.
                reason = getattr(error, "socketError", None) or error
                raise SystemExit(f"pubsub: cannot listen on {endpoint}: {reason}") from None

    def stopService(self) -> Any:
        # SIGTERM and SIGINT are how this server is meant to be stopped: once
        # it has shut down in order, exit 0 rather than have twistd re-raise
        # the signal (which would report the stop as a failure).
        forget_exit_signal(self._reactor, signal.SIGTERM, signal.SIGINT)
        # Stop accepting first, then say goodbye (1001) to everyone connected;
        # the reactor stops once every close handshake ended or timed out.
        stopped = defer.maybeDeferred(super().stopService)
        stopped.addCallback(lambda _: self._close_connections())
        return stopped

    def _close_connections(self) -> defer.Deferred[list[tuple[bool, Any]]]:
        # Their results are not looked at: each only says when it is done.
        closing: list[defer.Deferred[Any]] = [self.factory.close_all()]
        if self.resp_factory is not None:
            closing.append(self.resp_factory.close_all())
        done = defer.DeferredList(closing)
        if self.settings.shutdown_timeout:
            # A client that never reads keeps its close frame (or the rest of
            # its RESP output) unsent: past the timeout it is cut off.
            cut_off = self._reactor.callLater(self.settings.shutdown_timeout, self._cut_off)
            done.addBoth(_cancelling, cut_off)
        return done

    def _cut_off(self) -> None:
        left: list[PubSubServerProtocol | RespProtocol] = list(self.factory.connections)
        if self.resp_factory is not None:
            left += list(self.resp_factory.connections)
        log.info(
            "shutdown_timeout of {seconds} s passed: cutting off {count} connections",
            seconds=self.settings.shutdown_timeout,
            count=len(left),
        )
        for connection in left:
            connection.transport.abortConnection()


def _cancelling(result: Any, call: Any) -> Any:
    """Pass ``result`` on, once the delayed ``call`` is no longer wanted."""
    if call.active():
        call.cancel()
    return result


def make_service(
    settings: Settings | None = None,
    engine: Engine | None = None,
    reactor: Any = None,
    middleware: Sequence[Any] = (),
) -> PubSubService:
    """The server as a Twisted service, listening per ``settings``.

    Its clients, WebSocket and RESP, pass through ``middleware`` and then
    the middlewares the settings ask for (:func:`configured_middleware`).
    """
    if reactor is None:
        from twisted.internet import reactor
    # Autobahn logs every frame at debug level; a server logs events, not messages.
    # (txaio binds its functions at run time, when a framework is chosen.)
    txaio.set_global_log_level("info")  # type: ignore[attr-defined]
    plain_debug_values()
    settings = settings if settings is not None else Settings()
    engine = engine if engine is not None else Engine()
    middleware = [*middleware, *configured_middleware(settings, reactor)]
    factory = build_factory(engine, settings, middleware)
    resource = PubSubResource(factory, clock=reactor)
    site = Site(resource, timeout=settings.open_handshake_timeout or None)
    resp_factory = None
    if settings.resp_port.strip():
        resp_factory = RespFactory(engine, settings, reactor, middleware)
        resource.health.factories.append(resp_factory)
    service = PubSubService(factory, settings, reactor, resp_factory)
    service.listen("port", FrontFactory(site, reactor))
    if resp_factory is not None:
        service.listen("resp_port", resp_factory)
    if settings.backplane.strip():
        service.backplane = _backplane(engine, settings, reactor)
        service.backplane.setServiceParent(service)
        resource.health.backplane = service.backplane
    return service


def configured_middleware(settings: Settings, reactor: Any) -> list[Any]:
    """The middlewares the settings ask for: the ``middleware`` setting's,
    in order, then the ``middleware_url`` callback."""
    loaded = load_middleware(settings.middleware)
    callback = HttpCallback.from_settings(settings, reactor)
    return loaded if callback is None else [*loaded, callback]


def _backplane(
    engine: Engine, settings: Settings, reactor: Any
) -> RedisBackplane | RedisClusterBackplane:
    # The TLS files are read once, here, so a bad one stops the start-up.
    tls = backplane_tls(settings)
    kind = RedisClusterBackplane if is_cluster_url(settings.backplane) else RedisBackplane
    try:
        backplane = kind(
            engine,
            settings.backplane,
            prefix=settings.backplane_prefix.encode("utf-8"),
            clock=reactor,
            max_delay=settings.backplane_max_delay,
            buffer_limit=settings.backplane_buffer,
            ping_interval=settings.backplane_ping_interval,
            timeout=settings.backplane_timeout,
            trust_root=tls.trust_root,
            client_certificate=tls.client_certificate,
        )
    except ValueError as error:
        raise ConfigError(f"setting backplane: {error}") from None
    globs = settings.history_globs()
    if globs:
        engine.history = RedisHistory(backplane, globs, settings.history_size, settings.history_ttl)
    return backplane


def _option_help(name: str) -> str:
    f = {f.name: f for f in fields(Settings)}[name]
    default = f.default if f.default is not MISSING else None
    return f"{f.metadata['help']} [default: {default}]"


_COERCE = {"int": int, "float": float, "str": str}


def _option(name: str) -> str:
    return name.replace("_", "-")


class Options(usage.Options):
    """``twistd pubsub`` options: --config, then one per setting.

    A true/false setting is a pair of flags, ``--name`` and ``--no-name``, so
    the command line can turn off what the settings file turned on.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve Redis Pub/Sub over WebSocket. Settings come from built-in defaults, "
        "then the settings file (conf/pubsub.toml when present, or --config), then "
        "PUBSUB_<NAME> environment variables, then these options."
    )
    # A field's type is its annotation's text ("int"...): config.py's
    # annotations are strings (from __future__ import annotations).
    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", None, "TOML settings file [default: conf/pubsub.toml when present]"],
    ] + [
        [_option(f.name), None, None, _option_help(f.name), _COERCE[cast(str, f.type)]]
        for f in fields(Settings)
        if f.type != "bool"
    ]
    optFlags: ClassVar[list[list[Any]]] = [
        flag
        for f in fields(Settings)
        if f.type == "bool"
        for flag in (
            [_option(f.name), None, _option_help(f.name)],
            ["no-" + _option(f.name), None, f"Turn {_option(f.name)} off"],
        )
    ]

    def _given(self, name: str, kind: str) -> Any:
        """The option's value, or None when the command line did not set it."""
        option = _option(name)
        if kind != "bool":
            return self[option]
        on, off = self[option], self["no-" + option]
        if on and off:
            raise usage.UsageError(f"--{option} and --no-{option} contradict each other")
        return True if on else False if off else None

    def postOptions(self) -> None:
        overrides = {f.name: self._given(f.name, cast(str, f.type)) for f in fields(Settings)}
        try:
            self.settings = load_settings(self["config"], overrides=overrides)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None


#: Middle-generation collections between two full ones (CPython's default: 10).
FULL_COLLECTION_EVERY = 100


def tune_collector() -> None:
    """Fewer full garbage collections, for a process that holds many connections.

    CPython runs a full collection once the objects that outlived the younger
    generations have grown by a quarter and 10 middle collections have run.
    While thousands of clients connect that is several full collections,
    each a pause that walks every open connection, so the cost of a connect
    grows with the connections already open. Waiting for 100 middle
    collections means none during such a burst; cyclic garbage that reached
    the oldest generation (closed connections) waits for the next full
    collection. docs/benchmarks.md's idle scenario measures the effect.
    """
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def makeService(options: Options) -> PubSubService:
    """twistd's entry point (``IServiceMaker.makeService``); the process is the
    server's own, so its garbage collector is tuned for it (embedders keep theirs)."""
    tune_collector()
    try:
        service = make_service(options.settings)
    except ConfigError as error:
        # Past option parsing twistd shows a UsageError as a traceback; a
        # SystemExit is one line and status 1.
        raise SystemExit(f"pubsub: {error}") from None
    if options.settings.log_format == "json":
        service.log_observer = json_log_observer(getattr(options, "parent", None) or {})
    return service


def json_log_observer(twistd_options: Any) -> Any:
    """JSON lines (one event each, no record separator) to where twistd would
    write its text log: standard output with ``-n`` or ``--logfile -``, else
    ``--logfile`` or ``twistd.log``."""
    logfile = twistd_options.get("logfile") or ""
    if logfile == "-" or (not logfile and twistd_options.get("nodaemon")):
        stream: Any = sys.stdout
    else:
        stream = LogFile.fromFullPath(logfile or "twistd.log")
    return jsonFileLogObserver(stream, recordSeparator="")
