"""pubsub.internals against the real classes: every private name it uses is where it expects.

If Autobahn, txaio or Twisted moves one of them, a test here fails first,
and the start-up self-check (``websocket.check_fast_paths``) turns the fast
paths off instead of failing connections; the last tests show that fallback.
"""

from __future__ import annotations

import json
import signal

import autobahn.util
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import wildcards2patterns
from twisted.internet import abstract, defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from pubsub import internals
from pubsub.hosting.timers import BatchedTimer
from pubsub.websocket import protocol as websocket
from tests.support import wsframes
from tests.unit.test_front import connect
from tests.unit.test_handshake import head, opened_here, through_autobahn


def opened_here_protocol(protocol) -> bool:
    return bool(protocol._lean_opened) and "utf8validator" not in vars(protocol)


def autobahn_opened(make_front, **settings):
    """A connection opened by Autobahn's own handshake, on a fresh factory."""
    front = make_front(**settings)
    return through_autobahn(front.resource.factory, head()).protocol


# -- Autobahn ----------------------------------------------------------------------------


def test_an_autobahn_opened_connection_holds_every_name_written_at_open(make_front):
    opened = autobahn_opened(make_front)
    held = vars(opened)
    assert set(internals.OPENED) <= set(held)
    assert set(internals.LAZY) <= set(held)
    assert held["state"] == internals.OPENED["state"]
    assert "_wskey" in held


def test_a_new_connection_holds_what_autobahns_init_sets_but_what_is_built_on_first_use():
    factory = WebSocketServerFactory()
    ours = websocket.PubSubServerProtocol()
    theirs = websocket.PubSubServerProtocol()
    internals.init_as_autobahn(theirs)
    assert set(vars(theirs)) - set(vars(ours)) == {"is_open", "_transport_details"}
    assert set(internals.LAZY) >= set(vars(theirs)) - set(vars(ours))
    ours.factory = theirs.factory = factory
    assert internals.differences(ours, theirs) == []


def test_is_open_fires_at_open_whenever_it_was_first_read(make_front):
    """Read before the front opens the connection (in ``onConnect``), or after."""
    front = make_front()
    asked_early = []
    factory = front.resource.factory
    connect_as_autobahn = factory.protocol.onConnect

    def on_connect(protocol, request):
        asked_early.append(protocol.is_open)
        assert not protocol.is_open.called
        return connect_as_autobahn(protocol, request)

    factory.protocol = type("Asking", (factory.protocol,), {"onConnect": on_connect})
    early = connect(front, head()).protocol
    assert opened_here_protocol(early) and asked_early[0].called
    late = connect(make_front(), head()).protocol
    assert opened_here_protocol(late) and late.is_open.called
    # Refused by Autobahn's handshake: never opened, so it never fires.
    refused = connect(make_front(), head(drop=("Host",))).protocol
    assert refused is not None and not refused.is_open.called


def test_autobahns_debug_values_become_plain_text(monkeypatch):
    pytest.importorskip("click")  # installed with the development extras
    monkeypatch.setattr(autobahn.util, "_HAS_CLICK", True)
    assert autobahn.util.hl("x") != "x"  # coloured: the name does what the seam expects
    internals.plain_debug_values()
    assert autobahn.util.hl("x") == "x"


def test_without_the_name_plain_debug_values_changes_nothing(monkeypatch):
    monkeypatch.delattr(autobahn.util, "_HAS_CLICK")
    internals.plain_debug_values()
    assert not hasattr(autobahn.util, "_HAS_CLICK")


def test_the_methods_called_exist_on_autobahns_server_protocol():
    for name in internals.METHODS:
        assert callable(getattr(WebSocketServerProtocol, name)), name


