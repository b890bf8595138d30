"""The demo page and pubsub.js in a real browser: headless Chromium, driven
as a person would use the page, against real server processes.

The recovery tests put a relay (tests/browser/relay.py) between one page and
the server, and cut its connections: the page's WebSocket ends as when the
network goes, and its reconnect waits at the relay until the test restores
it, so that what is published meanwhile is published while it is away."""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

from playwright.sync_api import Page, expect

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
LOST = "messages after the position are no longer kept"

# A steady publisher in a page, with pubsub.js itself: one message every 25 ms
# or so, each once the last is answered, until window.stopped is set.
START_PUBLISHING = """(channel) => {
    window.sent = 0;
    window.stopped = false;
    window.publishing = (async () => {
        const { PubSubClient } = await import("/pubsub.js");
        const client = new PubSubClient(location.href, { reconnect: false });
        while (!window.stopped) {
            await client.publish(channel, `m${window.sent}`);
            window.sent += 1;
            await new Promise((resolve) => setTimeout(resolve, 25));
        }
        await client.close();
        return window.sent;
    })();
}"""


def sent(page: Page) -> int:
    """How many the page's steady publisher has published (and had answered)."""
    return page.evaluate("window.sent")


def sent_more(page: Page, count: int) -> int:
    """Waits until the steady publisher has published ``count`` more; how many then."""
    wanted = sent(page) + count
    page.wait_for_function("(wanted) => window.sent >= wanted", arg=wanted)
    return sent(page)


def stop_publishing(page: Page) -> int:
    return page.evaluate("async () => { window.stopped = true; return await window.publishing; }")


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
    # The server keeps no history: what was published meanwhile may be lost,
    # and the page says so.
    expect(alice.locator("#notices p span")).to_have_text(
        ["Messages on news may be missing: the channel keeps no history."]
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


def test_a_page_cut_off_gets_what_it_missed_once_in_order_marked_recovered(browser, twistd, relay):
    port = twistd("--history-channels", "room:*").start()
    network = relay(port)
    alice = open_demo(browser, f"http://127.0.0.1:{network.port}/")
    alice.locator("#log").evaluate("log => { log.dataset.limit = 100000; }")
    bob = open_demo(browser, f"http://127.0.0.1:{port}/")
    subscribe(alice, "room:1")
    expect(alice.locator("#log li.info .text").first).to_have_text("subscribed (recoverable)")
    publish(bob, "room:1", "before the cut")
    expect(alice.locator("#log li.message")).to_have_count(1)
    bob.evaluate(START_PUBLISHING, "room:1")
    sent_more(bob, 3)
    status = alice.locator("#status")
    network.cut()
    expect(status).not_to_have_attribute("data-state", "open")
    # Published after the page lost its connection, before it is back.
    away = sent(bob)
    back = sent_more(bob, 5)
    network.restore()
    expect(status).to_have_attribute("data-state", "open")
    caught_up = alice.locator("#log li.info", has_text="published while away")
    expect(caught_up).to_have_count(1)
    # Published after the page's RESUME was answered: live.
    answered = sent(bob)
    sent_more(bob, 3)
    total = stop_publishing(bob)
    expect(alice.locator("#log li.message")).to_have_count(total + 1)
    rows = messages(alice)
    # Every message once, in order (row n + 1 is m<n>).
    assert [text for _, _, text in rows] == ["before the cut"] + [f"m{n}" for n in range(total)]
    assert {where for _, where, _ in rows} == {"room:1"}
    kinds = [kind for kind, _, _ in rows]
    recovered = [row for row, kind in enumerate(kinds) if kind == "recovered"]
    assert set(kinds) == {"message", "recovered"}
    assert recovered == list(range(recovered[0], recovered[-1] + 1))  # one run
    assert set(range(away + 2, back + 1)) <= set(recovered)
    assert kinds[0] == "message" and set(kinds[answered + 2 :]) == {"message"}
    expect(caught_up.locator(".text")).to_have_text(
        f"recovered {len(recovered)} messages published while away"
    )
    expect(alice.locator("#log li.recovered").first).to_have_attribute(
        "title", re.compile(r"^published while this page was away, recovered at \w+:\d+$")
    )
    expect(alice.locator("#notices p")).to_have_count(0)


def test_a_page_shows_a_notice_when_what_it_missed_cannot_be_recovered(browser, twistd, relay):
    port = twistd("--history-channels", "room:*", "--history-size", "3").start()
    network = relay(port)
    alice = open_demo(browser, f"http://127.0.0.1:{network.port}/")
    bob = open_demo(browser, f"http://127.0.0.1:{port}/")
    subscribe(alice, "room:2")
    publish(bob, "room:2", "seen")
    expect(alice.locator("#log li.message")).to_have_count(1)
    status = alice.locator("#status")
    network.cut()
    expect(status).not_to_have_attribute("data-state", "open")
    for number in range(6):  # the history keeps 3
        publish(bob, "room:2", f"missed {number}")
    network.restore()
    expect(status).to_have_attribute("data-state", "open")
    notice = alice.locator("#notices p")
    expect(notice.locator("span")).to_have_text(f"Messages on room:2 may be missing: {LOST}.")
    expect(alice.locator("#log li.gap .text")).to_have_text(
        re.compile(rf"^not recovered: {LOST} \(now at \w+:7\)$")
    )
    publish(bob, "room:2", "live again")
    expect(alice.locator("#log li.message")).to_have_count(2)
    assert messages(alice) == [
        ["message", "room:2", "seen"],
        ["message", "room:2", "live again"],
    ]
    notice.locator("button").click()
    expect(notice).to_have_count(0)


def test_a_page_reconnected_by_hand_recovers_what_it_missed(browser, twistd):
    """Disconnect, then Connect: the new client resumes from the old one's positions."""
    port = twistd("--history-channels", "room:*").start()
    url = f"http://127.0.0.1:{port}/"
    alice = open_demo(browser, url)
    bob = open_demo(browser, url)
    subscribe(alice, "room:3")
    publish(bob, "room:3", "one")
    expect(alice.locator("#log li.message")).to_have_count(1)
    alice.click("#disconnect")
    expect(alice.locator("#status")).to_have_attribute("data-state", "closed")
    publish(bob, "room:3", "two")
    publish(bob, "room:3", "three")
    alice.click("#connect")
    expect(alice.locator("#log li.info .text", has_text="missed")).to_have_text(
        "subscribed; recovered 2 missed messages"
    )
    publish(bob, "room:3", "four")
    expect(alice.locator("#log li.message")).to_have_count(4)
    assert messages(alice) == [
        ["message", "room:3", "one"],
        ["recovered", "room:3", "two"],
        ["recovered", "room:3", "three"],
        ["message", "room:3", "four"],
    ]
