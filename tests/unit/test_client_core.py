"""The client's sans-I/O core, frame by frame: no reactor, no loop, no socket."""

from __future__ import annotations

import json

import pytest

from pubsub.client._core import (
    CHANNEL,
    PATTERN,
    SHARD,
    Backoff,
    ClientCore,
    Message,
    ProtocolViolation,
    Rejected,
    ReplyError,
    Resolved,
    TokenRefused,
    is_token_close,
    numsub,
    parse_url,
    url_with_token,
)
from pubsub.core.vocabulary import CLOSE_TOKEN


def frame(*items) -> str:
    return json.dumps(list(items))


@pytest.fixture
def core() -> ClientCore:
    core = ClientCore()
    assert core.opened() == []
    return core


def test_a_subscribe_of_two_channels_resolves_on_the_second_confirmation(core):
    request, frames = core.subscribe(CHANNEL, ["news", "sport"])
    assert [json.loads(f) for f in frames] == [["SUBSCRIBE", "news", "sport"]]
    assert core.receive(frame("subscribe", "news", 1)) == []
    assert core.receive(frame("subscribe", "sport", 2)) == [Resolved(request, 2)]
    assert list(core.held[CHANNEL]) == ["news", "sport"]


def test_answers_resolve_requests_in_the_order_they_were_sent(core):
    publish, _ = core.publish("news", "hi")
    ping, _ = core.ping("marker")
    numpat, _ = core.command("PUBSUB", "NUMPAT")
    assert core.receive(frame("reply", 3)) == [Resolved(publish, 3)]
    assert core.receive(frame("pong", "marker")) == [Resolved(ping, "marker")]
    assert core.receive(frame("reply", 0)) == [Resolved(numpat, 0)]


def test_an_error_frame_rejects_its_request_with_the_redis_code(core):
    request, _ = core.subscribe(CHANNEL, ["secret"], handler=print)
    [event] = core.receive(frame("error", "NOPERM this token may not subscribe to 'secret'"))
    assert isinstance(event, Rejected) and event.request is request
    assert isinstance(event.error, ReplyError)
    assert event.error.code == "NOPERM"
    assert "secret" in str(event.error)
    assert core.held[CHANNEL] == {}
    assert core.handlers_for(Message("message", "secret", "x")) == []


def test_unsubscribe_everything_is_closed_by_the_pong_of_a_ping_behind_it(core):
    core.subscribe(CHANNEL, ["a", "b"])
    core.receive(frame("subscribe", "a", 1))
    core.receive(frame("subscribe", "b", 2))
    request, frames = core.unsubscribe(CHANNEL, [])
    assert [json.loads(f) for f in frames] == [["UNSUBSCRIBE"], ["PING"]]
    assert core.held[CHANNEL] == {}  # at once: a reconnect now must not bring them back
    assert core.receive(frame("unsubscribe", "a", 1)) == []
    assert core.receive(frame("unsubscribe", "b", 0)) == []
    assert core.receive(frame("pong", "")) == [Resolved(request, 0)]


def test_unsubscribe_everything_refused_still_waits_for_its_closing_frame(core):
    core.unsubscribe(PATTERN, [])
    assert core.receive(frame("error", "NOAUTH Authentication required.")) == []
    [event] = core.receive(frame("error", "NOAUTH Authentication required."))
    assert isinstance(event, Rejected) and event.error.code == "NOAUTH"
    later, _ = core.ping()
    assert core.receive(frame("pong", "")) == [Resolved(later, "")]


def test_payloads_base64_in_and_out(core):
    _, frames = core.publish("bin", b"\x00\xff")
    assert json.loads(frames[0]) == ["PUBLISH", "bin", {"base64": "AP8="}]
    _, frames = core.publish("text", "héllo")
    assert json.loads(frames[0]) == ["PUBLISH", "text", "héllo"]
    assert core.receive(frame("message", "bin", {"base64": "AP8="})) == [
        Message("message", "bin", b"\x00\xff")
    ]
    assert core.receive(frame("pmessage", "b*", "bin", "text")) == [
        Message("pmessage", "bin", "text", "b*")
    ]