def test_the_reader_state_and_compression_read_autobahns_own(make_front):
    opened = autobahn_opened(make_front)
    assert internals.reader_busy(opened) is False
    assert internals.compression(opened) is None
    opened.dataReceived(wsframes.client_frame(b"half", fin=False))  # Autobahn reads fragments
    assert internals.reader_busy(opened) is True
    assert opened.inside_message


def test_autobahn_schedules_pings_and_timeouts_on_the_factorys_batched_timer(clock):
    factory = WebSocketServerFactory(reactor=clock)
    factory.protocol = WebSocketServerProtocol
    timer = BatchedTimer(clock)
    internals.use_batched_timer(factory, timer)
    factory.setProtocolOptions(autoPingInterval=5, openHandshakeTimeout=3)
    connection = factory.buildProtocol(None)
    connection.makeConnection(wsframes_transport())
    assert timer._buckets  # the handshake timeout, scheduled by Autobahn on our timer
    connection.dataReceived(wsframes.handshake())
    clock.advance(5.2)
    assert wsframes.parse_frames(connection.transport.value().partition(b"\r\n\r\n")[2]) == [
        (wsframes.PING, connection.autoPingPending)
    ]


def wsframes_transport():
    from tests.unit.test_websocket import Transport

    return Transport()


def test_the_origin_check_is_autobahns(make_front):
    factory = make_front().resource.factory
    patterns = wildcards2patterns(["https://app.example.com:443"])
    assert internals.origin_allowed("https://app.example.com", factory, patterns)
    assert not internals.origin_allowed("https://evil.example.com", factory, patterns)
    assert not internals.origin_allowed("not a url", factory, patterns)
    assert internals._url_to_origin is not None and internals._is_same_origin is not None


def test_a_connection_opened_by_the_front_is_failed_and_pinged_through_the_seam(make_front, clock):
    front = make_front(ping_interval=5, ping_timeout=5)
    transport = connect(front, head())
    assert opened_here(transport)
    clock.advance(5.2)
    frames = wsframes.parse_frames(wsframes.split_response(transport.value())[1])
    assert [opcode for opcode, _ in frames] == [wsframes.PING]
    internals.fail(transport.protocol, 1008, "bye")
    clock.advance(0)
    last = wsframes.parse_frames(wsframes.split_response(transport.value())[1])[-1]
    assert last[0] == wsframes.CLOSE and wsframes.close_code(last[1]) == 1008


# -- Twisted -----------------------------------------------------------------------------


class _Keep(protocol.Protocol):
    def __init__(self, made: defer.Deferred) -> None:
        self._made = made

    def connectionMade(self) -> None:
        self._made.callback(self.transport)


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.waiting: list[tuple[bytes, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for entry in list(self.waiting):
            if self.received.endswith(entry[0]):
                self.waiting.remove(entry)
                entry[1].callback(self.received)

    def until(self, end: bytes) -> defer.Deferred:
        waiting: defer.Deferred = defer.Deferred()
        self.waiting.append((end, waiting))
        return waiting.addTimeout(30, reactor)


@pytest_twisted.inlineCallbacks
def test_a_real_tcp_server_transport_is_written_to_directly_only_while_it_buffers_nothing():
    made: defer.Deferred = defer.Deferred()
    factory = protocol.Factory.forProtocol(lambda: _Keep(made))
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    client = yield connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), _Collect()
    )
    try:
        server = yield made
        assert type(server).__name__ == "Server"
        own = vars(server)
        assert "socket" in own and "_tempDataBuffer" in own
        for name in ("dataBuffer", "offset", "_writeDisconnected"):
            assert hasattr(abstract.FileDescriptor, name), name
        internals.send_now(server, [b"straight ", b"to the socket;"])
        assert not server._tempDataBuffer and not server.dataBuffer  # Twisted holds nothing
        server.write(b" held by Twisted;")
        internals.send_now(server, [b" behind it"])
        assert server._tempDataBuffer == [b" held by Twisted;", b" behind it"]
        assert (yield client.until(b"behind it")) == (
            b"straight to the socket; held by Twisted; behind it"
        )
        keeper = internals.protocol_of(server)
        assert isinstance(keeper, _Keep)
        other = protocol.Protocol()
        internals.hand_over(server, other)
        assert server.protocol is other and internals.protocol_of(server) is other
    finally:
        client.transport.abortConnection()
        yield port.stopListening()


