"""The WebSocket port's HTTP side.

``front`` is the front door every connection of the port comes through;
``site`` is :class:`~pubsub.web.site.PubSubResource`, the resource embedders
mount: the WebSocket upgrade, the demo page, the browser client, and the
node's health and metrics.
"""
