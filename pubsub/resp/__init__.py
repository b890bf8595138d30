"""The Redis wire protocol (RESP2 and RESP3) over TCP.

``reader`` reads requests with Redis's limits (no Twisted), ``commands``
holds the connection commands only RESP has, and ``protocol`` the protocol
and factory that run them with the shared command table.
"""