def test_messages_go_to_their_name_s_handler_then_to_the_catch_alls(core):
    def news(message):
        pass

    def pattern(message):
        pass

    def shard(message):
        pass

    def everything(message):
        pass

    core.subscribe(CHANNEL, ["news"], handler=news)
    core.subscribe(PATTERN, ["n*"], handler=pattern)
    core.subscribe(SHARD, ["news"], handler=shard)
    core.add_catch_all(everything)
    assert core.handlers_for(Message("message", "news", "x")) == [news, everything]
    assert core.handlers_for(Message("pmessage", "news", "x", "n*")) == [pattern, everything]
    assert core.handlers_for(Message("smessage", "news", "x")) == [shard, everything]
    assert core.handlers_for(Message("message", "other", "x")) == [everything]
    core.unsubscribe(CHANNEL, ["news"])
    core.remove_catch_all(everything)
    assert core.handlers_for(Message("message", "news", "x")) == []


def test_a_lost_connection_fails_every_waiting_request_and_refuses_new_ones(core):
    first, _ = core.publish("a", "x")
    second, _ = core.ping()
    events = core.lost("connection to ws://h/ lost: code 1006")
    assert [event.request for event in events] == [first, second]
    assert all(isinstance(event.error, ConnectionError) for event in events)
    assert "code 1006" in str(events[0].error)
    with pytest.raises(ConnectionError):
        core.ping()


@pytest.mark.parametrize(
    "reason",
    [
        "token expired",
        "authentication required",
        "token has expired",
        "invalid token: Signature verification failed",
        "token signed with HS512, expected HS256",
        "claim exp must be a number",
        "token does not allow channel 'x'",
        "no token can be checked: the server has no JWT key configured",
    ],
)
def test_an_older_server_s_token_reasons_with_1008_are_token_closes(reason):
    assert is_token_close(1008, reason)
    assert not is_token_close(1001, reason)


@pytest.mark.parametrize("reason", ["token expired", "anything a newer server says", "", None])
def test_the_token_close_code_is_a_token_close_whatever_the_reason(reason):
    assert is_token_close(CLOSE_TOKEN, reason)


@pytest.mark.parametrize(
    "code, reason",
    [
        (1008, "output buffer over its hard limit of 8388608 bytes"),
        (1008, ""),
        (1008, None),
        (1001, "server shutting down"),
        (None, None),
    ],
)
def test_other_closes_are_not_token_closes(code, reason):
    assert not is_token_close(code, reason)


def test_a_token_close_stops_a_client_whose_token_cannot_be_renewed(core):
    waiting, _ = core.subscribe(CHANNEL, ["news"])
    events = core.closed("ws://h/", CLOSE_TOKEN, "token expired", renewable=False)
    [event] = events
    assert event.request is waiting
    assert isinstance(event.error, TokenRefused)
    assert event.error.reason == "token expired"
    assert str(event.error).startswith("ws://h/ closed the connection: token expired (4001)")
    assert event.error.code == CLOSE_TOKEN
    assert core.stopped is not None
    # Later calls, even on a new connection, fail with a fresh error naming the reason.
    core.opened()
    with pytest.raises(TokenRefused, match="token expired") as later:
        core.ping()
    assert later.value is not event.error
    assert core.refusal() is not None and core.refusal() is not core.refusal()


def test_a_token_close_leaves_a_renewable_client_free_to_reconnect(core):
    core.subscribe(CHANNEL, ["news"])
    core.receive(frame("subscribe", "news", 1))
    assert core.closed("ws://h/", 1008, "token expired", renewable=True) == []
    assert core.stopped is None and core.refusal() is None
    assert [json.loads(f) for f in core.opened()] == [["SUBSCRIBE", "news"]]


