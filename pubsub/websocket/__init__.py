"""The WebSocket transport, on Autobahn.

``handshake`` reads plain upgrade requests, ``reader`` opens them and reads
the frames clients send most without Autobahn's general machinery,
``json_codec`` turns docs/protocol.md's JSON frames into commands and
results into frames, ``framing`` builds outgoing frames once per publish,
and ``protocol`` holds the pub/sub and echo protocols and factories.
"""
