"""The core: Redis Pub/Sub as a library, with no I/O and no Twisted.

``engine`` (clients, channels, patterns, shard channels, publish), ``glob``
(Redis's pattern matching), ``vocabulary`` (the subscription kinds and close
codes every layer and the clients share), ``commands`` (the command table
both transports run, with Redis's error texts and this server's limits) and
``wire`` (bytes as JSON carries them).
"""
