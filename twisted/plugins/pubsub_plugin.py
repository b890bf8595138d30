"""twistd plugin: ``twistd pubsub`` builds the server from pubsub.operations.service."""

from twisted.application.service import ServiceMaker

pubsub = ServiceMaker(
    "pubsub",
    "pubsub.operations.service",
    "Redis Pub/Sub over WebSocket (JSON protocol)",
    "pubsub",
)
