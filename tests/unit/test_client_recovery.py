"""The client core's recovery, frame by frame: RESUME's answers, the positions
it keeps, and RESUME again on a new connection (docs/protocol.md, Recovery)."""

from __future__ import annotations

import json

import pytest

from pubsub.client._core import (
    CHANNEL,
    NO_HISTORY,
    NO_POSITION,
    PATTERN,
    ClientCore,
    Message,
    ProtocolViolation,
    Recovery,
    RecoveryFailed,
    Rejected,
    Resolved,
)

E = "9f2c1a0b"
LOST = "messages after the position are no longer kept"


def frame(*items) -> str:
    return json.dumps(list(items))


def at(offset: int, epoch: str = E) -> dict:
    return {"epoch": epoch, "offset": offset}


def sent(frames: list[str]) -> list[list]:
    return [json.loads(f) for f in frames]


@pytest.fixture
def core() -> ClientCore:
    core = ClientCore()
    assert core.opened() == []
    return core


def resumed(core: ClientCore, channel: str = "chat", offset: int = 41) -> None:
    """``channel`` RESUMEd for the first time, the channel at ``offset``."""
    core.resume(channel)
    core.receive(frame("subscribe", channel, len(core.held[CHANNEL]) + 1))
    core.receive(frame("position", channel, at(offset)))


def reconnect(core: ClientCore) -> list[list]:
    core.lost("gone")
    return sent(core.opened())


def test_a_first_resume_subscribes_and_resolves_with_the_channel_s_position(core):
    request, frames = core.resume("chat")
    assert sent(frames) == [["RESUME", "chat"]]
    assert core.receive(frame("subscribe", "chat", 1)) == []
    assert core.receive(frame("position", "chat", at(41))) == [
        Resolved(request, Recovery("chat", True, None, (E, 41)))
    ]
    assert list(core.held[CHANNEL]) == ["chat"]
    assert core.positions == {"chat": (E, 41)}


def test_a_resume_from_a_position_replays_what_followed_it_then_resolves(core):
    request, frames = core.resume("chat", position=(E, 41))
    assert sent(frames) == [["RESUME", "chat", E, "41"]]
    assert core.receive(frame("subscribe", "chat", 1)) == []
    assert core.receive(frame("message", "chat", "a", at(42))) == [
        Message("message", "chat", "a", position=(E, 42))
    ]
    assert core.receive(frame("message", "chat", {"base64": "AP8="}, at(43))) == [
        Message("message", "chat", b"\x00\xff", position=(E, 43))
    ]
    assert core.receive(frame("position", "chat", at(43))) == [
        Resolved(request, Recovery("chat", True, None, (E, 43)))
    ]
    # Known now: the next RESUME of it goes on from there.
    _, frames = core.resume("chat")
    assert sent(frames) == [["RESUME", "chat", E, "43"]]


def test_positions_are_kept_from_the_messages_of_resumed_channels_only(core):
    resumed(core, "chat")
    core.subscribe(CHANNEL, ["plain"])
    core.receive(frame("subscribe", "plain", 2))
    # Once the connection used RESUME, every channel with a history has positions.
    assert core.receive(frame("message", "plain", "x", at(7, "other"))) == [
        Message("message", "plain", "x", None, ("other", 7))
    ]
    assert core.receive(frame("message", "chat", "y", at(42))) == [
        Message("message", "chat", "y", None, (E, 42))
    ]
    assert core.positions == {"chat": (E, 42)}
    assert list(core.resumed) == ["chat"]


def test_a_message_without_a_position_is_unchanged():
    assert Message("message", "a", "b") == Message("message", "a", "b", None, None)
    assert Message("message", "a", "b").position is None


def test_a_new_connection_resumes_each_resumed_channel_from_its_last_message(core):
    core.subscribe(CHANNEL, ["plain"])
    core.receive(frame("subscribe", "plain", 1))
    core.subscribe(PATTERN, ["p*"])
    core.receive(frame("psubscribe", "p*", 2))
    resumed(core, "chat", 41)
    resumed(core, "room", 3)
    core.receive(frame("message", "chat", "hi", at(42)))
    assert reconnect(core) == [
        ["SUBSCRIBE", "plain"],
        ["PSUBSCRIBE", "p*"],
        ["RESUME", "chat", E, "42"],
        ["RESUME", "room", E, "3"],
    ]
    core.receive(frame("subscribe", "plain", 1))
    [subscribed] = core.receive(frame("psubscribe", "p*", 2))
    assert subscribed.request.internal
    core.receive(frame("subscribe", "chat", 3))
    # What was missed comes first, then the position; the request is the client's own.
    assert core.receive(frame("message", "chat", "missed", at(43))) == [
        Message("message", "chat", "missed", None, (E, 43))
    ]
    [recovered] = core.receive(frame("position", "chat", at(43)))
    assert isinstance(recovered, Resolved) and recovered.request.internal
    assert recovered.value == Recovery("chat", True, None, (E, 43))
    core.receive(frame("subscribe", "room", 4))
    [failed, resolved] = core.receive(frame("recovery_failed", "room", at(90), LOST))
    assert failed == RecoveryFailed("room", LOST, (E, 90))
    assert resolved.request.internal and resolved.value.recovered is False
    assert core.positions == {"chat": (E, 43), "room": (E, 90)}
    # The next reconnect goes on from there.
    assert reconnect(core)[-2:] == [["RESUME", "chat", E, "43"], ["RESUME", "room", E, "90"]]