def test_other_closes_never_stop_the_client(core):
    waiting, _ = core.ping()
    [event] = core.closed("ws://h/", 1008, "output buffer over its hard limit", renewable=False)
    assert event.request is waiting
    assert type(event.error) is ConnectionError
    assert "lost: 1008 output buffer" in str(event.error)
    assert core.closed("ws://h/", 1006, None, renewable=False) == []
    assert core.stopped is None
    core.opened()
    core.ping()


def test_a_new_connection_subscribes_again_to_everything_held(core):
    core.subscribe(CHANNEL, ["a", "b"])
    core.subscribe(PATTERN, ["p*"])
    core.subscribe(SHARD, ["s"])
    for reply in (["subscribe", "a", 1], ["subscribe", "b", 2], ["psubscribe", "p*", 3]):
        core.receive(frame(*reply))
    core.receive(frame("ssubscribe", "s", 1))
    core.lost("gone")
    frames = [json.loads(f) for f in core.opened()]
    assert frames == [["SUBSCRIBE", "a", "b"], ["PSUBSCRIBE", "p*"], ["SSUBSCRIBE", "s"]]
    # The resubscriptions are answered like any request, ahead of later ones.
    ping, _ = core.ping()
    for reply in (["subscribe", "a", 1], ["subscribe", "b", 2], ["psubscribe", "p*", 3]):
        [event] = core.receive(frame(*reply)) or [None]
    assert event is not None and event.request.internal
    [refused] = core.receive(frame("error", "NOPERM shard channels are not allowed"))
    assert refused.request.internal
    assert core.held[SHARD] == {}
    assert core.receive(frame("pong", "")) == [Resolved(ping, "")]
    assert list(core.held[CHANNEL]) == ["a", "b"]


@pytest.mark.parametrize(
    "bad",
    ["not json", "{}", "[]", '["reply", 1]', '["message", "only-channel"]'],
)
def test_frames_that_break_the_protocol_are_refused(core, bad):
    with pytest.raises(ProtocolViolation):
        core.receive(bad)


def test_an_answer_of_the_wrong_kind_is_refused(core):
    core.subscribe(CHANNEL, ["a"])
    with pytest.raises(ProtocolViolation, match="SUBSCRIBE"):
        core.receive(frame("reply", 1))


def test_bad_arguments_are_refused_before_anything_is_sent(core):
    with pytest.raises(ValueError, match="at least one"):
        core.subscribe(CHANNEL, [])
    with pytest.raises(ValueError, match="UTF-8"):
        core.subscribe(CHANNEL, [b"\xff"])
    with pytest.raises(TypeError):
        core.publish("a", 5)
    ping, _ = core.ping()
    assert core.receive(frame("pong", "")) == [Resolved(ping, "")]


def test_numsub_pairs_names_with_counts():
    assert numsub(["a", 1, "b", 0]) == {"a": 1, "b": 0}


def test_backoff_doubles_up_to_its_ceiling_with_jitter_below_it():
    low, high = Backoff(0.5, 4.0, random=lambda: 0.0), Backoff(0.5, 4.0, random=lambda: 1.0)
    assert [low.next() for _ in range(5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert [high.next() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    high.reset()
    assert high.next() == 0.5
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_urls_and_tokens():
    assert url_with_token("ws://h:1/p?x=1&token=old", "new") == "ws://h:1/p?x=1&token=new"
    assert url_with_token("ws://h/", None) == "ws://h/"
    address = parse_url("wss://example.org/live")
    assert (address.host, address.port, address.secure) == ("example.org", 443, True)
    assert parse_url("ws://127.0.0.1:9000/").port == 9000
    with pytest.raises(ValueError, match="ws://"):
        parse_url("http://example.org/")


def test_the_core_imports_no_event_loop_nor_websocket_library():
    import ast
    from pathlib import Path

    import pubsub.client._core as core_module

    tree = ast.parse(Path(core_module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported.isdisjoint({"twisted", "asyncio", "autobahn", "websockets", "txaio"})
    assert "json" in imported  # the walk saw the imports
