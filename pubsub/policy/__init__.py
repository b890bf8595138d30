"""What a port lets a client do: tokens and permissions, limits, and middlewares.

``auth`` checks tokens (JWT) and the channels they allow; ``limits`` holds
the origin allow-list, connections per address, the publish rate and the
idle timeout; ``middleware`` is the public API for an application's own
policies and runs them, and ``http_callback`` is one that asks an HTTP
backend.  The core knows none of it.
"""
