"""Tokens and channel permissions over real sockets, with real clients."""

from __future__ import annotations

import time

import jwt
import pytest
import pytest_twisted
import redis

from pubsub.core.vocabulary import CLOSE_TOKEN
from tests.integration.test_metrics import figure, scrape
from tests.integration.test_resp import in_thread, next_message, redis_py

SECRET = "the tests' shared secret, long enough for HS256 (32 bytes)"


def token(sub: str = "alice", lifetime: float = 3600, **claims: object) -> str:
    return jwt.encode(
        {"sub": sub, "exp": time.time() + lifetime, **claims}, SECRET, algorithm="HS256"
    )


@pytest.fixture
def auth_server(make_server):
    return pytest_twisted.blockon(make_server(resp=True, jwt_secret=SECRET))


@pytest_twisted.inlineCallbacks
def test_websocket_clients_get_what_their_tokens_allow(auth_server, connect):
    port = auth_server.port
    reader = yield connect(port, "/?token=" + token("reader", subscribe=["news.*"]))
    writer = yield connect(port, "/?token=" + token("writer", publish=["news.*"]))
    assert (yield reader.call("SUBSCRIBE", "news.sport")) == [["subscribe", "news.sport", 1]]
    assert (yield reader.call("PUBLISH", "news.sport", "x")) == [
        ["error", "NOPERM User reader has no permissions to access the 'news.sport' channel"]
    ]
    assert (yield writer.call("PUBLISH", "news.sport", "goal")) == [["reply", 1]]
    assert (yield reader.next_frame()) == ["message", "news.sport", "goal"]
    assert (yield writer.call("SUBSCRIBE", "news.sport"))[0][1].startswith("NOPERM")

    anonymous = yield connect(port)
    anonymous.send("PUBLISH", "news.sport", "x")  # not call(): its PING would be refused too
    assert (yield anonymous.next_frame()) == ["error", "NOAUTH Authentication required."]
    anonymous.send("AUTH", token(publish=["*"]))
    assert (yield anonymous.next_frame()) == ["reply", "OK"]
    assert (yield anonymous.call("PUBLISH", "news.sport", "y")) == [["reply", 1]]


@pytest_twisted.inlineCallbacks
def test_a_bad_token_closes_with_the_token_code_and_is_counted(auth_server, connect):
    client = yield connect(auth_server.port, "/?token=forged")
    _, code, reason = yield client.closed
    assert code == CLOSE_TOKEN
    assert reason.startswith("invalid token")
    samples = yield scrape(auth_server.port)
    assert figure(samples, "pubsub_auth_failures_total", transport="websocket") == 1


@pytest_twisted.inlineCallbacks
def test_an_expiring_token_closes_the_connection_unless_renewed(auth_server, connect):
    port = auth_server.port
    renewed = yield connect(port, "/?token=" + token(lifetime=1.0, subscribe=["x"]))
    lapsing = yield connect(port, "/?token=" + token(lifetime=1.0, subscribe=["x"]))
    yield lapsing.call("SUBSCRIBE", "x")
    assert (yield renewed.call("AUTH", token(lifetime=60, subscribe=["x"]))) == [["reply", "OK"]]
    _, code, reason = yield lapsing.closed
    assert (code, reason) == (CLOSE_TOKEN, "token expired")
    assert (yield renewed.call("SUBSCRIBE", "x")) == [["subscribe", "x", 1]]
    assert auth_server.engine.numsub([b"x"]) == [(b"x", 1)]


def _redis_py_scenario(port: int) -> None:
    with redis_py(port, 2) as nobody, pytest.raises(redis.exceptions.AuthenticationError):
        nobody.publish("news", "x")
    subscriber = redis_py(port, 3, username="alice", password=token(subscribe=["news"]))
    publisher = redis_py(port, 2, password=token("bob", publish=["news"]))
    try:
        pubsub = subscriber.pubsub()
        pubsub.subscribe("news")
        assert next_message(pubsub, "subscribe")["channel"] == b"news"
        with pytest.raises(redis.exceptions.NoPermissionError, match="'other' channel"):
            pubsub.subscribe("other")
            next_message(pubsub, "subscribe")
        assert publisher.publish("news", "hello") == 1
        assert next_message(pubsub)["data"] == b"hello"
        with pytest.raises(redis.exceptions.NoPermissionError):
            publisher.publish("elsewhere", "x")
        pubsub.close()
    finally:
        subscriber.close()
        publisher.close()


@pytest_twisted.inlineCallbacks
def test_redis_py_authenticates_with_a_token_as_its_password(auth_server):
    yield in_thread(_redis_py_scenario, auth_server.resp_port)
    assert auth_server.resp_factory.authenticator.failures == 0
