"""Authentication with signed tokens (JWT) and the channel permissions they grant.

A policy between a transport and the command table, never inside the engine:
a transport gives each connection a :class:`Guard` when authentication is
configured.  The command layer asks the session's guard whether the client
has authenticated before it runs a command (Redis's ``NOAUTH``), and AUTH
(and RESP's HELLO) log it in (see :func:`pubsub.core.commands.execute`).
The rest is :class:`Tokens`, the port's middleware: the handshake's token
when a client connects, and the channel permissions a token grants.

Tokens are JWTs checked by PyJWT: HS256 with a shared secret
(``jwt_secret``), RS256 or ES256 with a public key file (``jwt_public_key``).
A token must carry ``sub`` and ``exp``; its ``subscribe`` and ``publish``
claims are lists of Redis glob patterns, like the ``&pattern`` rules of a
Redis ACL user:

* SUBSCRIBE and SSUBSCRIBE need every channel to match a ``subscribe`` glob;
  PUBLISH and SPUBLISH need the channel to match a ``publish`` glob.
* PSUBSCRIBE needs each pattern to be one of the ``subscribe`` globs,
  character for character, or the globs to hold ``*`` (all channels): a
  pattern can only be allowed when every channel it could match is, and
  Redis decides that the same way.
* A claim that is absent allows nothing, as a new Redis 7 user has no
  channels (``acl-pubsub-default resetchannels``).

The engine stays unaware of all this; nothing here touches sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from pubsub.core.commands import AuthError
from pubsub.core.glob import compile_pattern
from pubsub.core.vocabulary import CLOSE_TOKEN, Kind
from pubsub.operations.config import ConfigError
from pubsub.policy.hooks import Client, Middleware, Refused

__all__ = ["AuthError", "Authenticator", "Grant", "Guard", "Tokens"]

_NOAUTH = "NOAUTH Authentication required."

#: Commands a client may send before it has authenticated, as Redis allows
#: AUTH, HELLO, QUIT and RESET (HELLO checks for itself).
_BEFORE_AUTH = frozenset({"auth", "hello", "quit", "reset"})


class _Globs:
    """One claim's list of patterns, and what it allows."""

    __slots__ = ("_everything", "_literal", "_matchers")

    def __init__(self, globs: Sequence[bytes]) -> None:
        self._literal = frozenset(globs)
        self._everything = b"*" in self._literal
        self._matchers = [compile_pattern(glob) for glob in globs]

    def allows_channel(self, channel: bytes) -> bool:
        return self._everything or any(matcher(channel) for matcher in self._matchers)

    def allows_pattern(self, pattern: bytes) -> bool:
        return self._everything or pattern in self._literal


@dataclass(frozen=True)
class Grant:
    """What one verified token allows: its subject, its expiry, its globs."""

    subject: str
    expires: float
    subscribe: tuple[bytes, ...] = ()
    publish: tuple[bytes, ...] = ()
    #: Every claim of the token, for middlewares (``Client.claims``).
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_subscribe", _Globs(self.subscribe))
        object.__setattr__(self, "_publish", _Globs(self.publish))

    def allows(self, claim: str, name: bytes, is_pattern: bool = False) -> bool:
        """Whether ``claim`` ("subscribe" or "publish") covers ``name``."""
        globs: _Globs = getattr(self, "_" + claim)
        return globs.allows_pattern(name) if is_pattern else globs.allows_channel(name)


