"""The demo page and pubsub.js in a real browser: headless Chromium, driven
as a person would use the page, against real server processes."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from playwright.sync_api import expect

from tests.browser.demo import (
    STEP_TIMEOUT,
    exchange,
    messages,
    open_demo,
    publish,
    save_screenshot,
    subscribe,
)
from tests.support.processes import ChildServer

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "embedded.py"


def loaded_scripts(page) -> list[str]:
    return page.evaluate(
        "performance.getEntriesByType('resource')"
        ".filter(e => e.initiatorType === 'script' || e.name.endsWith('.js')).map(e => e.name)"
    )


def test_two_pages_exchange_messages_through_the_demo_page(browser, twistd):
    port = twistd().start()
    url = f"http://127.0.0.1:{port}/"
    alice, bob = exchange(browser, url)
    assert messages(alice) == [
        ["message", "news", "Release 1.0 is out"],
        ["pmessage", "alerts.disk (alerts.*)", "disk 91% full on db-2"],
        ["message", "news", '{"id": 42, "title": "JSON works too"}'],
    ]
    assert messages(bob) == [["message", "chat", "thanks, on it"]]
    expect(bob.locator("#log li.info", has_text="published to").first).to_contain_text(
        "published to 1 receiver"
    )
    # The page runs the client the server serves, not a copy of its own.
    assert f"{url}pubsub.js" in loaded_scripts(alice)
    script = alice.request.get(f"{url}pubsub.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "export class PubSubClient" in script.text()


def test_a_page_reconnects_and_resubscribes_after_the_server_restarts(browser, twistd):
    server = twistd()
    port = server.start()
    url = f"http://127.0.0.1:{port}/"
    alice = open_demo(browser, url)
    subscribe(alice, "news")
    subscribe(alice, "alerts.*", pattern=True)
    status = alice.locator("#status")
    server.kill()
    expect(status).to_have_attribute("data-state", "reconnecting")
    expect(status).to_contain_text("reconnecting")
    server.start(f"tcp:{port}:interface=127.0.0.1")
    expect(status).to_have_attribute("data-state", "open", timeout=STEP_TIMEOUT * 2)
    expect(alice.locator("#log li.info .text").first).to_have_text(
        "reconnected; subscribed again to news, alerts.*", timeout=STEP_TIMEOUT
    )
    bob = open_demo(browser, url)
    publish(bob, "news", "published after the restart")
    publish(bob, "alerts.cpu", "load 12")
    expect(alice.locator("#log li.pmessage")).to_have_count(1)
    assert messages(alice) == [
        ["message", "news", "published after the restart"],
        ["pmessage", "alerts.cpu (alerts.*)", "load 12"],
    ]
    expect(bob.locator("#log li.info", has_text="published to").first).to_contain_text(
        "published to 1 receiver"
    )


def test_message_text_is_shown_as_text_and_the_log_is_capped(browser, twistd):
    port = twistd().start()
    url = f"http://127.0.0.1:{port}/"
    alice = open_demo(browser, url)
    bob = open_demo(browser, url)
    subscribe(alice, "x")
    hostile = "<img src=nowhere onerror=\"document.title='owned'\"><b>bold</b>"
    publish(bob, "x", hostile)
    expect(alice.locator("#log li.message .text")).to_have_text(hostile)
    assert alice.locator("#log img, #log b").count() == 0
    assert alice.title() == "pubsub demo"
    limit = int(alice.locator("#log").get_attribute("data-limit"))
    # A busy channel: more messages than the log keeps, published by pubsub.js
    # itself from bob's page.
    sent = bob.evaluate(
        """async (count) => {
            const { PubSubClient } = await import("/pubsub.js");
            const client = new PubSubClient(location.href, { reconnect: false });
            let receivers = 0;
            for (let i = 0; i < count; i++) receivers += await client.publish("x", `m${i}`);
            await client.close();
            return receivers;
        }""",
        limit + 25,
    )
    assert sent == limit + 25
    expect(alice.locator("#log li.message .text").first).to_have_text(f"m{limit + 24}")
    expect(alice.locator("#log li")).to_have_count(limit)


def test_the_demo_page_works_where_an_application_mounts_it(browser):
    server = ChildServer(
        lambda port: [sys.executable, str(EXAMPLE), "--port", port],
        r"embedded app on http://127.0.0.1:(\d+)/",
    )
    port = server.start()
    try:
        # No trailing slash: the client and the WebSocket still live below /pubsub.
        page = open_demo(browser, f"http://127.0.0.1:{port}/pubsub")
        assert f"http://127.0.0.1:{port}/pubsub/pubsub.js" in loaded_scripts(page)
        expect(page.locator("#url")).to_have_value(f"ws://127.0.0.1:{port}/pubsub/")
        subscribe(page, "ticks")  # the application publishes the time there every second
        expect(page.locator("#log li.message .where").first).to_have_text("ticks")
    finally:
        server.stop()


def test_make_screenshot_saves_a_picture_of_the_demo_page(browser, tmp_path):
    """What `make screenshot` runs to refresh docs/demo.png."""
    target = tmp_path / "demo.png"
    save_screenshot(browser, target)
    picture = target.read_bytes()
    assert picture.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", picture[16:24])
    assert (width, height) == (1200, 760)
