"""/metrics: the server's figures in Prometheus's text format, for both transports."""

from __future__ import annotations

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.client import Agent, readBody


@pytest_twisted.inlineCallbacks
def scrape(port: int) -> dict:
    response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/metrics" % port)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4; charset=utf-8"
    ]
    text = (yield readBody(response)).decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def figure(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest_twisted.inlineCallbacks
def test_metrics_count_both_transports(resp_server, connect, resp_connect):
    port, resp_port = resp_server.port, resp_server.resp_port
    before = yield scrape(port)
    assert figure(before, "pubsub_publishes_total") == 0
    assert figure(before, "pubsub_connections", transport="websocket") == 0

    websocket = yield connect(port)
    resp = yield resp_connect(resp_port)
    yield websocket.call("SUBSCRIBE", "news", "sport")
    yield websocket.call("PSUBSCRIBE", "n*")
    yield resp.call("SSUBSCRIBE", "shard")
    yield resp.call("SUBSCRIBE", "news")
    publisher = yield connect(port)
    yield publisher.call("PUBLISH", "news", "x" * 100)  # 3 deliveries
    yield publisher.call("SPUBLISH", "shard", "y")  # 1 delivery
    yield publisher.call("PUBLISH", "empty", "z")  # none
    yield publisher.call("NOPE")
    yield publisher.call("PUBLISH", "only-one-argument")
    yield resp.call("PUBLISH", "refused", "in RESP2 subscribed mode")
    resp_server.engine.publish("news", "from the application")  # 3 more

    samples = yield scrape(port)
    assert figure(samples, "pubsub_connections", transport="websocket") == 2
    assert figure(samples, "pubsub_connections", transport="resp") == 1
    assert figure(samples, "pubsub_subscriptions") == 5
    assert figure(samples, "pubsub_channels") == 2
    assert figure(samples, "pubsub_patterns") == 1
    assert figure(samples, "pubsub_shard_channels") == 1
    assert figure(samples, "pubsub_publishes_total") == 4
    assert figure(samples, "pubsub_deliveries_total") == 7
    errors = {key: value for key, value in samples.items() if key[0] == "pubsub_errors_total"}
    assert errors == {
        ("pubsub_errors_total", (("kind", "unknown_command"), ("transport", "websocket"))): 1,
        ("pubsub_errors_total", (("kind", "wrong_arity"), ("transport", "websocket"))): 1,
        ("pubsub_errors_total", (("kind", "subscribed_mode"), ("transport", "resp"))): 1,
    }
    assert figure(samples, "pubsub_bytes_out_total", transport="websocket") > 3 * 100
    assert figure(samples, "pubsub_bytes_out_total", transport="resp") > 2 * 100
    assert figure(samples, "pubsub_slow_consumer_disconnects_total", transport="resp") == 0
    assert figure(samples, "pubsub_uptime_seconds") >= 0
    # Both WebSocket clients were opened and read by the server's own fast path.
    assert (
        figure(samples, "pubsub_websocket_fast_path_total", endpoint="pubsub", step="opened") == 2
    )
    assert figure(samples, "pubsub_websocket_fast_path_total", endpoint="pubsub", step="read") == 2
