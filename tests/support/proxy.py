"""A TCP proxy on 127.0.0.1 that the test controls: the network between a
client and a server, made to fail on the test's word.

Each connection accepted is forwarded to the proxy's *target* (a Redis, a
pubsub node: any TCP server), and the test can:

- :meth:`~TcpProxy.reset` every connection now: both sides get a RST, as
  from a NAT or firewall that dropped the flow, or a balancer restarting;
- :meth:`~TcpProxy.go_silent`: bytes stop, in one direction or both, and so
  do closes, with neither side told (a partition, a paused VM, a half-open
  connection); new connections are accepted and never get through;
- :meth:`~TcpProxy.heal` the silence: every connection held through it is
  reset (as a NAT that lost its table does, once packets flow again), and
  new connections are forwarded again;
- :meth:`~TcpProxy.hold` new connections: accepted, and kept waiting with
  what the client sent until :meth:`~TcpProxy.release`, so that a client
  that reconnects cannot come back before the test lets it;
- :meth:`~TcpProxy.forward_to` another target: connections from then on go
  there (a client coming back to another node behind the same address).

Everything runs on the test's reactor, on the test's word; nothing here sleeps.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

__all__ = ["TcpProxy"]


class _Pipe(Protocol):
    """One side of a proxied connection: what it receives goes to ``peer``,
    toward the target when ``toward_target``, unless the proxy is silent
    that way, and then it is dropped."""

    def __init__(self, proxy: TcpProxy, toward_target: bool) -> None:
        self.proxy = proxy
        self.toward_target = toward_target
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []  # from the client, before the target is connected

    def connectionMade(self) -> None:
        self.proxy.pipes.add(self)

    def _silenced(self) -> bool:
        return self.proxy.silenced(self.toward_target)

    def dataReceived(self, data: bytes) -> None:
        if self._silenced():
            return  # into the void: no reply, no error, no close
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.proxy.pipes.discard(self)
        # A close crosses a silent link no more than data does.
        if not self._silenced() and self.peer is not None:
            self.peer.transport.loseConnection()


class _ClientSide(_Pipe):
    """A connection accepted from a client: forwarded to the target at once,
    never while the proxy is silent, and once released while it holds."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.proxy.accepted += 1
        if self.proxy.silent:
            return  # a partition: this connection never gets through
        if self.proxy.holding:
            self.proxy.held.append(self)
            return
        self.join()

    def join(self) -> None:
        """Connect to the target, and forward once connected."""
        host, port = self.proxy.target
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=5)
        factory = _PipeFactory(self.proxy, _Pipe, toward_target=False)
        endpoint.connect(factory).addCallbacks(self._joined, self._failed)

    def _joined(self, upstream: _Pipe) -> None:
        if not self.transport.connected or self.proxy.silent:
            upstream.transport.abortConnection()
            return
        self.peer, upstream.peer = upstream, self
        for data in self.pending:
            upstream.transport.write(data)
        self.pending = []

    def _failed(self, reason: Any) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.proxy.held:
            self.proxy.held.remove(self)
        super().connectionLost(reason)


class _PipeFactory(Factory):
    noisy = False

    def __init__(self, proxy: TcpProxy, protocol: type[_Pipe], toward_target: bool) -> None:
        self.proxy = proxy
        self.protocol_class = protocol
        self.toward_target = toward_target

    def buildProtocol(self, addr: Any) -> _Pipe:
        return self.protocol_class(self.proxy, self.toward_target)


class TcpProxy:
    """A TCP proxy on 127.0.0.1 to ``host``:``port`` (the *target*); see the module."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        #: Whether bytes (and closes) toward the target, and toward the client, are dropped.
        self.silent_toward_target = False
        self.silent_toward_client = False
        self.holding = False
        #: Both sides of every connection open through the proxy.
        self.pipes: set[_Pipe] = set()
        #: Connections accepted while holding, waiting for :meth:`release`, oldest first.
        self.held: list[_ClientSide] = []
        #: Connections accepted from clients since the start.
        self.accepted = 0
        self.listening: Any = None

    @property
    def port(self) -> int:
        return self.listening.getHost().port

    @property
    def silent(self) -> bool:
        return self.silent_toward_target or self.silent_toward_client

    def silenced(self, toward_target: bool) -> bool:
        """Whether what travels toward the target (else toward the client) is dropped."""
        return self.silent_toward_target if toward_target else self.silent_toward_client

    @defer.inlineCallbacks
    def start(self):
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        factory = _PipeFactory(self, _ClientSide, toward_target=True)
        self.listening = yield endpoint.listen(factory)

    def forward_to(self, port: int, host: str = "127.0.0.1") -> None:
        """Connections forwarded from now on go to ``host``:``port``; those
        open stay with the target they have."""
        self.target = (host, port)

    def reset(self) -> None:
        """Reset every connection now (an abort: a RST, not a FIN), on both
        sides, those held included."""
        for pipe in list(self.pipes):
            pipe.transport.abortConnection()

    def go_silent(self, toward_target: bool = True, toward_client: bool = True) -> None:
        """Drop what travels one way or both, closes included, telling nobody;
        connections accepted while silent never get through."""
        if not (toward_target or toward_client):
            raise ValueError("silent in neither direction")
        self.silent_toward_target = toward_target
        self.silent_toward_client = toward_client

    def heal(self) -> None:
        """End the silence: reset every connection held through it, those
        waiting for :meth:`release` excepted; new ones forward."""
        self.silent_toward_target = self.silent_toward_client = False
        for pipe in list(self.pipes):
            if pipe not in self.held:
                pipe.transport.abortConnection()

    def hold(self) -> None:
        """Keep new connections waiting, with what their clients send, until :meth:`release`."""
        self.holding = True

    def release(self) -> None:
        """Stop holding: forward the connections waiting, oldest first, and new ones."""
        self.holding = False
        held, self.held = self.held, []
        for pipe in held:
            pipe.join()

    @defer.inlineCallbacks
    def stop(self):
        self.silent_toward_target = self.silent_toward_client = self.holding = False
        self.held = []
        self.reset()
        yield self.listening.stopListening()
