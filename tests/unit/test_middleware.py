"""Middlewares on both transports: decisions now and later, order kept, faults told."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pubsub import Client, Middleware, Refused
from pubsub.core.engine import Engine
from pubsub.core.vocabulary import Kind
from pubsub.operations.config import ConfigError, Settings
from pubsub.policy import middleware as middleware_module
from pubsub.policy.middleware import load
from pubsub.resp.protocol import RespFactory
from pubsub.websocket.protocol import PubSubServerFactory
from tests.support.wsframes import CLOSE, command, handshake
from tests.unit import test_resp as resp
from tests.unit.test_auth import SECRET, token
from tests.unit.test_policy import connect_from, front_for
from tests.unit.test_policy import resp_client as resp_from
from tests.unit.test_websocket import Connection


class Recorder(Middleware):
    """Answers what it is told to, and records every call."""

    def __init__(self, **answers):
        self.answers = answers
        self.calls = []

    def _answer(self, hook, *args):
        self.calls.append((hook, *args))
        answer = self.answers.get(hook)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(*args)
        return answer

    def on_connect(self, client):
        return self._answer("connect", client)

    def on_subscribe(self, client, kind, name):
        return self._answer("subscribe", kind, name)

    def on_publish(self, client, kind, channel, payload):
        return self._answer("publish", kind, channel, payload)

    def on_refused(self, client, command, error):
        self.calls.append(("refused", command, error))

    def on_disconnect(self, client):
        self.calls.append(("disconnect", client.client_id))


@pytest.fixture
def engine():
    return Engine()


@pytest.fixture
def ports(engine, clock):
    """``ports(*middlewares, **settings)``: a WebSocket and a RESP factory on one engine."""

    def make(*middlewares, **settings):
        settings = Settings(**settings)
        return (
            PubSubServerFactory(engine, settings, reactor=clock, middleware=middlewares),
            RespFactory(engine, settings, reactor=clock, middleware=middlewares),
        )

    return make


def test_without_middlewares_a_port_has_no_chain(ports):
    websocket, redis = ports()
    assert websocket.middleware is None and redis.middleware is None
    assert Connection(websocket).protocol._client is None


def test_a_refused_subscribe_is_a_noperm_error_on_both_transports_and_nothing_is_held(
    ports, engine
):
    guard = Recorder(subscribe=lambda kind, name: _refuse_if(name == b"secret", "members only"))
    websocket, redis = ports(guard)
    browser, cli = Connection(websocket), resp.Client(redis)
    assert browser.call("SUBSCRIBE", "news", "secret") == [["error", "NOPERM members only"]]
    assert cli.call("PSUBSCRIBE", "secret") == resp.error("NOPERM members only")
    assert engine.numsub([b"news", b"secret"]) == [(b"news", 0), (b"secret", 0)]
    assert browser.call("SUBSCRIBE", "news") == [["subscribe", "news", 1]]
    assert ("subscribe", Kind.PATTERN, b"secret") in guard.calls
    refused = [call for call in guard.calls if call[0] == "refused"]
    assert refused == [
        ("refused", "subscribe", "NOPERM members only"),
        ("refused", "psubscribe", "NOPERM members only"),
    ]
    assert websocket.errors["auth"] == 1 and redis.errors["auth"] == 1


def _refuse_if(condition, reason, **how):
    if condition:
        raise Refused(reason, **how)


def test_a_publish_may_be_refused_or_its_payload_replaced_and_the_next_sees_it(ports):
    upper = Recorder(publish=lambda kind, channel, payload: payload.upper())
    seen = Recorder(publish=lambda kind, channel, payload: _refuse_if(channel == b"x", "no x"))
    websocket, redis = ports(upper, seen)
    subscriber, publisher = Connection(websocket), resp.Client(redis)
    subscriber.call("SUBSCRIBE", "news")
    assert publisher.call("PUBLISH", "news", "hi") == resp.integer(1)
    assert subscriber.messages() == [["message", "news", "HI"]]
    assert [call for call in seen.calls if call[0] == "publish"] == [
        ("publish", Kind.CHANNEL, b"news", b"HI")
    ]
    assert publisher.call("SPUBLISH", "x", "y") == resp.error("NOPERM no x")
    assert subscriber.messages() == []


def test_a_later_answer_keeps_the_clients_commands_in_order_and_pauses_its_reading(ports, clock):
    answers = []
    websocket, redis = ports(
        Recorder(publish=lambda *_: answers.append(defer.Deferred()) or answers[-1])
    )
    subscriber, publisher = Connection(websocket), Connection(websocket)
    subscriber.call("SUBSCRIBE", "news")
    publisher.send(command("PUBLISH", "news", "first") + command("PING", "after"))
    assert publisher.messages() == []  # nothing answered before the middleware does
    assert publisher.transport.producerState == "paused"
    publisher.send(command("PING", "later still"))  # a read already under way
    answers[0].callback(None)
    assert publisher.messages() == [["reply", 1], ["pong", "after"], ["pong", "later still"]]
    assert publisher.transport.producerState == "producing"
    assert subscriber.messages() == [["message", "news", "first"]]

    cli = resp.Client(redis)
    cli.send(resp.command("PUBLISH", "news", "a") + resp.command("PUBLISH", "news", "b"))
    assert cli.output() == b""
    assert cli.transport.producerState == "paused"
    answers[1].callback(b"A")  # the second waits its turn, then for its own answer
    assert cli.output() == resp.integer(1)
    answers[2].callback(None)
    assert cli.output() == resp.integer(1)
    assert cli.transport.producerState == "producing"
    assert subscriber.messages() == [["message", "news", "A"], ["message", "news", "b"]]


def test_a_coroutine_answers_like_a_deferred(ports):
    waiting = defer.Deferred()

    class Async(Middleware):
        async def on_publish(self, client, kind, channel, payload):
            await waiting
            return payload + b"!"

    websocket, _ = ports(Async())
    subscriber, publisher = Connection(websocket), Connection(websocket)
    subscriber.call("SUBSCRIBE", "c")
    publisher.send(command("PUBLISH", "c", "hey"))
    assert publisher.messages() == []
    waiting.callback(None)
    assert publisher.messages() == [["reply", 1]]
    assert subscriber.messages() == [["message", "c", "hey!"]]


def test_no_answer_within_the_timeout_refuses_and_is_logged(ports, clock, monkeypatch):
    logged = []
    monkeypatch.setattr(middleware_module, "_log", Logger(observer=logged.append))
    never = defer.Deferred()
    websocket, redis = ports(Recorder(subscribe=lambda *_: never), middleware_timeout=2)
    client = resp.Client(redis)
    client.send(resp.command("SUBSCRIBE", "a") + resp.command("PING"))
    clock.advance(1.9)
    assert client.output() == b""
    clock.advance(0.2)
    assert client.output() == (
        resp.error("ERR the server's middleware did not answer in time; subscribe refused")
        + b"+PONG\r\n"
    )
    assert never.called  # cancelled
    assert [e["log_format"] for e in logged] == [
        "middleware did not answer {what} for {client} within {timeout:g} s; refused"
    ]
    assert redis.middleware.failures == 1 and websocket.middleware.failures == 0


def test_a_middleware_that_raises_refuses_and_is_logged_now_or_later(ports, monkeypatch):
    logged = []
    monkeypatch.setattr(middleware_module, "_log", Logger(observer=logged.append))
    later = defer.Deferred()
    answers = iter([ValueError("bug"), later])

    def publish(*_):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    websocket, _ = ports(Recorder(publish=publish))
    client = Connection(websocket)
    failed = "ERR the server's middleware failed; publish refused"
    assert client.call("PUBLISH", "c", "x") == [["error", failed]]
    client.send(command("PUBLISH", "c", "y"))
    later.errback(KeyError("also a bug"))
    assert client.messages() == [["error", failed]]
    assert [e["log_failure"].type for e in logged] == [ValueError, KeyError]
    assert client.call("PING") == [["pong", ""]]


def test_a_refused_client_is_closed_with_its_reason_and_never_observed_leaving(ports, engine):
    guard = Recorder(connect=Refused("not on the list"))
    websocket, redis = ports(guard)
    browser = Connection(websocket)
    [(opcode, payload)] = browser.frames()
    assert opcode == CLOSE and payload == b"\x03\xf0not on the list"  # 1008
    cli = resp.Client(redis)
    assert cli.output() == resp.error("ERR not on the list")
    assert cli.closing
    assert engine.client_count == 0
    browser.protocol.onClose(True, 1008, None)
    cli.lose()
    assert [call[0] for call in guard.calls] == ["connect", "refused", "connect", "refused"]


def test_commands_wait_for_a_later_admission_then_run_with_the_identity_it_set(ports):
    answer = defer.Deferred()
    admitted, identities = [], []

    class Door(Middleware):
        def on_connect(self, client):
            admitted.append(client)
            return answer

        def on_subscribe(self, client, kind, name):
            identities.append(client.identity)

    websocket, _ = ports(Door())
    browser = Connection(websocket, path="/room?user=ann")
    browser.send(command("SUBSCRIBE", "a"))
    assert browser.messages() == []
    [client] = admitted
    assert (client.transport, client.path) == ("websocket", "/room")
    assert client.params == {"user": ["ann"]} and client.headers["host"]
    client.identity = "ann"
    answer.callback(None)
    assert browser.messages() == [["subscribe", "a", 1]]
    assert identities == ["ann"]


def test_disconnect_is_observed_once_for_an_admitted_client(ports):
    recorder = Recorder()
    _, redis = ports(recorder)
    cli = resp.Client(redis)
    client_id = cli.client_id
    cli.lose()
    assert recorder.calls[-1:] == [("disconnect", client_id)]
    assert [call[0] for call in recorder.calls] == ["connect", "disconnect"]


def test_a_connection_that_ends_while_a_middleware_decides_is_forgotten(ports, engine):
    answer = defer.Deferred()
    websocket, _ = ports(Recorder(subscribe=lambda *_: answer))
    browser = Connection(websocket)
    browser.send(command("SUBSCRIBE", "a"))
    browser.protocol.onClose(False, 1006, None)
    answer.callback(None)
    assert engine.client_count == 0 and engine.numsub([b"a"]) == [(b"a", 0)]


def test_nothing_is_sent_once_the_client_has_begun_to_close(ports):
    answer = defer.Deferred()
    websocket, _ = ports(Recorder(publish=lambda *_: answer))
    browser = Connection(websocket)
    browser.send(command("PUBLISH", "a", "b") + command("PING"))
    browser.send(b"\x88\x82abcd" + bytes(x ^ y for x, y in zip(b"\x03\xe8", b"ab", strict=True)))
    [(opcode, _)] = browser.frames()  # the answer to its close frame
    assert opcode == CLOSE
    answer.callback(None)
    assert browser.frames() == []


def test_a_client_turned_away_later_is_read_again_for_its_side_of_the_close(ports):
    answer = defer.Deferred()
    websocket, _ = ports(Recorder(connect=lambda client: answer))
    browser = Connection(websocket)
    assert browser.transport.producerState == "paused"
    answer.errback(Refused("no"))
    [(opcode, _)] = browser.frames()
    assert opcode == CLOSE
    assert browser.transport.producerState == "producing"


def test_answers_given_at_once_as_fired_deferreds_do_not_nest(ports, engine):
    names = [f"c{i}" for i in range(3000)]
    websocket, _ = ports(
        Recorder(subscribe=lambda *_: defer.succeed(None)),
        Recorder(subscribe=lambda *_: None),
        max_subscriptions=0,
    )
    browser = Connection(websocket)
    assert len(browser.call("SUBSCRIBE", *names)) == 3000
    refusing = Recorder(subscribe=lambda *_: defer.fail(Refused("not now")))
    websocket, _ = ports(refusing)
    assert Connection(websocket).call("SUBSCRIBE", "x") == [["error", "NOPERM not now"]]


def test_a_publish_answered_with_anything_but_bytes_is_refused_not_delivered(ports, monkeypatch):
    logged = []
    monkeypatch.setattr(middleware_module, "_log", Logger(observer=logged.append))
    later = defer.Deferred()
    answers = iter(["a str", later])
    websocket, _ = ports(Recorder(publish=lambda *_: next(answers)))
    subscriber, publisher = Connection(websocket), Connection(websocket)
    subscriber.call("SUBSCRIBE", "c")
    failed = [["error", "ERR the server's middleware failed; publish refused"]]
    assert publisher.call("PUBLISH", "c", "x") == failed
    publisher.send(command("PUBLISH", "c", "y"))
    later.callback(42)
    assert publisher.messages() == failed
    assert subscriber.messages() == []
    assert [e["log_failure"].type for e in logged] == [TypeError, TypeError]


def test_an_observer_that_fails_is_logged_and_changes_nothing(ports, monkeypatch):
    logged = []
    monkeypatch.setattr(middleware_module, "_log", Logger(observer=logged.append))

    class Clumsy(Middleware):
        def on_subscribe(self, client, kind, name):
            raise Refused("no")

        def on_refused(self, client, command, error):
            raise RuntimeError("observer bug")

        def on_disconnect(self, client):
            return defer.fail(RuntimeError("later observer bug"))

    _, redis = ports(Clumsy())
    cli = resp.Client(redis)
    assert cli.call("SUBSCRIBE", "a") == resp.error("NOPERM no")
    assert cli.call("PING") == b"+PONG\r\n"
    cli.lose()
    assert [e["log_failure"].getErrorMessage() for e in logged] == [
        "observer bug",
        "later observer bug",
    ]


def test_clients_claims_are_the_tokens_once_it_authenticates(ports):
    claims = []
    websocket, _ = ports(
        Recorder(subscribe=lambda *_: None, connect=lambda client: claims.append(client)),
        jwt_secret=SECRET,
    )
    Connection(websocket, path=f"/?token={token(room='blue')}")
    [client] = claims
    assert client.claims["sub"] == "alice" and client.claims["room"] == "blue"


# -- loading from the settings -------------------------------------------------------------


def make_recorder():
    return Recorder()


def test_the_setting_loads_each_factory_in_order():
    loaded = load(f" {__name__}:make_recorder , {__name__}:Recorder")
    assert [type(m) for m in loaded] == [Recorder, Recorder]
    assert load("") == []


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nocolon", "'nocolon' is not package.module:factory"),
        ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
        (f"{__name__}:nothing", f"{__name__!r} has no 'nothing'"),
        (f"{__name__}:SECRET", "is not callable"),
        (f"{__name__}:Middleware.on_connect", "() failed: TypeError"),
    ],
)
def test_a_middleware_that_cannot_be_loaded_stops_the_start_up(spec, message):
    with pytest.raises(ConfigError, match="setting middleware: ") as raised:
        load(spec)
    assert message in str(raised.value)


def test_the_conf_file_may_list_them(tmp_path):
    conf = tmp_path / "pubsub.toml"
    conf.write_text('middleware = ["a.b:c", "d:e"]\n')
    from pubsub.operations.config import load_settings

    assert load_settings(conf, environ={}).middleware == "a.b:c,d:e"
    conf.write_text("middleware = [1]\n")
    with pytest.raises(ConfigError, match="middleware must be a string"):
        load_settings(conf, environ={})
    with pytest.raises(ConfigError, match="middleware_timeout must be a positive"):
        Settings(middleware_timeout=0)


def test_the_client_says_who_it_is():
    client = Client("resp", 7, "127.0.0.1:5000")
    assert repr(client) == "<Client resp #7 from 127.0.0.1:5000>"
    assert client.claims is None and client.identity is None
    assert client.params == {} and client.headers == {}


# -- refusals with their own codes, addresses, and the built-in policies on the same hooks --


def test_a_refusal_may_name_its_error_code_and_close_code(ports):
    websocket, redis = ports(
        Recorder(
            connect=lambda client: _refuse_if(
                client.params.get("room") == ["x"], "room closed", close_code=4403
            ),
            publish=lambda *_: _refuse_if(True, "slow down", code="LIMIT"),
        )
    )
    [(opcode, payload)] = Connection(websocket, path="/?room=x").frames()
    assert opcode == CLOSE and payload == (4403).to_bytes(2, "big") + b"room closed"
    assert resp.Client(redis).call("PUBLISH", "c", "x") == resp.error("LIMIT slow down")


@pytest.mark.parametrize("code", ["err", "TWO WORDS", "", "É"])
def test_an_error_code_is_one_upper_case_word(code):
    with pytest.raises(ValueError, match="upper-case word"):
        Refused("no", code=code)


@pytest.mark.parametrize("close_code", [1000, 1005, 1011, 2999, 5000])
def test_a_close_code_is_1008_or_the_applications_own(close_code):
    with pytest.raises(ValueError, match="1008 or 3000 to 4999"):
        Refused("no", close_code=close_code)


class Addresses(Middleware):
    """Refuses the hosts it is given; records what it let in and saw close."""

    def __init__(self, *refused):
        self.refused = refused
        self.calls = []

    def on_accept(self, host):
        self.calls.append(("accept", host))
        if host in self.refused:
            raise Refused(f"{host} is blocked")

    def on_close(self, host):
        self.calls.append(("close", host))


def test_an_address_refused_on_accept_is_told_before_a_byte_is_read_on_both_ports(
    ports, clock, engine
):
    counting, blocking = Addresses(), Addresses("10.0.0.66")
    websocket, redis = ports(counting, blocking)
    front = front_for(websocket, clock)
    refused = connect_from(front, "10.0.0.66")
    assert refused.value() == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 21\r\nConnection: close\r\n\r\n10.0.0.66 is blocked\n"
    )
    cli = resp_from(redis, "10.0.0.66")
    assert cli.transport.value() == b"-ERR 10.0.0.66 is blocked\r\n" and cli.closing
    assert engine.client_count == 0
    # The one before the refusing middleware let each in: it sees each close.
    assert counting.calls == [("accept", "10.0.0.66"), ("close", "10.0.0.66")] * 2
    allowed = connect_from(front, "10.0.0.1", handshake())
    assert allowed.value().startswith(b"HTTP/1.1 101")
    allowed.protocol.connectionLost(Failure(ConnectionDone()))
    assert blocking.calls[-2:] == [("accept", "10.0.0.1"), ("close", "10.0.0.1")]
    assert websocket.chain.refusals == 1 and redis.chain.refusals == 1


def test_an_on_accept_that_fails_or_answers_later_refuses_and_is_logged(ports, monkeypatch):
    logged = []
    monkeypatch.setattr(middleware_module, "_log", Logger(observer=logged.append))
    answers = iter([KeyError("bug"), defer.Deferred()])

    class Faulty(Middleware):
        def on_accept(self, host):
            answer = next(answers)
            if isinstance(answer, Exception):
                raise answer
            return answer

    _, redis = ports(Faulty())
    for _ in range(2):
        cli = resp_from(redis, "10.0.0.1")
        assert cli.transport.value() == (
            b"-ERR the server's middleware failed; connection refused\r\n"
        )
    assert [e["log_failure"].type for e in logged] == [KeyError, TypeError]
    assert redis.chain.failures == 2


def test_the_built_in_policies_come_first_and_their_refusals_are_observed(ports, clock):
    recorder = Recorder()
    websocket, _ = ports(recorder, jwt_secret=SECRET, publish_rate=1, publish_burst=1)
    reader = Connection(websocket, path=f"/?token={token(subscribe=['news'], publish=['news'])}")
    assert reader.call("SUBSCRIBE", "news", "secret") == [
        ["error", "NOPERM User alice has no permissions to access the 'secret' channel"]
    ]
    assert reader.call("PUBLISH", "news", "1") == [["reply", 0]]
    [[kind, text]] = reader.call("PUBLISH", "news", "2")
    assert kind == "error" and text.startswith("ERR publish rate limit exceeded")
    # The application's middleware saw neither refused command, and both refusals.
    assert [call for call in recorder.calls if call[0] in ("subscribe", "publish")] == [
        ("publish", Kind.CHANNEL, b"news", b"1")
    ]
    refused = [call[1:] for call in recorder.calls if call[0] == "refused"]
    assert refused == [
        ("subscribe", "NOPERM User alice has no permissions to access the 'secret' channel"),
        ("publish", text),
    ]
    assert websocket.middleware.refusals == 2


def test_a_bad_handshake_token_closes_with_4001_before_the_applications_on_connect(ports):
    recorder = Recorder()
    websocket, _ = ports(recorder, jwt_secret=SECRET)
    [(opcode, payload)] = Connection(websocket, path="/?token=forged").frames()
    assert opcode == CLOSE and payload.startswith((4001).to_bytes(2, "big") + b"invalid token")
    assert [call[0] for call in recorder.calls] == ["refused"]


def test_a_resp2_subscriber_without_the_permission_is_told_noperm_as_redis(ports):
    # Redis checks its ACLs before the commands a RESP2 subscriber may run.
    _, redis = ports(jwt_secret=SECRET)
    cli = resp.Client(redis)
    assert cli.call("AUTH", token(subscribe=["news"])) == b"+OK\r\n"
    assert cli.call("SUBSCRIBE", "news").startswith(b"*3\r\n$9\r\nsubscribe")
    assert cli.call("PUBLISH", "news", "x") == resp.error(
        "NOPERM User alice has no permissions to access the 'news' channel"
    )
    assert cli.call("PUBSUB", "NUMPAT").startswith(b"-ERR Can't execute 'pubsub|numpat'")


def test_each_client_has_its_own_state(ports):
    seen = []

    class Counting(Middleware):
        def on_publish(self, client, kind, channel, payload):
            client.state[self] = client.state.get(self, 0) + 1
            seen.append(client.state[self])

    _, redis = ports(Counting())
    first, second = resp.Client(redis), resp.Client(redis)
    for cli in (first, first, second):
        cli.call("PUBLISH", "c", "x")
    assert seen == [1, 2, 1]
