"""pubsub.client against a real server: the Twisted host on the test's reactor,
the asyncio host on a loop of its own in a worker thread.

Reconnects are forced by the server: ``close_all`` (every connection told
1001), or by stopping the listener and listening again on the same port.
Tokens are real JWTs checked by a server with ``jwt_secret``; expiring ones
live 1.5 s, and the tests wait for the close that ends them.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, ssl, threads
from twisted.internet.endpoints import serverFromString
from twisted.web.server import Site

from pubsub.client import CLOSED, CONNECTED, DISCONNECTED, Message, ReplyError, TokenRefused
from pubsub.client import asyncio as aio
from pubsub.client.twisted import connect
from pubsub.core.engine import Engine
from pubsub.operations.config import Settings
from pubsub.operations.service import build_resource
from pubsub.web.front import FrontFactory
from tests.integration.test_auth import SECRET, token
from tests.integration.test_tls import make_certificate

WAIT = 30  # seconds; a bound on hangs, never a delay
SHORT = 1.5  # seconds: the lifetime of a token meant to expire during a test


def url(server) -> str:
    return f"ws://127.0.0.1:{server.port}/"


@pytest.fixture
def open_client():
    """pubsub.client.twisted.connect, every client closed after the test."""
    clients = []

    @defer.inlineCallbacks
    def open_(*args, **kwargs):
        kwargs.setdefault("min_delay", 0.01)
        kwargs.setdefault("max_delay", 0.05)
        client = yield connect(*args, **kwargs)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        pytest_twisted.blockon(client.close())


def state_reached(client, wanted: str) -> defer.Deferred:
    """Fires with the reason when ``client`` next enters state ``wanted``."""
    d = defer.Deferred()

    def changed(state, reason):
        if state == wanted and not d.called:
            remove()
            d.callback(reason)

    remove = client.on_state(changed)
    return d.addTimeout(WAIT, reactor)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.inlineCallbacks
def test_subscribe_publish_and_pubsub_queries(server, open_client):
    alice = yield open_client(url(server))
    bob = yield open_client(url(server))
    news, everything = defer.DeferredQueue(), defer.DeferredQueue()
    alice.on_message(everything.put)
    assert (yield alice.subscribe("news", "sport", handler=news.put)) == 2
    assert (yield alice.psubscribe("n*")) == 3
    assert (yield bob.publish("news", "hello")) == 2
    assert (yield news.get()) == Message("message", "news", "hello")
    assert (yield everything.get()) == Message("message", "news", "hello")
    assert (yield everything.get()) == Message("pmessage", "news", "hello", "n*")
    assert (yield bob.pubsub_channels()) == ["news", "sport"]
    assert (yield bob.pubsub_channels("s*")) == ["sport"]
    assert (yield bob.pubsub_numsub("news", "nobody")) == {"news": 1, "nobody": 0}
    assert (yield bob.pubsub_numpat()) == 1
    assert (yield bob.ping()) == ""
    assert (yield bob.ping("are you there?")) == "are you there?"
    # Everything held goes with one UNSUBSCRIBE; the count left is the pattern.
    assert (yield alice.unsubscribe()) == 1
    assert (yield alice.punsubscribe()) == 0
    assert (yield bob.publish("news", "nobody hears")) == 0


@pytest_twisted.inlineCallbacks
def test_shard_channels_and_bytes_payloads(server, open_client):
    alice = yield open_client(url(server))
    received = defer.DeferredQueue()
    assert (yield alice.ssubscribe("orders:{42}", handler=received.put)) == 1
    assert (yield alice.subscribe("bin", handler=received.put)) == 1
    assert (yield alice.spublish("orders:{42}", "shipped")) == 1
    assert (yield received.get()) == Message("smessage", "orders:{42}", "shipped")
    assert (yield alice.publish("bin", b"\x00\xff")) == 1
    assert (yield received.get()) == Message("message", "bin", b"\x00\xff")
    # Bytes that are UTF-8 arrive as text: the wire depends on the bytes only.
    assert (yield alice.publish("bin", "é".encode())) == 1
    assert (yield received.get()) == Message("message", "bin", "é")
    assert (yield alice.sunsubscribe("orders:{42}")) == 0


@pytest_twisted.inlineCallbacks
def test_a_refused_command_fails_with_the_server_s_error_and_the_client_goes_on(
    make_server, open_client
):
    server = yield make_server(max_subscriptions=1)
    client = yield open_client(url(server))
    with pytest.raises(ReplyError, match="subscription limit") as refused:
        yield client.subscribe("a", "b")
    assert refused.value.code == "ERR"
    with pytest.raises(ValueError, match="at least one"):
        yield client.subscribe()
    assert (yield client.subscribe("a")) == 1


@pytest_twisted.inlineCallbacks
def test_reconnects_and_subscribes_again_after_the_server_drops_everyone(server, open_client):
    alice = yield open_client(url(server))
    bob = yield open_client(url(server), reconnect=False)
    received = defer.DeferredQueue()
    yield alice.subscribe("news", handler=received.put)
    yield alice.psubscribe("n*")
    lost, back = state_reached(alice, DISCONNECTED), state_reached(alice, CONNECTED)
    bob_closed = state_reached(bob, CLOSED)
    yield server.factory.close_all()
    assert "1001" in (yield lost)
    yield back
    # Without reconnect, a client stays closed and says so on every command.
    assert "server shutting down" in (yield bob_closed)
    with pytest.raises(ConnectionError, match="not connected"):
        yield bob.publish("news", "x")
    # The resubscriptions went out ahead of this PING, so its pong means done.
    yield alice.ping()
    carol = yield open_client(url(server))
    assert (yield carol.pubsub_numsub("news")) == {"news": 1}
    assert (yield carol.publish("news", "again")) == 2
    assert (yield received.get()) == Message("message", "news", "again")


@pytest_twisted.inlineCallbacks
def test_keeps_retrying_while_the_port_is_closed_then_comes_back(server, open_client):
    alice = yield open_client(url(server))
    yield alice.subscribe("news")
    port = server.port
    retried = defer.Deferred()
    reasons = []

    def changed(state, reason):
        reasons.append((state, reason))
        # The second loss in a row is a failed attempt: the port is closed.
        if len([s for s, _ in reasons if s == DISCONNECTED]) == 2 and not retried.called:
            retried.callback(reason)

    alice.on_state(changed)
    yield server.listening.stopListening()
    yield server.factory.close_all()
    assert "cannot connect" in (yield retried.addTimeout(WAIT, reactor))
    back = state_reached(alice, CONNECTED)
    endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
    server.listening = yield endpoint.listen(FrontFactory(Site(server.resource)))
    yield back
    yield alice.ping()
    assert server.engine.numsub([b"news"]) == [(b"news", 1)]


@pytest_twisted.inlineCallbacks
def test_an_unreachable_server_fails_connect_with_the_url_and_reason():
    target = f"ws://127.0.0.1:{free_port()}/"
    with pytest.raises(ConnectionError, match=f"cannot connect to {target}: .*refused"):
        yield connect(target)


@pytest_twisted.inlineCallbacks
def test_wss_with_a_trusted_self_signed_certificate(tmp_path, open_client):
    key_path, cert_path, pem = make_certificate(tmp_path)
    resource = build_resource(Engine(), Settings())
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    )
    port = yield endpoint.listen(FrontFactory(Site(resource)))
    tls = ssl.optionsForClientTLS("127.0.0.1", trustRoot=ssl.Certificate.loadPEM(pem))
    try:
        secure = f"wss://127.0.0.1:{port.getHost().port}/"
        client = yield open_client(secure, tls=tls)
        received = defer.DeferredQueue()
        yield client.subscribe("news", handler=received.put)
        assert (yield client.publish("news", "over tls")) == 1
        assert (yield received.get()) == Message("message", "news", "over tls")
        yield client.close()
        assert client.state == CLOSED
        # Without the certificate in its trust roots the client refuses the server.
        with pytest.raises(ConnectionError, match=f"cannot connect to {secure}"):
            yield connect(secure)
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_token_function_is_called_on_every_connect(server, open_client):
    calls = []

    def token():
        calls.append(len(calls))
        return defer.succeed(f"t{len(calls)}")

    client = yield open_client(url(server), token=token)
    back = state_reached(client, CONNECTED)
    yield server.factory.close_all()
    yield back
    assert calls == [0, 1]


# -- tokens ---------------------------------------------------------------------------------


@pytest.fixture
def auth_server(make_server):
    return pytest_twisted.blockon(make_server(jwt_secret=SECRET))


@pytest_twisted.inlineCallbacks
def test_a_token_string_or_function_grants_its_channels_and_nothing_else(auth_server, open_client):
    reader = yield open_client(url(auth_server), token=token("reader", subscribe=["news.*"]))
    writer = yield open_client(url(auth_server), token=lambda: token("writer", publish=["news.*"]))
    received = defer.DeferredQueue()
    assert (yield reader.subscribe("news.uk", handler=received.put)) == 1
    assert (yield writer.publish("news.uk", "tea")) == 1
    assert (yield received.get()) == Message("message", "news.uk", "tea")
    with pytest.raises(ReplyError, match="'news.uk' channel") as refused:
        yield reader.publish("news.uk", "x")
    assert refused.value.code == "NOPERM"
    with pytest.raises(ReplyError) as refused:
        yield writer.subscribe("news.uk")
    assert refused.value.code == "NOPERM"
    # A refusal costs nothing else: both go on.
    assert (yield reader.psubscribe("news.*")) == 2
    assert (yield writer.publish("news.fr", "vin")) == 1


@pytest_twisted.inlineCallbacks
def test_without_a_token_commands_fail_with_noauth_until_auth(auth_server, open_client):
    client = yield open_client(url(auth_server))
    with pytest.raises(ReplyError) as refused:
        yield client.subscribe("news")
    assert refused.value.code == "NOAUTH"
    with pytest.raises(ReplyError) as refused:
        yield client.auth("forged")
    assert refused.value.code == "WRONGPASS"
    assert "invalid token" in str(refused.value)
    yield client.auth(token(subscribe=["news"], publish=["news"]))
    assert (yield client.subscribe("news")) == 1
    assert (yield client.publish("news", "x")) == 1


@pytest_twisted.inlineCallbacks
def test_a_reconnect_after_a_drop_presents_a_new_token_that_the_server_checks(
    auth_server, open_client
):
    calls = []

    def fresh():
        calls.append(None)
        return token(subscribe=["news"])

    client = yield open_client(url(auth_server), token=fresh)
    yield client.subscribe("news")
    back = state_reached(client, CONNECTED)
    yield auth_server.factory.close_all()
    yield back
    yield client.ping()  # behind the resubscription, which the new token allowed
    assert len(calls) == 2
    assert auth_server.engine.numsub([b"news"]) == [(b"news", 1)]


@pytest_twisted.inlineCallbacks
def test_an_expired_token_from_a_function_is_replaced_on_reconnect(auth_server, open_client):
    lifetimes = [SHORT, 3600]

    def fresh():
        return token(subscribe=["news"], publish=["news"], lifetime=lifetimes.pop(0))

    client = yield open_client(url(auth_server), token=fresh)
    received = defer.DeferredQueue()
    yield client.subscribe("news", handler=received.put)
    lost, back = state_reached(client, DISCONNECTED), state_reached(client, CONNECTED)
    assert (yield lost) == "4001 token expired"
    yield back
    yield client.ping()
    assert lifetimes == []
    assert (yield client.publish("news", "renewed")) == 1
    assert (yield received.get()) == Message("message", "news", "renewed")


@pytest_twisted.inlineCallbacks
def test_an_expired_fixed_token_stops_the_client_with_the_reason(auth_server, open_client):
    client = yield open_client(url(auth_server), token=token(subscribe=["news"], lifetime=SHORT))
    retried = []
    client.on_state(lambda state, _: retried.append(state))
    yield client.subscribe("news")
    reason = yield state_reached(client, CLOSED)
    assert "token expired (4001)" in reason
    assert retried == [CLOSED]  # no attempt to reconnect with the dead token
    with pytest.raises(TokenRefused, match="token expired") as later:
        yield client.ping()
    assert later.value.reason == "token expired"
    assert auth_server.engine.numsub([b"news"]) == [(b"news", 0)]


@pytest_twisted.inlineCallbacks
def test_a_bad_fixed_token_fails_the_call_waiting_and_stops(auth_server, open_client):
    client = yield open_client(url(auth_server), token="forged")
    # The server opens, then closes at once: this PING is waiting or too late.
    with pytest.raises(TokenRefused, match="invalid token") as refused:
        yield client.ping()
    assert isinstance(refused.value, ConnectionError)
    assert client.state == CLOSED


@pytest_twisted.inlineCallbacks
def test_a_bad_token_from_a_function_keeps_the_client_trying(auth_server, open_client):
    tokens = ["forged", token(publish=["news"])]
    client = yield open_client(url(auth_server), token=lambda: tokens.pop(0))
    yield state_reached(client, CONNECTED)  # the second token's connection
    assert (yield client.publish("news", "x")) == 0
    assert tokens == []


# -- asyncio --------------------------------------------------------------------------------


def in_own_loop(scenario, *args) -> defer.Deferred:
    """Run ``scenario(*args)`` on a new asyncio loop in a worker thread."""

    def run():
        return asyncio.run(asyncio.wait_for(scenario(*args), WAIT))

    return threads.deferToThread(run)


async def _round_trip(address: str):
    async with await aio.connect(address) as alice, await aio.connect(address) as bob:
        stream = alice.messages()
        handled = []
        assert await alice.subscribe("news", handler=handled.append) == 1
        assert await alice.psubscribe("n*") == 2
        assert await bob.publish("news", b"\x00\xff") == 2
        first, second = await anext(stream), await anext(stream)
        assert await bob.pubsub_numsub("news") == {"news": 1}
        assert await bob.pubsub_channels() == ["news"]
        assert await bob.pubsub_numpat() == 1
        assert await bob.ping("x") == "x"
        with pytest.raises(ReplyError) as refused:
            await bob.subscribe("a" * 5000)
        return first, second, handled, refused.value.code


@pytest_twisted.inlineCallbacks
def test_asyncio_round_trip_messages_iterator_and_errors(server):
    first, second, handled, code = yield in_own_loop(_round_trip, url(server))
    assert first == Message("message", "news", b"\x00\xff")
    assert second == Message("pmessage", "news", b"\x00\xff", "n*")
    assert handled == [first]
    assert code == "ERR"


async def _through_a_reconnect(address: str, drop_everyone):
    client = await aio.connect(address, min_delay=0.01, max_delay=0.05)
    states = []
    back = asyncio.Event()

    def changed(state, reason):
        states.append(state)
        if state == CONNECTED:
            back.set()

    client.on_state(changed)
    stream = client.messages()
    await client.subscribe("news")
    drop_everyone()
    await back.wait()
    await client.ping()  # behind the resubscription
    assert await client.publish("news", "after") == 1
    message = await anext(stream)
    await client.close()
    remaining = [m async for m in stream]  # the stream ends with the client
    with pytest.raises(ConnectionError, match="not connected"):
        await client.ping()
    return states, message, remaining


@pytest_twisted.inlineCallbacks
def test_asyncio_reconnects_and_subscribes_again(server):
    def drop_everyone():
        reactor.callFromThread(server.factory.close_all)

    states, message, remaining = yield in_own_loop(_through_a_reconnect, url(server), drop_everyone)
    assert states[:3] == [DISCONNECTED, "connecting", CONNECTED]
    assert states[-1] == CLOSED
    assert message == Message("message", "news", "after")
    assert remaining == []


async def _unreachable(address: str):
    with pytest.raises(ConnectionError) as error:
        await aio.connect(address)
    return str(error.value)


@pytest_twisted.inlineCallbacks
def test_asyncio_unreachable_server():
    target = f"ws://127.0.0.1:{free_port()}/"
    text = yield in_own_loop(_unreachable, target)
    assert text.startswith(f"cannot connect to {target}: ")


async def _asyncio_tokens(address: str):
    reader = await aio.connect(address, token=token("reader", subscribe=["news.*"]))
    stranger = await aio.connect(address)
    try:
        assert await reader.subscribe("news.uk") == 1
        with pytest.raises(ReplyError) as noperm:
            await reader.publish("news.uk", "x")
        with pytest.raises(ReplyError) as noauth:
            await stranger.publish("news.uk", "x")
        with pytest.raises(ReplyError) as wrongpass:
            await stranger.auth("forged")
        await stranger.auth(token("writer", publish=["news.*"]))
        receivers = await stranger.publish("news.uk", "tea")
        return noperm.value.code, noauth.value.code, wrongpass.value.code, receivers
    finally:
        await reader.close()
        await stranger.close()


@pytest_twisted.inlineCallbacks
def test_asyncio_tokens_grant_refuse_and_authenticate(auth_server):
    codes = yield in_own_loop(_asyncio_tokens, url(auth_server))
    assert codes == ("NOPERM", "NOAUTH", "WRONGPASS", 1)


async def _asyncio_token_function_through_drop_and_expiry(address: str, drop_everyone):
    lifetimes = [3600, SHORT, 3600]

    def fresh():
        return token(subscribe=["news"], publish=["news"], lifetime=lifetimes.pop(0))

    client = await aio.connect(address, token=fresh, min_delay=0.01, max_delay=0.05)
    reasons = []
    back = asyncio.Event()

    def changed(state, reason):
        if state == DISCONNECTED:
            reasons.append(reason)
        elif state == CONNECTED:
            back.set()

    client.on_state(changed)
    stream = client.messages()
    await client.subscribe("news")
    drop_everyone()  # the second token comes with the reconnect, and expires
    await back.wait()
    back.clear()
    await back.wait()  # the third token's connection
    await client.ping()  # behind the resubscription
    receivers = await client.publish("news", "renewed")
    message = await anext(stream)
    await client.close()
    return reasons, lifetimes, receivers, message


@pytest_twisted.inlineCallbacks
def test_asyncio_token_function_is_asked_again_on_drop_and_on_expiry(auth_server):
    def drop_everyone():
        reactor.callFromThread(auth_server.factory.close_all)

    reasons, lifetimes, receivers, message = yield in_own_loop(
        _asyncio_token_function_through_drop_and_expiry, url(auth_server), drop_everyone
    )
    assert reasons == ["1001 server shutting down", "4001 token expired"]
    assert lifetimes == []
    assert receivers == 1
    assert message == Message("message", "news", "renewed")


async def _asyncio_fixed_token_expires(address: str):
    client = await aio.connect(address, token=token(subscribe=["news"], lifetime=SHORT))
    states = []
    closed = asyncio.Event()

    def changed(state, reason):
        states.append((state, reason))
        if state == CLOSED:
            closed.set()

    client.on_state(changed)
    stream = client.messages()
    await client.subscribe("news")
    await closed.wait()
    remaining = [m async for m in stream]  # the stream ends with the client
    with pytest.raises(TokenRefused) as later:
        await client.ping()
    await client.close()  # closing a stopped client is harmless
    return states, remaining, later.value.reason


@pytest_twisted.inlineCallbacks
def test_asyncio_fixed_token_expiry_stops_the_client(auth_server):
    states, remaining, reason = yield in_own_loop(_asyncio_fixed_token_expires, url(auth_server))
    [(state, why)] = states  # closed at once: no reconnect attempt
    assert state == CLOSED and "token expired (4001)" in why
    assert remaining == []
    assert reason == "token expired"


async def _asyncio_bad_fixed_token(address: str):
    client = await aio.connect(address, token="forged")
    with pytest.raises(TokenRefused) as refused:
        await client.ping()
    await client.close()
    return client.state, refused.value.reason


@pytest_twisted.inlineCallbacks
def test_asyncio_bad_fixed_token_fails_calls_and_stops(auth_server):
    state, reason = yield in_own_loop(_asyncio_bad_fixed_token, url(auth_server))
    assert state == CLOSED
    assert reason.startswith("invalid token")
