"""Server factories whose every timer runs on a test's ``Clock``."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from txaio._common import _BatchedTimer

from pubsub.config import Settings
from pubsub.engine import Engine
from pubsub.websocket import PubSubServerFactory


def websocket_factory(clock: Clock, **settings: Any) -> PubSubServerFactory:
    """A pub/sub factory on ``clock`` under ``Settings(**settings)``."""
    factory = PubSubServerFactory(Engine(), Settings(**settings), reactor=clock)
    # Autobahn schedules its handshake and ping timers through txaio's global
    # loop; keep them on this test's clock instead of the real reactor.
    factory._batched_timer = _BatchedTimer(
        200.0, 1000, seconds_provider=clock.seconds, delayed_call_creator=clock.callLater
    )
    return factory
