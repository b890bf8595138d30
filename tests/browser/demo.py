"""Driving the demo page as a person would, with Playwright's sync API and
Debian's Chromium; shared by the browser tests and ``make screenshot``.

Run as ``python -m tests.browser.demo docs/demo.png`` (what ``make
screenshot`` does) it starts its own server, as ``make run`` does, and saves a
screenshot of the demo page after a short exchange of messages, and a
message recovered after the page was away.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from tests.support.processes import twistd_process

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking switches Chromium reaches out to Google's
# services at start-up; on a closed network that stalls or fails the launch.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Milliseconds any one step may take; a failing test ends instead of hanging.
STEP_TIMEOUT = 30_000


def launch(playwright: Playwright) -> Browser:
    """Debian's Chromium, never a browser of Playwright's own."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_demo(browser: Browser, url: str, viewport: dict | None = None) -> Page:
    """A new page on the demo at ``url``, once it is connected."""
    page = browser.new_context(viewport=viewport or {"width": 1200, "height": 760}).new_page()
    page.set_default_timeout(STEP_TIMEOUT)
    page.goto(url)
    expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=STEP_TIMEOUT)
    return page


def subscribe(page: Page, name: str, pattern: bool = False) -> None:
    page.fill("#subscribe-name", name)
    page.click("#psubscribe" if pattern else "#subscribe")
    expect(page.locator(f'#held li[data-name="{name}"]')).to_be_visible()
    expect(page.locator("#log li.info", has_text=name).first).to_contain_text("subscribed")


def publish(page: Page, channel: str, message: str) -> None:
    """Publishes through the form and waits for the receiver count to be shown."""
    before = page.locator("#log li.info", has_text="published to").count()
    page.fill("#publish-channel", channel)
    page.fill("#publish-message", message)
    page.click("#publish")
    expect(page.locator("#log li.info", has_text="published to")).to_have_count(before + 1)


def messages(page: Page) -> list[list[str]]:
    """The log's message rows, oldest first: [kind, where, text]."""
    rows = page.locator("#log li.message, #log li.pmessage")
    found = rows.evaluate_all(
        "items => items.map(li => [...li.querySelectorAll('.kind, .where, .text')]"
        ".map(span => span.textContent))"
    )
    return list(reversed(found))


def exchange(browser: Browser, url: str) -> tuple[Page, Page]:
    """Two people on the demo page: one subscribes, the other publishes."""
    alice = open_demo(browser, url)
    bob = open_demo(browser, url)
    subscribe(alice, "news")
    subscribe(alice, "alerts.*", pattern=True)
    subscribe(bob, "chat")
    publish(bob, "news", "Release 1.0 is out")
    publish(bob, "alerts.disk", "disk 91% full on db-2")
    publish(alice, "chat", "thanks, on it")
    publish(bob, "news", '{"id": 42, "title": "JSON works too"}')
    expect(alice.locator("#log li.message")).to_have_count(2)
    expect(alice.locator("#log li.pmessage")).to_have_count(1)
    expect(bob.locator("#log li.message")).to_have_count(1)
    return alice, bob


def away_and_back(alice: Page, bob: Page) -> None:
    """Alice disconnects, bob publishes, alice connects again: her page
    recovers the message from the server's history."""
    alice.click("#disconnect")
    expect(alice.locator("#status")).to_have_attribute("data-state", "closed")
    publish(bob, "news", "Release 1.0.1 fixes the installer")
    alice.click("#connect")
    expect(alice.locator("#log li.info .text", has_text="missed")).to_have_text(
        "subscribed; recovered 1 missed message"
    )
    expect(alice.locator("#log li.recovered .text")).to_have_text(
        "Release 1.0.1 fixes the installer"
    )


def save_screenshot(browser: Browser, path: Path) -> None:
    """Starts a server as make run does, has two pages talk, the subscriber
    step away and come back, and saves the subscriber's page."""
    server = twistd_process("--history-channels", "*")
    port = server.start()
    try:
        alice, bob = exchange(browser, f"http://127.0.0.1:{port}/")
        away_and_back(alice, bob)
        alice.screenshot(path=str(path))
        alice.context.close()
        bob.context.close()
    finally:
        server.stop()


def main(path: Path) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            save_screenshot(browser, path)
        finally:
            browser.close()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/demo.png")
    main(target)
    print(f"saved {target}")
