"""Scale-out: several nodes of this server acting as one broker.

A backplane carries each node's publishes to the other nodes and brings
theirs back, through an engine that already does this well (Redis), rather
than a cluster protocol of our own.  :mod:`pubsub.backplane.redis` is the
bridge; the engine sees it only as a :class:`pubsub.engine.Relay`.
"""

from pubsub.backplane.redis import RedisBackplane, parse_url

__all__ = ["RedisBackplane", "parse_url"]