def test_a_failed_recovery_of_the_caller_s_resume_is_an_event_and_its_answer(core):
    request, frames = core.resume("chat", position=(E, 3))
    assert sent(frames) == [["RESUME", "chat", E, "3"]]
    core.receive(frame("subscribe", "chat", 1))
    assert core.receive(frame("recovery_failed", "chat", at(190), LOST)) == [
        RecoveryFailed("chat", LOST, (E, 190)),
        Resolved(request, Recovery("chat", False, LOST, (E, 190))),
    ]
    assert core.positions == {"chat": (E, 190)}
    # A channel without history, asked from a position, fails with a null position.
    request, _ = core.resume("nohistory", position=(E, 3))
    core.receive(frame("subscribe", "nohistory", 2))
    assert core.receive(frame("recovery_failed", "nohistory", None, NO_HISTORY)) == [
        RecoveryFailed("nohistory", NO_HISTORY, None),
        Resolved(request, Recovery("nohistory", False, NO_HISTORY, None)),
    ]


def test_a_channel_without_history_is_reported_unrecoverable_on_reconnect(core):
    request, _ = core.resume("plain.x")
    core.receive(frame("subscribe", "plain.x", 1))
    # Nothing was missed yet: a first RESUME without history is no failure.
    assert core.receive(frame("position", "plain.x", None)) == [
        Resolved(request, Recovery("plain.x", True, None, None))
    ]
    assert core.positions == {"plain.x": None}
    assert core.receive(frame("message", "plain.x", "m")) == [Message("message", "plain.x", "m")]
    assert reconnect(core) == [["RESUME", "plain.x"]]
    core.receive(frame("subscribe", "plain.x", 1))
    [failed, resolved] = core.receive(frame("position", "plain.x", None))
    assert failed == RecoveryFailed("plain.x", NO_HISTORY, None)
    assert resolved.request.internal


def test_a_connection_lost_before_the_position_came_is_reported_unrecoverable(core):
    request, _ = core.resume("chat")
    core.receive(frame("subscribe", "chat", 1))
    [lost] = core.lost("gone")
    assert isinstance(lost, Rejected) and lost.request is request
    assert isinstance(lost.error, ConnectionError)
    assert sent(core.opened()) == [["RESUME", "chat"]]
    core.receive(frame("subscribe", "chat", 1))
    [failed, _] = core.receive(frame("position", "chat", at(50)))
    assert failed == RecoveryFailed("chat", NO_POSITION, (E, 50))


def test_a_resume_lost_before_its_confirmation_is_not_held(core):
    core.resume("chat")
    [lost] = core.lost("gone")
    assert isinstance(lost, Rejected)
    assert core.opened() == []
    assert core.held[CHANNEL] == {} and core.resumed == {} and core.positions == {}


def test_a_refused_resume_is_rejected_like_a_subscribe(core):
    request, _ = core.resume("secret", handler=print)
    [event] = core.receive(frame("error", "NOPERM this token may not subscribe to 'secret'"))
    assert isinstance(event, Rejected) and event.request is request
    assert event.error.code == "NOPERM"
    assert core.held[CHANNEL] == {} and core.resumed == {}
    assert core.handlers_for(Message("message", "secret", "x")) == []


def test_a_resume_refused_on_a_new_connection_forgets_the_channel(core):
    resumed(core, "chat", 41)
    assert reconnect(core) == [["RESUME", "chat", E, "41"]]
    [event] = core.receive(frame("error", "NOPERM this token may not subscribe to 'chat'"))
    assert isinstance(event, Rejected) and event.request.internal
    assert core.held[CHANNEL] == {} and core.resumed == {} and core.positions == {}


def test_unsubscribing_forgets_the_position(core):
    resumed(core, "chat", 41)
    resumed(core, "room", 5)
    core.unsubscribe(CHANNEL, ["chat"])
    assert core.positions == {"room": (E, 5)} and list(core.resumed) == ["room"]
    core.receive(frame("unsubscribe", "chat", 1))
    _, frames = core.resume("chat")
    assert sent(frames) == [["RESUME", "chat"]]  # afresh
    core.unsubscribe(CHANNEL, [])
    assert core.resumed == {} and core.positions == {}
    assert reconnect(core) == []


