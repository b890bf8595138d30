"""Tokens, permissions and their enforcement on both transports (Clock-driven)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.task import Clock

from pubsub.core.engine import Engine
from pubsub.core.vocabulary import CLOSE_TOKEN
from pubsub.operations.config import ConfigError, Settings
from pubsub.policy.auth import Authenticator, AuthError, Grant, Guard
from pubsub.resp.protocol import RespFactory
from tests.support.clocked import websocket_factory
from tests.support.wsframes import CLOSE, command
from tests.unit import test_resp as resp
from tests.unit.test_websocket import Connection

SECRET = "a shared secret that is long enough for HS256, HS384 and even HS512"


def token(
    sub: str = "alice",
    exp: float = 3600,
    key: object = SECRET,
    algorithm: str = "HS256",
    **claims: object,
) -> str:
    return jwt.encode({"sub": sub, "exp": exp, **claims}, key, algorithm=algorithm)


def pem_file(tmp_path, private_key) -> str:
    path = tmp_path / "key.pem"
    path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return str(path)


# -- verifying tokens ---------------------------------------------------------------------


def test_an_hs256_token_grants_its_subject_expiry_and_globs():
    grant = Authenticator(SECRET).verify(
        token(subscribe=["news.*", "chat"], publish=["chat"]), now=0
    )
    assert grant == Grant("alice", 3600.0, (b"news.*", b"chat"), (b"chat",))


def _with_header(header: dict) -> str:
    """A token signed with SECRET whose header is ``header``, as sent."""

    def part(value: object) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    signed = part(header) + b"." + part({"sub": "alice", "exp": 3600})
    signature = hmac.new(SECRET.encode(), signed, hashlib.sha256).digest()
    return (signed + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


@pytest.mark.parametrize(
    "bad, reason",
    [
        (token(key=SECRET.upper()), "Signature verification"),
        (token(exp=10), "token has expired"),
        (jwt.encode({"exp": 3600}, SECRET, algorithm="HS256"), 'missing the "sub" claim'),
        (jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"), 'missing the "exp" claim'),
        (token(sub=7), "Subject must be a string"),
        (token(subscribe="news"), "claim subscribe must be a list of strings"),
        (token(publish=[1]), "claim publish must be a list of strings"),
        (token(algorithm="HS512"), "token signed with HS512, expected HS256"),
        ("not.a.token", "invalid token"),
        ("", "invalid token"),
        # A header's alg of any JSON type, unhashable ones included.
        (_with_header({"alg": []}), r"token signed with \[\], expected HS256"),
        (_with_header({"alg": {"x": 1}}), "token signed with"),
        (_with_header({"alg": None}), "token signed with None"),
    ],
)
def test_a_bad_token_is_refused_saying_why(bad, reason):
    with pytest.raises(AuthError, match=reason):
        Authenticator(SECRET).verify(bad, now=20)


def test_audience_and_issuer_are_checked_when_set():
    authenticator = Authenticator(SECRET, audience="pubsub", issuer="https://id.example")
    good = token(aud="pubsub", iss="https://id.example")
    assert authenticator.verify(good, now=0).subject == "alice"
    with pytest.raises(AuthError, match="Audience doesn't match"):
        authenticator.verify(token(aud="other", iss="https://id.example"), now=0)
    with pytest.raises(AuthError, match="Invalid issuer"):
        authenticator.verify(token(aud="pubsub", iss="https://evil.example"), now=0)


@pytest.mark.parametrize(
    "private_key, algorithm",
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
)
def test_public_key_tokens(tmp_path, private_key, algorithm):
    authenticator = Authenticator(public_key_file=pem_file(tmp_path, private_key))
    assert authenticator.required
    good = token(key=private_key, algorithm=algorithm)
    assert authenticator.verify(good, now=0).subject == "alice"
    # The public key is not an HMAC secret: a token "signed" with it as one
    # (the algorithm confusion attack) names an algorithm the server refuses.
    forged = jwt.encode({"sub": "mallory", "exp": 3600}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match=f"token signed with HS256, expected {algorithm}"):
        authenticator.verify(forged, now=0)


def test_a_bad_public_key_file_is_a_clear_settings_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        Authenticator(public_key_file=str(tmp_path / "absent.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="holds no PEM public key"):
        Authenticator(public_key_file=str(junk))
    other = pem_file(tmp_path, ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(ConfigError, match="must hold an RSA key"):
        Authenticator(public_key_file=other)


def test_a_short_secret_is_refused():
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Authenticator("secret")


def test_anonymous_setting():
    assert Authenticator.from_settings(Settings()) is None
    assert Authenticator.from_settings(Settings(jwt_secret=SECRET)).required
    assert not Authenticator.from_settings(Settings(jwt_secret=SECRET, anonymous="allow")).required
    with pytest.raises(ConfigError, match="no client could ever connect"):
        Authenticator.from_settings(Settings(anonymous="deny"))
    with pytest.raises(ConfigError, match="allow, deny or empty"):
        Authenticator.from_settings(Settings(anonymous="maybe"))


# -- what a grant allows ------------------------------------------------------------------


def test_channels_match_the_globs_and_patterns_must_be_listed_as_redis_acl_does():
    grant = Grant("a", 1, subscribe=(b"news.*", b"chat"), publish=())
    assert grant.allows("subscribe", b"news.sport")
    assert grant.allows("subscribe", b"chat")
    assert not grant.allows("subscribe", b"chatter")
    assert grant.allows("subscribe", b"news.*", is_pattern=True)
    assert not grant.allows("subscribe", b"news.s*", is_pattern=True)  # narrower, but not listed
    assert not grant.allows("subscribe", b"*", is_pattern=True)
    assert not grant.allows("publish", b"chat")  # an absent claim allows nothing
    everything = Grant("a", 1, subscribe=(b"*",))
    assert everything.allows("subscribe", b"[anything]*", is_pattern=True)


# -- a guard on the clock -----------------------------------------------------------------


class Revoked(list):
    def __call__(self, reason: str) -> None:
        self.append(reason)


def test_the_guard_ends_the_connection_when_the_token_expires_unless_renewed():
    clock, revoked = Clock(), Revoked()
    guard = Guard(Authenticator(SECRET), clock, revoked)
    assert guard.check("subscribe") == "NOAUTH Authentication required."
    assert guard.check("auth") is None
    guard.login(token(exp=100, subscribe=["*"]))
    clock.advance(90)
    guard.login(token(exp=200, subscribe=["*"]))  # renewed in time
    clock.advance(20)
    assert revoked == []
    clock.advance(90)
    assert revoked == ["token expired"]
    assert guard.check("subscribe") == "NOAUTH Authentication required."


def test_a_client_that_must_authenticate_and_does_not_is_cut_off():
    clock, revoked = Clock(), Revoked()
    guard = Guard(Authenticator(SECRET), clock, revoked)
    guard.expect_login(10)
    clock.advance(10)
    assert revoked == ["authentication required"]
    in_time = Guard(Authenticator(SECRET), clock, revoked)
    in_time.expect_login(10)
    in_time.login(token(exp=clock.seconds() + 3600))
    clock.advance(10)
    assert revoked == ["authentication required"]


def test_failures_are_counted_on_the_authenticator():
    authenticator = Authenticator(SECRET)
    guard = Guard(authenticator, Clock(), Revoked())
    for bad in ("junk", token(exp=-1)):
        with pytest.raises(AuthError):
            guard.login(bad)
    with pytest.raises(AuthError, match="user name is not the token's subject"):
        guard.login(token(), username=b"bob")
    guard.login(token(), username=b"alice")
    guard.login(token(), username=b"default")
    assert authenticator.failures == 3


# -- the WebSocket transport --------------------------------------------------------------


@pytest.fixture
def ws_factory(clock):
    def make(**settings):
        settings = {"ping_interval": 0, **settings}  # the tests advance the clock by minutes
        factory = websocket_factory(clock, jwt_secret=SECRET, **settings)
        return factory

    return make


def ws_connect(factory, query: str = "") -> Connection:
    return Connection(factory, path="/" + query)


def close_frame(connection: Connection) -> tuple[int, str]:
    frames = connection.frames()
    assert frames and frames[-1][0] == CLOSE, frames
    payload = frames[-1][1]
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8")


def test_websocket_token_in_the_url_grants_its_channels(ws_factory):
    factory = ws_factory()
    alice = ws_connect(factory, "?token=" + token(subscribe=["news.*"], publish=["news.*"]))
    assert alice.response.startswith(b"HTTP/1.1 101")
    assert alice.call("SUBSCRIBE", "news.a") == [["subscribe", "news.a", 1]]
    assert alice.call("SUBSCRIBE", "news.b", "secret", "news.c") == [
        ["error", "NOPERM User alice has no permissions to access the 'secret' channel"]
    ]
    assert alice.call("PSUBSCRIBE", "news.*") == [["psubscribe", "news.*", 2]]
    assert alice.call("PSUBSCRIBE", "*") == [
        ["error", "NOPERM User alice has no permissions to access the '*' channel"]
    ]
    assert alice.call("PUBLISH", "news.a", "hi") == [
        ["message", "news.a", "hi"],
        ["pmessage", "news.*", "news.a", "hi"],
        ["reply", 2],
    ]
    assert alice.call("PUBLISH", "other", "x")[0][1].startswith("NOPERM")
    assert alice.call("PUBSUB", "NUMSUB", "news.a") == [["reply", ["news.a", 1]]]
    assert factory.errors["auth"] == 3


def test_websocket_without_a_token_must_auth_first(ws_factory, clock):
    factory = ws_factory()
    client = ws_connect(factory)
    assert client.call("SUBSCRIBE", "x") == [["error", "NOAUTH Authentication required."]]
    assert client.call("AUTH", "junk")[0][1].startswith("WRONGPASS invalid token")
    assert client.call("AUTH", token(exp=clock.seconds() + 60, subscribe=["x"])) == [
        ["reply", "OK"]
    ]
    assert client.call("SUBSCRIBE", "x") == [["subscribe", "x", 1]]
    assert factory.authenticator.failures == 1
    # Renewed before it expires, the connection lives on; not renewed, it ends.
    clock.advance(50)
    assert client.call("AUTH", token(exp=clock.seconds() + 60, subscribe=["x"])) == [
        ["reply", "OK"]
    ]
    clock.advance(59)
    assert client.frames() == []
    clock.advance(1)
    assert close_frame(client) == (CLOSE_TOKEN, "token expired")
    assert factory.engine.client_count == 0


def test_websocket_bad_token_in_the_url_closes_with_the_token_code_and_the_reason(ws_factory):
    factory = ws_factory()
    client = ws_connect(factory, "?token=" + token(exp=-5))
    assert client.response.startswith(b"HTTP/1.1 101")
    assert close_frame(client) == (CLOSE_TOKEN, "token has expired")
    assert factory.engine.client_count == 0
    assert factory.authenticator.failures == 1


def test_websocket_client_that_never_authenticates_is_closed_after_the_handshake_timeout(
    ws_factory, clock
):
    factory = ws_factory(open_handshake_timeout=5)
    client = ws_connect(factory)
    clock.advance(5)
    assert close_frame(client) == (CLOSE_TOKEN, "authentication required")


def test_websocket_anonymous_allowed_clients_may_do_anything_token_holders_what_it_says(
    ws_factory,
):
    factory = ws_factory(anonymous="allow")
    anonymous = ws_connect(factory)
    assert anonymous.call("SUBSCRIBE", "x") == [["subscribe", "x", 1]]
    holder = ws_connect(factory, "?token=" + token(subscribe=["y"]))
    assert holder.call("SUBSCRIBE", "x")[0][1].startswith("NOPERM")


def test_websocket_renewing_with_a_token_that_drops_a_held_channel_closes(ws_factory, clock):
    factory = ws_factory()
    client = ws_connect(factory, "?token=" + token(subscribe=["a", "b"]))
    client.call("SUBSCRIBE", "a", "b")
    client.send(command("AUTH", token(subscribe=["a"])))
    error, close = client.frames()
    assert json.loads(error[1]) == [
        "error",
        "WRONGPASS the new token does not allow channel 'b', which this client holds",
    ]
    assert close == (CLOSE, CLOSE_TOKEN.to_bytes(2, "big") + b"token does not allow channel 'b'")
    assert factory.engine.client_count == 0


def test_a_long_reason_is_cut_to_fit_a_close_frame(ws_factory):
    factory = ws_factory()
    client = ws_connect(factory, "?token=" + "x" * 400)
    code, reason = close_frame(client)
    assert code == CLOSE_TOKEN and reason.startswith("invalid token")
    assert len(reason.encode("utf-8")) <= 123


# -- the RESP transport -------------------------------------------------------------------


@pytest.fixture
def resp_factory(clock):
    return RespFactory(Engine(), Settings(jwt_secret=SECRET), reactor=clock)


def test_resp_auth_with_a_token_and_with_user_and_token(resp_factory):
    client = resp.Client(resp_factory)
    assert client.call("SUBSCRIBE", "x") == resp.error("NOAUTH Authentication required.")
    assert client.call("PING") == resp.error("NOAUTH Authentication required.")
    assert client.call("HELLO", "3").startswith(b"-NOAUTH HELLO must be called")
    assert client.call("AUTH", token(subscribe=["x"])) == b"+OK\r\n"
    assert client.call("SUBSCRIBE", "x") == resp.confirm("subscribe", "x", 1)
    assert client.call("SUBSCRIBE", "y") == resp.error(
        "NOPERM User alice has no permissions to access the 'y' channel"
    )
    # A RESP2 subscriber may renew its token, which Redis never needs.
    assert client.call("AUTH", "alice", token(subscribe=["x"])) == b"+OK\r\n"
    assert client.call("AUTH", "bob", token()) == resp.error(
        "WRONGPASS the user name is not the token's subject"
    )
    other = resp.Client(resp_factory)
    reply = other.call("HELLO", "3", "AUTH", "default", token(publish=["x"]))
    assert reply.startswith(b"%7")
    assert other.call("PUBLISH", "x", "hi") == b":1\r\n"
    assert client.output() == resp.message("x", "hi")


def test_resp_reset_forgets_the_token_and_expiry_closes(resp_factory, clock):
    client = resp.Client(resp_factory)
    client.call("AUTH", token(exp=30, subscribe=["x"]))
    assert client.call("RESET") == b"+RESET\r\n"
    assert client.call("SUBSCRIBE", "x") == resp.error("NOAUTH Authentication required.")
    client.call("AUTH", token(exp=30, subscribe=["x"]))
    clock.advance(30)
    assert client.closing
    client.lose()
    assert resp_factory.engine.client_count == 0


def test_a_resp_client_that_quits_leaves_no_expiry_timer_behind(resp_factory, clock):
    """QUIT leaves the engine before the connection is lost; the token's timer
    (and the connection it holds) must go with the connection all the same."""
    client = resp.Client(resp_factory)
    client.call("AUTH", token(exp=3600, subscribe=["x"]))
    assert clock.getDelayedCalls() != []
    assert client.call("QUIT") == b"+OK\r\n"
    client.lose()
    assert clock.getDelayedCalls() == []


def test_without_tokens_auth_behaves_as_redis_without_a_password(clock):
    factory = RespFactory(Engine(), Settings(), reactor=clock)
    client = resp.Client(factory)
    assert client.call("AUTH", "default", "anything") == b"+OK\r\n"
    assert client.call("AUTH", "x").startswith(b"-ERR AUTH <password> called without")
    assert client.call("PING") == b"+PONG\r\n"
