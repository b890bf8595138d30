"""The two common Node Redis clients, ioredis and node-redis, against the RESP port.

What they send on connect (ioredis's INFO ready check and CLIENT SETNAME,
node-redis's CLIENT SETINFO, SELECT and HELLO 3) must be answered so they work
unchanged. tests/clients/redis_clients.mjs uses them as an application
would and prints what it saw; `make test` installs them (npm ci in
tests/clients). Without node or the packages the test skips, and under
PUBSUB_REQUIRE_REDIS (set by `make test`) it fails instead.
"""

from __future__ import annotations

import json
import os

import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from tests.support.processes import NODE_CLIENTS, node_with


@pytest_twisted.inlineCallbacks
def test_ioredis_and_node_redis_work_unchanged(resp_server, connect):
    node = node_with("ioredis")
    websocket = yield connect(resp_server.port)
    yield websocket.call("PSUBSCRIBE", "*")
    out, err, code = yield getProcessOutputAndValue(
        node,
        [str(NODE_CLIENTS / "redis_clients.mjs"), str(resp_server.resp_port)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        path=str(NODE_CLIENTS),
    )
    assert code == 0, (out, err)
    seen = json.loads(out.decode().strip().splitlines()[-1])
    binary = [0, 255, 10, 13]
    # Each publish also reaches the WebSocket pattern subscriber: one more receiver.
    assert seen == {
        "ioredis_name": "io-sub",
        "ioredis_subscribe": 1,
        "ioredis_publish": 2,
        "ioredis_message": ["news", binary],
        "ioredis_numsub": ["news", 1],
        "node_redis_resp2_publish": 2,
        "node_redis_resp2_pmessage": ["news", "hello"],
        "node_redis_resp2_numpat": 3,
        "node_redis_resp2_ping": "PONG",
        "node_redis_resp3_publish": 2,
        "node_redis_resp3_pmessage": ["news", "hello"],
        "node_redis_resp3_numpat": 3,
        "node_redis_resp3_ping": "PONG",
    }
    frames = yield websocket.drain()
    assert [frame[3] for frame in frames] == [{"base64": "AP8KDQ=="}, "hello", "hello"]
    assert resp_server.engine.client_count == 1  # every Node connection has gone
