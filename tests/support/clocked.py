"""Server factories whose every timer runs on a test's ``Clock``."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from pubsub.core.engine import Engine
from pubsub.operations.config import Settings
from pubsub.websocket.protocol import PubSubServerFactory


def websocket_factory(clock: Clock, **settings: Any) -> PubSubServerFactory:
    """A pub/sub factory on ``clock`` under ``Settings(**settings)``: its
    handshake and ping timers run on the factory's clock too."""
    return PubSubServerFactory(Engine(), Settings(**settings), reactor=clock)