def test_a_transport_without_a_socket_of_its_own_gets_write_sequence():
    transport = wsframes_transport()
    internals.send_now(transport, [b"a", b"b"])
    assert transport.value() == b"ab"


def test_a_tls_wrapper_hands_over_its_wrapped_protocol():
    inner, other = protocol.Protocol(), protocol.Protocol()
    wrapper = ProtocolWrapper(WrappingFactory(protocol.Factory()), inner)
    assert internals.protocol_of(wrapper) is inner
    internals.hand_over(wrapper, other)
    assert wrapper.wrappedProtocol is other


def test_the_reactor_records_the_signal_that_stopped_it():
    assert hasattr(reactor, "_exitSignal")

    class Stopped:
        _exitSignal = signal.SIGTERM

    stopped = Stopped()
    internals.forget_exit_signal(stopped, signal.SIGINT)
    assert stopped._exitSignal == signal.SIGTERM
    internals.forget_exit_signal(stopped, signal.SIGTERM, signal.SIGINT)
    assert stopped._exitSignal is None


# -- the start-up self-check and its fallback ----------------------------------------------


def test_the_self_check_finds_nothing_with_the_installed_autobahn():
    assert websocket.check_fast_paths() == []
    assert internals.fast_paths


def test_a_difference_turns_the_fast_paths_off_with_one_log_line(make_front, clock, monkeypatch):
    monkeypatch.setattr(internals, "fast_paths", True)
    changed = {**internals.OPENED, "a_name_autobahn_never_sets": 1}
    monkeypatch.setattr(internals, "OPENED", changed)
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        found = websocket.check_fast_paths()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert found == ["Autobahn does not set a_name_autobahn_never_sets"]
    assert not internals.fast_paths
    warnings = [event for event in logged if "fast WebSocket paths" in event["log_format"]]
    assert len(warnings) == 1

    # Every connection now opens and reads through Autobahn's code, and works.
    front = make_front()
    transport = connect(front, head())
    assert not opened_here(transport)
    transport.clear()
    transport.protocol.dataReceived(wsframes.command("PING", "still here"))
    clock.advance(0)
    assert [json.loads(p) for _, p in wsframes.parse_frames(transport.value())] == [
        ["pong", "still here"]
    ]
    factory = front.resource.factory
    assert (factory.lean_opens, factory.lean_reads) == (0, 0)
    # Nothing is left to be built on first use: Autobahn's own __init__ ran.
    assert {"is_open", "_transport_details"} <= set(vars(factory.buildProtocol(None)))


def test_a_name_autobahns_init_sets_anew_is_a_difference(monkeypatch):
    monkeypatch.setattr(internals, "fast_paths", True)
    init = websocket.WebSocketProtocol.__init__

    def changed(protocol):
        init(protocol)
        protocol.a_name_autobahn_sets_at_init = 1

    monkeypatch.setattr(websocket.WebSocketProtocol, "__init__", changed)
    assert websocket.check_fast_paths() == ["Autobahn sets a_name_autobahn_sets_at_init"]
    assert not internals.fast_paths


@pytest.mark.parametrize("broken", ["_onOpen", "_fail_connection"])
def test_a_method_autobahn_no_longer_has_is_a_difference(monkeypatch, broken):
    monkeypatch.setattr(internals, "fast_paths", True)
    monkeypatch.setattr(internals, "METHODS", (*internals.METHODS, broken + "_gone"))
    assert websocket.check_fast_paths() == [f"Autobahn has no {broken}_gone"]
    assert not internals.fast_paths
