"""Fixtures the unit tests share: a Clock, and WebSocket factories and front
doors whose every timer runs on it."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.web.server import Site

from pubsub.web.front import FrontFactory
from pubsub.web.site import PubSubResource
from tests.support.clocked import websocket_factory


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_factory(clock):
    """``make_factory(**settings)``: a pub/sub WebSocket factory on the clock."""
    return lambda **settings: websocket_factory(clock, **settings)


@pytest.fixture
def make_front(clock):
    """``make_front(**settings)``: the port's front door, its Site and factory on the clock."""

    def make(**settings):
        factory = websocket_factory(clock, **settings)
        resource = PubSubResource(factory, clock)
        return FrontFactory(Site(resource, timeout=factory.settings.open_handshake_timeout), clock)

    return make