def test_a_resume_of_a_held_channel_does_not_deliver_twice_what_crossed_it(core):
    resumed(core, "chat", 41)
    _, frames = core.resume("chat")
    assert sent(frames) == [["RESUME", "chat", E, "41"]]
    # A live message was on its way when RESUME left: the replay has it again.
    assert core.receive(frame("message", "chat", "live", at(42))) != []
    core.receive(frame("subscribe", "chat", 1))
    assert core.receive(frame("message", "chat", "live", at(42))) == []
    assert core.receive(frame("message", "chat", "next", at(43))) != []
    [resolved] = core.receive(frame("position", "chat", at(43)))
    assert resolved.value == Recovery("chat", True, None, (E, 43))
    # A new epoch starts its offsets afresh: nothing of it is a duplicate.
    assert core.receive(frame("message", "chat", "new", at(1, "0000beef"))) != []
    assert core.positions["chat"] == ("0000beef", 1)


def test_a_gap_in_a_resumed_channel_s_live_messages_is_told_before_the_message_after_it(core):
    resumed(core, "chat", 41)

    def live(payload: str, offset: int, epoch: str = E) -> list:
        return core.receive(frame("message", "chat", payload, at(offset, epoch)))

    def message(payload: str, offset: int, epoch: str = E) -> Message:
        return Message("message", "chat", payload, None, (epoch, offset))

    assert live("42", 42) == [message("42", 42)]
    # 43 to 45 were lost on the server's side.
    assert live("46", 46) == [
        RecoveryFailed("chat", "messages 43 to 45 of epoch 9f2c1a0b never arrived", (E, 46)),
        message("46", 46),
    ]
    assert live("47", 47) == [message("47", 47)]
    # A new epoch starts at 1: nothing missed, unless it starts later.
    assert live("new 1", 1, "other") == [message("new 1", 1, "other")]
    assert live("new 3", 3, "other") == [
        RecoveryFailed("chat", "message 2 of epoch other never arrived", ("other", 3)),
        message("new 3", 3, "other"),
    ]
    # A replay starts where the caller asked, which its answer judges: no gap.
    request, _ = core.resume("chat", position=("other", 9))
    core.receive(frame("subscribe", "chat", 1))
    assert live("new 10", 10, "other") == [message("new 10", 10, "other")]
    assert core.receive(frame("position", "chat", at(10, "other"))) == [
        Resolved(request, Recovery("chat", True, None, ("other", 10)))
    ]
    assert live("new 11", 11, "other") == [message("new 11", 11, "other")]
    # Channels not resumed are not judged.
    core.subscribe(CHANNEL, ["plain"])
    core.receive(frame("subscribe", "plain", 2))
    assert core.receive(frame("message", "plain", "x", at(7))) != []
    assert len(core.receive(frame("message", "plain", "y", at(9)))) == 1


@pytest.mark.parametrize(
    "fourth",
    [
        None,
        {},
        "9f2c1a0b:42",
        [E, 42],
        {"epoch": E},
        {"epoch": 1, "offset": 42},
        {"epoch": E, "offset": "42"},
        {"epoch": E, "offset": -1},
        {"epoch": E, "offset": 4.2},
        {"epoch": E, "offset": True},
        {"epoch": E, "offset": 42, "extra": 1},
    ],
)
def test_a_message_with_a_malformed_position_is_refused(core, fourth):
    with pytest.raises(ProtocolViolation):
        core.receive(frame("message", "chat", "hi", fourth))


@pytest.mark.parametrize(
    "bad",
    [
        ["smessage", "chat", "hi", {"epoch": E, "offset": 1}],
        ["message", "chat", "hi", {"epoch": E, "offset": 1}, "more"],
        ["pmessage", "c*", "chat", "hi", {"epoch": E, "offset": 1}],
    ],
)
def test_positions_come_only_as_the_fourth_element_of_message_frames(core, bad):
    with pytest.raises(ProtocolViolation):
        core.receive(frame(*bad))


@pytest.mark.parametrize(
    "answer",
    [
        ["position", "other", {"epoch": E, "offset": 1}],
        ["position", "chat", {"epoch": E, "offset": 1}, "extra"],
        ["position", "chat", {"epoch": E}],
        ["recovery_failed", "chat", None],
        ["recovery_failed", "chat", None, 5],
    ],
)
def test_a_malformed_end_of_a_resume_answer_is_refused(core, answer):
    core.resume("chat")
    core.receive(frame("subscribe", "chat", 1))
    with pytest.raises(ProtocolViolation):
        core.receive(frame(*answer))


def test_a_position_before_the_confirmation_or_for_another_command_is_refused(core):
    core.resume("chat")
    with pytest.raises(ProtocolViolation, match="RESUME"):
        core.receive(frame("position", "chat", at(1)))
    other = ClientCore()
    other.opened()
    other.subscribe(CHANNEL, ["chat"])
    with pytest.raises(ProtocolViolation, match="SUBSCRIBE"):
        other.receive(frame("position", "chat", at(1)))


@pytest.mark.parametrize("position", [("e",), ("e", -1), ("e", "1"), (1, 1), ("e", True), 5])
def test_a_bad_position_to_resume_from_is_refused_before_anything_is_sent(core, position):
    with pytest.raises(ValueError, match="position"):
        core.resume("chat", position=position)
    ping, _ = core.ping()
    assert core.receive(frame("pong", "")) == [Resolved(ping, "")]