def _glob_claim(claims: dict[str, Any], name: str) -> tuple[bytes, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AuthError(f"claim {name} must be a list of strings")
    return tuple(item.encode("utf-8") for item in value)


def _load_public_key(path: str) -> tuple[Any, str]:
    """The key in a PEM file and the one algorithm it verifies."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"setting jwt_public_key: cannot read {path}: {error.strerror}") from None
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise ConfigError(
            f"setting jwt_public_key: {path} holds no PEM public key (BEGIN PUBLIC KEY)"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return key, "ES256"
    raise ConfigError(
        f"setting jwt_public_key: {path} must hold an RSA key (RS256) or a P-256 key (ES256)"
    )


class Authenticator:
    """Checks tokens under the server's settings; shared by every connection.

    ``required`` says whether a client must authenticate before any other
    command (setting ``anonymous``).
    """

    def __init__(
        self,
        secret: str = "",
        public_key_file: str = "",
        audience: str = "",
        issuer: str = "",
        anonymous: str = "",
    ) -> None:
        self._keys: dict[str, Any] = {}
        if secret:
            if len(secret.encode("utf-8")) < 32:
                # RFC 7518 3.2: an HS256 key shorter than the hash is guessable.
                raise ConfigError("setting jwt_secret must be at least 32 bytes long")
            self._keys["HS256"] = secret
        if public_key_file:
            key, algorithm = _load_public_key(public_key_file)
            self._keys[algorithm] = key
        if anonymous not in ("", "allow", "deny"):
            raise ConfigError(f"setting anonymous must be allow, deny or empty, got {anonymous!r}")
        if anonymous == "deny" and not self._keys:
            raise ConfigError(
                "setting anonymous is deny but no jwt_secret or jwt_public_key is set: "
                "no client could ever connect"
            )
        self.required = anonymous == "deny" or (anonymous == "" and bool(self._keys))
        #: Tokens refused since start-up (the metrics' auth failures).
        self.failures = 0
        self._audience = audience or None
        self._issuer = issuer or None

    @classmethod
    def from_settings(cls, settings: Any) -> Authenticator | None:
        """The settings' authenticator, or None when tokens are not in use."""
        if not (settings.jwt_secret or settings.jwt_public_key or settings.anonymous == "deny"):
            cls(anonymous=settings.anonymous)  # still refuse a bad value
            return None
        return cls(
            settings.jwt_secret,
            settings.jwt_public_key,
            settings.jwt_audience,
            settings.jwt_issuer,
            settings.anonymous,
        )

    def verify(self, token: str | bytes, now: float) -> Grant:
        """The grant a token carries; raises :class:`AuthError` saying why not."""
        if not self._keys:
            raise AuthError("no token can be checked: the server has no JWT key configured")
        try:
            # The unverified header is the token's own JSON: "alg" may be
            # absent or any value; only one of our keys' names finds a key.
            algorithm: Any = jwt.get_unverified_header(token).get("alg")
            key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
            if key is None:
                expected = " or ".join(sorted(self._keys))
                raise AuthError(f"token signed with {algorithm}, expected {expected}")
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub"], "verify_exp": False},
            )
        except jwt.InvalidTokenError as error:
            raise AuthError(f"invalid token: {error}") from None
        expires = claims["exp"]
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            raise AuthError("claim exp must be a number")
        if expires <= now:
            # Against the server's clock, which also times the expiry close.
            raise AuthError("token has expired")
        subject = claims["sub"]
        if not isinstance(subject, str):
            raise AuthError("claim sub must be a string")
        return Grant(
            subject,
            float(expires),
            _glob_claim(claims, "subscribe"),
            _glob_claim(claims, "publish"),
            claims,
        )


