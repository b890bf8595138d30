import pytest_twisted


@pytest_twisted.inlineCallbacks
def test_subscribe_then_publish_across_clients(server, connect):
    alice = yield connect(server.port)
    bob = yield connect(server.port)
    assert (yield alice.call("SUBSCRIBE", "news")) == [["subscribe", "news", 1]]
    assert (yield bob.call("PUBLISH", "news", "hello")) == [["reply", 1]]
    assert (yield alice.next_frame()) == ["message", "news", "hello"]
