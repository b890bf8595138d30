"""The Python client's keepalive options: checked before anything is opened,
and handed to each host's WebSocket library (Autobahn's autoPing*, websockets'
ping_*), where 0 is off."""

from __future__ import annotations

import asyncio
import math

import pytest
from twisted.internet.testing import MemoryReactorClock

from pubsub.client import asyncio as aio
from pubsub.client._core import keepalive
from pubsub.client.twisted import connect as twisted_connect

BAD = [-1, -0.5, math.inf, math.nan, True, "20", None]


def test_keepalive_takes_finite_seconds_from_zero_up():
    assert keepalive(20, 20) == (20.0, 20.0)
    assert keepalive(0.25, 0) == (0.25, 0.0)
    for bad in BAD:
        with pytest.raises(ValueError, match=r"ping_interval is a finite number of seconds"):
            keepalive(bad, 1)
        with pytest.raises(ValueError, match=r"ping_timeout is a finite number of seconds"):
            keepalive(1, bad)


def autobahn_factory(**options):
    """The Autobahn factory of the Twisted host's first connection attempt,
    on a reactor that never connects; the attempt is cancelled after."""
    reactor = MemoryReactorClock()
    opening = twisted_connect("ws://127.0.0.1:9/", reactor=reactor, **options)
    [(_, _, wrapping, _, _)] = reactor.tcpClients
    opening.cancel()
    opening.addErrback(lambda failure: failure.trap(ConnectionError))
    return wrapping._wrappedFactory


def test_the_twisted_host_pings_as_told():
    default = autobahn_factory()
    assert (default.autoPingInterval, default.autoPingTimeout) == (20.0, 20.0)
    quick = autobahn_factory(ping_interval=0.5, ping_timeout=1.5)
    assert (quick.autoPingInterval, quick.autoPingTimeout) == (0.5, 1.5)
    off = autobahn_factory(ping_interval=0, ping_timeout=0)
    assert (off.autoPingInterval, off.autoPingTimeout) == (0, 0)


@pytest.mark.parametrize("option", ["ping_interval", "ping_timeout"])
def test_the_twisted_host_refuses_a_bad_keepalive_before_connecting(option):
    reactor = MemoryReactorClock()
    with pytest.raises(ValueError, match=option):
        twisted_connect("ws://127.0.0.1:9/", reactor=reactor, **{option: -1})
    assert reactor.tcpClients == []


def websockets_options(monkeypatch, **options) -> dict:
    """What the asyncio host hands ``websockets``' connect, which here refuses."""
    seen: dict = {}

    async def refuse(url, **kwargs):
        seen.update(kwargs)
        raise OSError("refused")

    monkeypatch.setattr(aio, "_ws_connect", refuse)
    with pytest.raises(ConnectionError, match="refused"):
        asyncio.run(aio.connect("ws://127.0.0.1:9/", **options))
    return seen


def test_the_asyncio_host_pings_as_told(monkeypatch):
    default = websockets_options(monkeypatch)
    assert (default["ping_interval"], default["ping_timeout"]) == (20.0, 20.0)
    quick = websockets_options(monkeypatch, ping_interval=0.5, ping_timeout=1.5)
    assert (quick["ping_interval"], quick["ping_timeout"]) == (0.5, 1.5)
    off = websockets_options(monkeypatch, ping_interval=0, ping_timeout=0)
    assert (off["ping_interval"], off["ping_timeout"]) == (None, None)  # websockets' off


@pytest.mark.parametrize("option", ["ping_interval", "ping_timeout"])
def test_the_asyncio_host_refuses_a_bad_keepalive_before_connecting(monkeypatch, option):
    attempts = []

    async def connect(url, **kwargs):
        attempts.append(url)

    monkeypatch.setattr(aio, "_ws_connect", connect)
    with pytest.raises(ValueError, match=option):
        asyncio.run(aio.connect("ws://127.0.0.1:9/", **{option: math.nan}))
    assert attempts == []
