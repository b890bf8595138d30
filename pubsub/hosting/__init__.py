"""One connection layer for both transports.

``port`` is what a transport's factory and its connections share: a
:class:`~pubsub.hosting.port.Port` built once from the settings, and how a
:class:`~pubsub.hosting.port.HostedClient` opens, receives, delivers and
closes.  ``outbox`` writes each connection's output once per reactor turn
under the output buffer limits; ``timers`` serve many connections with one
reactor timer.
"""
