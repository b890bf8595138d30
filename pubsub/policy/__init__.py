"""What a port lets a client do: tokens and permissions, and the limits.

``auth`` checks tokens (JWT) and the channels they allow; ``limits`` holds
the origin allow-list, connections per address, the publish rate and the
idle timeout.  None of it touches a socket, and the core knows none of it.
"""