class Guard:
    """One connection's authentication: its grant, and the check run before
    each command.

    ``revoke`` is called with a reason when the connection must end: its
    token expired without a renewing AUTH, a renewing token no longer allows
    what it holds, or it never authenticated in time.  The transport closes
    the connection (WebSocket: close code 4001, ``vocabulary.CLOSE_TOKEN``).
    """

    def __init__(
        self, authenticator: Authenticator, clock: Any, revoke: Callable[[str], None]
    ) -> None:
        self._authenticator = authenticator
        self._clock = clock
        self._revoke = revoke
        self._timer: Any = None
        #: The token's grant; None while anonymous.
        self.grant: Grant | None = None

    @property
    def authenticated(self) -> bool:
        return self.grant is not None or not self._authenticator.required

    def expect_login(self, within: float) -> None:
        """Close the connection if it has not authenticated ``within`` seconds
        (when authentication is required; 0: no deadline)."""
        if within and not self.authenticated:
            self._schedule(within, "authentication required")

    def login(self, token: str | bytes, username: bytes | None = None, session: Any = None) -> None:
        """Take a token (the handshake's, or AUTH's); raises AuthError.

        ``username``, when given (Redis's two-argument AUTH), must be the
        token's subject or "default".  When the connection already holds
        subscriptions (a renewing AUTH), the new token must allow every one:
        Redis disconnects a client whose user loses a channel it is
        subscribed to, and so does this server, once the error is sent.
        """
        authenticator = self._authenticator
        try:
            grant = authenticator.verify(token, self._clock.seconds())
            if username not in (None, b"default", grant.subject.encode("utf-8")):
                raise AuthError("the user name is not the token's subject")
            lost = None if session is None else _first_lost(grant, session)
            if lost is not None:
                self._schedule(0, f"token does not allow {lost}")
                raise AuthError(f"the new token does not allow {lost}, which this client holds")
        except AuthError:
            authenticator.failures += 1
            raise
        self.grant = grant
        self._schedule(grant.expires - self._clock.seconds(), "token expired")

    def logout(self) -> None:
        """Back to anonymous (RESP's RESET)."""
        self.grant = None
        self._cancel()

    def _schedule(self, delay: float, reason: str) -> None:
        self._cancel()
        self._timer = self._clock.callLater(max(delay, 0), self._end, reason)

    def _end(self, reason: str) -> None:
        self._timer = None
        self.grant = None
        self._revoke(reason)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close(self) -> None:
        """The connection has ended: forget its timer."""
        self._cancel()

    def check(self, name: str) -> str | None:
        """The error text for the command called ``name`` when this
        connection may not run it before it authenticates, or None."""
        if self.authenticated or name in _BEFORE_AUTH:
            return None
        return _NOAUTH


class Tokens(Middleware):
    """Tokens, as a port's middleware (when a JWT key or ``anonymous deny``
    is set): the token a WebSocket client gives in its URL
    (``?token=``), checked when it connects, a bad one closing it with 4001;
    the time a client has to authenticate; and the channel permissions of a
    client's token, checked for each name it subscribes to or publishes on,
    as a Redis ACL checks its ``&pattern`` rules.  An anonymous client (with
    ``anonymous allow``) may use any channel.
    """

    def __init__(self, login_within: float) -> None:
        self._login_within = login_within

    def on_connect(self, client: Client) -> None:
        guard: Guard = client._guard
        tokens = client.params.get("token")
        if tokens:
            try:
                guard.login(tokens[0])
            except AuthError as error:
                raise Refused(str(error), close_code=CLOSE_TOKEN) from None
        guard.expect_login(self._login_within)

    def on_subscribe(self, client: Client, kind: Kind, name: bytes) -> None:
        grant = client._guard.grant
        if grant is not None and not grant.allows("subscribe", name, kind is Kind.PATTERN):
            raise Refused(_noperm(grant, name))

    def on_publish(self, client: Client, kind: Kind, channel: bytes, payload: bytes) -> None:
        grant = client._guard.grant
        if grant is not None and not grant.allows("publish", channel):
            raise Refused(_noperm(grant, channel))


def _noperm(grant: Grant, channel: bytes) -> str:
    # Redis 7.2's wording, which names the user and the channel (the error
    # code, NOPERM, is the refusal's default).
    text = channel.decode("utf-8", "replace").replace("\r", " ").replace("\n", " ")
    return f"User {grant.subject} has no permissions to access the '{text}' channel"


def _first_lost(grant: Grant, session: Any) -> str | None:
    """A subscription the session holds that ``grant`` would not allow."""
    engine, client_id = session.engine, session.client_id
    for kind, what in (
        (Kind.CHANNEL, "channel"),
        (Kind.SHARD, "shard channel"),
        (Kind.PATTERN, "pattern"),
    ):
        for name in engine.held(client_id, kind):
            if not grant.allows("subscribe", name, kind is Kind.PATTERN):
                return f"{what} '{name.decode('utf-8', 'replace')}'"
    return None
