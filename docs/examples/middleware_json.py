"""A middleware: every published payload must be valid JSON.

A PUBLISH or SPUBLISH whose payload does not parse as JSON is refused with
``NOPERM payload is not valid JSON``, and nothing is delivered::

    PYTHONPATH=docs/examples twistd -n pubsub --middleware middleware_json:JsonOnly
"""

from __future__ import annotations

import json

from pubsub import Client, Middleware, Refused


class JsonOnly(Middleware):
    def on_publish(self, client: Client, kind: str, channel: bytes, payload: bytes) -> None:
        try:
            json.loads(payload)
        except ValueError:  # UnicodeDecodeError and json's JSONDecodeError included
            raise Refused("payload is not valid JSON") from None
