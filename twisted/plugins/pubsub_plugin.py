"""twistd plugin: ``twistd pubsub`` builds the server from pubsub.service."""

from twisted.application.service import ServiceMaker

pubsub = ServiceMaker(
    "pubsub",
    "pubsub.service",
    "Redis Pub/Sub over WebSocket (JSON protocol)",
    "pubsub",
)
