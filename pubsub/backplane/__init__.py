"""Scale-out: several nodes of this server acting as one broker.

A backplane carries each node's publishes to the other nodes and brings
theirs back, through an engine that already does this well (Redis), rather
than a cluster protocol of our own.  :mod:`pubsub.backplane.redis` is the
bridge to one Redis, :mod:`pubsub.backplane.redis_cluster` to a Redis
Cluster; the engine sees either only as a :class:`pubsub.core.engine.Relay`.
"""

from pubsub.backplane.redis import RedisBackplane, parse_url
from pubsub.backplane.redis_cluster import RedisClusterBackplane, is_cluster_url

__all__ = ["RedisBackplane", "RedisClusterBackplane", "is_cluster_url", "parse_url"]
