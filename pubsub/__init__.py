"""pubsub: Redis Pub/Sub semantics over WebSocket and RESP, for Twisted.

The public embedding API, and nothing else::

    engine = Engine()
    root.putChild(b"pubsub", build_resource(engine))   # in your own Site
    engine.publish("news", "hello")                    # -> receiver count

See docs/embedding.md.
"""

from pubsub.core.engine import Engine
from pubsub.operations.config import ConfigError, Settings, load_settings
from pubsub.operations.service import build_factory, build_resource, make_service
from pubsub.policy.middleware import Client, Middleware, Refused
from pubsub.resp.protocol import RespFactory
from pubsub.web.site import PubSubResource
from pubsub.websocket.protocol import PubSubServerFactory, PubSubServerProtocol

__all__ = [
    "Client",
    "ConfigError",
    "Engine",
    "Middleware",
    "PubSubResource",
    "PubSubServerFactory",
    "PubSubServerProtocol",
    "Refused",
    "RespFactory",
    "Settings",
    "build_factory",
    "build_resource",
    "load_settings",
    "make_service",
]
