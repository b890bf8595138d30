"""Settings: one dataclass, filled from defaults < conf file < environment < command line.

Every limit and knob of the server is a field of :class:`Settings` with its
default and a one-line help text; ``conf/pubsub.toml`` lists the same fields
(a test keeps the two in step), the twistd plugin makes one option per field,
and ``PUBSUB_<NAME>`` environment variables override the file.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

__all__ = [
    "ConfigError",
    "Settings",
    "endpoint_description",
    "listen_description",
    "load_settings",
]

DEFAULT_CONFIG = Path("conf") / "pubsub.toml"

#: The values of the log_format setting.
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A settings file, variable or option that cannot be used; says which."""


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told.  Sizes are bytes, times seconds."""

    port: str = _setting("9000", "TCP port number, or a Twisted endpoint string (tcp:..., ssl:...)")
    interface: str = _setting(
        "127.0.0.1", "Address to bind when port or resp_port is a bare number"
    )
    resp_port: str = _setting(
        "", "RESP (Redis protocol) port number or endpoint string; empty: no RESP port"
    )
    max_message_size: int = _setting(
        1_048_576,
        "Largest WebSocket message (bigger closes with 1009) or RESP request (protocol error)",
    )
    max_connections: int = _setting(
        10_000, "Most connections at once on each port; more are refused (HTTP 503 or -ERR)"
    )
    listen_backlog: int = _setting(
        511, "Connections the kernel queues on each port until the server accepts them"
    )
    max_subscriptions: int = _setting(
        10_000, "Most channels + patterns + shard channels one client may hold"
    )
    max_name_length: int = _setting(4096, "Longest channel name or pattern accepted, in bytes")
    output_buffer_hard: int = _setting(
        8 * 1024 * 1024, "Unsent bytes past which a subscriber is disconnected (1008 on WebSocket)"
    )
    output_buffer_soft: int = _setting(
        1024 * 1024, "Unsent bytes a subscriber may hold for output_buffer_soft_seconds"
    )
    output_buffer_soft_seconds: float = _setting(
        30.0, "How long a subscriber may stay past output_buffer_soft before it is cut off"
    )
    compression: bool = _setting(
        False, "Offer permessage-deflate to clients that ask (server_no_context_takeover)"
    )
    compression_min_size: int = _setting(
        256, "With compression on, messages smaller than this are sent uncompressed"
    )
    echo_endpoint: bool = _setting(
        False, "Serve /echo, a WebSocket echo under the same options (conformance tests)"
    )
    open_handshake_timeout: float = _setting(
        10.0, "Seconds a client has to finish the HTTP and WebSocket handshake"
    )
    jwt_secret: str = _setting(
        "",
        "Shared secret for HS256 tokens (JWT); empty: no HS256. Prefer PUBSUB_JWT_SECRET to the command line",
    )
    jwt_public_key: str = _setting(
        "", "PEM public key file for RS256 (RSA) or ES256 (P-256) tokens; empty: none"
    )
    jwt_audience: str = _setting("", "When set, a token's aud claim must name it")
    jwt_issuer: str = _setting("", "When set, a token's iss claim must be it")
    anonymous: str = _setting(
        "", "allow or deny clients without a token; empty: deny when a JWT key is set, else allow"
    )
    allowed_origins: str = _setting(
        "", "Comma-separated Origin wildcards (https://*.example.com); others close with 1008"
    )
    max_connections_per_ip: int = _setting(
        0, "Most connections at once from one IP address on each port; 0: no limit"
    )
    publish_rate: float = _setting(
        0.0, "PUBLISH and SPUBLISH per second one client may send on average; 0: no limit"
    )
    publish_burst: int = _setting(
        0, "Publishes a client may send at once above publish_rate; 0: one second's worth"
    )
    middleware: str = _setting(
        "",
        "Middlewares to load, in order: comma-separated module:factory (docs/embedding.md)",
    )
    middleware_timeout: float = _setting(
        5.0, "Seconds a middleware has to answer before the command or client is refused"
    )
    middleware_url: str = _setting(
        "",
        "URL the server POSTs each connect, subscribe and publish to, and follows (JSON); "
        "empty: none",
    )
    middleware_concurrency: int = _setting(
        64, "Most requests to middleware_url in flight at once; more wait their turn"
    )
    middleware_cache: float = _setting(
        0.0,
        "Seconds a subscribe decision of middleware_url is reused for the same subject, "
        "kind and name; 0: never",
    )
    history_channels: str = _setting(
        "",
        "Channels (Redis globs, comma-separated) whose recent messages are kept for clients "
        "that reconnect (RESUME, HISTORY); empty: none",
    )
    history_size: int = _setting(100, "Messages kept per channel of history_channels")
    history_ttl: float = _setting(300.0, "Seconds a message stays in a channel's history")
    history_max_bytes: int = _setting(
        64 * 1024 * 1024,
        "Bytes the history of all channels may hold; past it the channels published to "
        "least recently lose their oldest messages",
    )
    history_max_channels: int = _setting(
        10_000,
        "Channels with a history at once; past it the one published to least recently "
        "loses its history",
    )
    ping_interval: float = _setting(
        30.0, "Seconds between WebSocket pings the server sends to each client; 0: none"
    )
    ping_timeout: float = _setting(
        30.0, "Seconds a client has to answer a ping before it is dropped; 0: wait forever"
    )
    idle_timeout: float = _setting(
        0.0, "Close a client that sends no command for this many seconds (not subscribers)"
    )
    shutdown_timeout: float = _setting(
        5.0, "Seconds to wait on shutdown for clients to close before they are cut off"
    )
    log_format: str = _setting("text", "twistd's log: text (human-readable) or json (JSON lines)")
    backplane: str = _setting(
        "",
        "Redis URL joining several nodes into one broker (redis://host:port/, "
        "rediss:// for TLS; a Redis Cluster: redis+cluster://host:port,host:port/, "
        "rediss+cluster:// for TLS); empty: one node",
    )
    backplane_tls_ca: str = _setting(
        "",
        "PEM file of the CA certificates that sign the backplane Redis's certificate "
        "(rediss://); empty: the system's trust store",
    )
    backplane_tls_cert: str = _setting(
        "", "PEM client certificate to show the backplane Redis (tls-auth-clients); empty: none"
    )
    backplane_tls_key: str = _setting(
        "", "PEM private key of backplane_tls_cert; set both or neither"
    )
    backplane_prefix: str = _setting(
        "pubsub:", "Prefix of this deployment's channel names in the backplane's Redis"
    )
    backplane_max_delay: float = _setting(
        5.0, "Longest wait in seconds between attempts to reconnect to the backplane"
    )
    backplane_buffer: int = _setting(
        8 * 1024 * 1024,
        "Bytes of publishes a node may queue for a slow backplane Redis; past it PUBLISH errs",
    )
    backplane_ping_interval: float = _setting(
        1.0, "Seconds between the PINGs that check each backplane connection"
    )
    backplane_timeout: float = _setting(
        3.0,
        "Seconds Redis has to answer a PING or publish before the backplane is down; 0: no check",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"setting {f.name} must not be negative, got {value}")
        if not str(self.port).strip():
            raise ConfigError("setting port must not be empty")
        self._check_backplane_health()
        self._check_backplane_tls()
        if not math.isfinite(self.middleware_timeout) or self.middleware_timeout <= 0:
            raise ConfigError(
                "setting middleware_timeout must be a positive number of seconds, "
                f"got {self.middleware_timeout}"
            )
        self._check_history()
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"setting log_format must be one of {', '.join(LOG_FORMATS)}, "
                f"got {self.log_format!r}"
            )

    def history_globs(self) -> list[bytes]:
        """The history_channels setting's globs."""
        return [g.strip().encode("utf-8") for g in self.history_channels.split(",") if g.strip()]

    def _check_history(self) -> None:
        if not self.history_globs():
            return
        if not math.isfinite(self.history_ttl) or self.history_ttl <= 0:
            raise ConfigError(
                f"setting history_ttl must be a positive number of seconds, got {self.history_ttl}"
            )
        for name in ("history_size", "history_max_bytes", "history_max_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"setting {name} must be at least 1 with history_channels set")

    def _check_backplane_health(self) -> None:
        interval, timeout = self.backplane_ping_interval, self.backplane_timeout
        for name, value in (("backplane_ping_interval", interval), ("backplane_timeout", timeout)):
            if not math.isfinite(value):
                raise ConfigError(f"setting {name} must be a finite number, got {value}")
        if timeout == 0:
            return  # the health check is off: the interval is not used
        if interval <= 0:
            raise ConfigError(
                f"setting backplane_ping_interval must be positive, got {interval} "
                "(to turn the backplane health check off, set backplane_timeout to 0)"
            )
        if interval >= timeout:
            # A timeout no longer than the interval would close a healthy link
            # whose PING was answered a moment after the next tick.
            raise ConfigError(
                f"setting backplane_ping_interval ({interval}) must be less than "
                f"backplane_timeout ({timeout}): a link is down when a PING sent every "
                "interval is not answered within the timeout; e.g. 1 and 3"
            )

    def _check_backplane_tls(self) -> None:
        """What can be told without reading the files;
        :func:`pubsub.backplane.tls.backplane_tls` reads them."""
        cert, key = self.backplane_tls_cert.strip(), self.backplane_tls_key.strip()
        if cert and not key:
            raise ConfigError(
                "setting backplane_tls_cert needs backplane_tls_key: the client "
                "certificate's private key (set both or neither)"
            )
        if key and not cert:
            raise ConfigError(
                "setting backplane_tls_key needs backplane_tls_cert: the client "
                "certificate the key belongs to (set both or neither)"
            )
        url = self.backplane.strip()
        used = [
            name
            for name in ("backplane_tls_ca", "backplane_tls_cert", "backplane_tls_key")
            if getattr(self, name).strip()
        ]
        # Without a backplane they are unused, as the other backplane_* settings.
        scheme = urlsplit(url).scheme
        if used and url and scheme in ("redis", "redis+cluster"):
            raise ConfigError(
                f"setting {used[0]} is for TLS, but backplane is a {scheme}:// URL "
                f"(plain TCP): use {scheme.replace('redis', 'rediss', 1)}:// for TLS"
            )


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert one value to the type of the field ``name``."""
    # This module's annotations are strings (from __future__ import
    # annotations), so every field's type is its name: "str", "int"...
    kinds = {f.name: cast(str, f.type) for f in fields(Settings)}
    if name not in kinds:
        known = ", ".join(sorted(kinds))
        raise ConfigError(f"{source}: unknown setting {name!r} (known: {known})")
    kind = kinds[name]
    try:
        if kind == "str":
            if name == "middleware" and isinstance(value, list):
                # The TOML file may list them: the same as the comma-separated text.
                if not all(isinstance(item, str) and "," not in item for item in value):
                    raise TypeError
                return ",".join(value)
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise TypeError
            return str(value)
        if kind == "int":
            if isinstance(value, (bool, float)):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, bool):
                raise TypeError
            return value
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled setting type {kind}")
    expected = {
        "str": "a string",
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
    }
    raise ConfigError(f"{source}: setting {name} must be {expected[kind]}, got {value!r}")


def load_settings(
    config: str | Path | None = None,
    environ: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings in order of precedence.

    ``config`` is a TOML file; when None, ``conf/pubsub.toml`` under the
    current directory is read if it exists.  ``environ`` supplies
    ``PUBSUB_<NAME>`` overrides, ``overrides`` (command-line options) win
    over everything; None values in it are ignored.
    """
    values: dict[str, Any] = {}
    path = Path(config) if config is not None else DEFAULT_CONFIG
    if config is not None or path.exists():
        try:
            with path.open("rb") as stream:
                table = tomllib.load(stream)
        except OSError as error:
            raise ConfigError(f"cannot read settings file {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"settings file {path} is not valid TOML: {error}") from None
        for name, value in table.items():
            values[name] = _coerce(name, value, str(path))
    for f in fields(Settings):
        variable = "PUBSUB_" + f.name.upper()
        if variable in environ:
            values[f.name] = _coerce(f.name, environ[variable], variable)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "option --" + name.replace("_", "-"))
    return replace(Settings(), **values)


def endpoint_description(settings: Settings, port: str | None = None) -> str:
    """The Twisted server endpoint string for ``port`` (default: the WebSocket port)."""
    port = (settings.port if port is None else port).strip()
    if port.isdigit():
        interface = settings.interface.replace(":", "\\:")
        return f"tcp:{port}:interface={interface}"
    return port


#: Endpoint types that take a ``backlog`` (Twisted's default is 50).
_QUEUED = ("tcp:", "tcp6:", "ssl:", "unix:")


def listen_description(settings: Settings, port: str | None = None) -> str:
    """:func:`endpoint_description` with ``listen_backlog``, unless the
    string gives its own backlog or its type takes none: what to listen with.
    (Messages name the endpoint as configured.)"""
    description = endpoint_description(settings, port)
    backlog = settings.listen_backlog
    if backlog > 0 and description.startswith(_QUEUED) and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description
