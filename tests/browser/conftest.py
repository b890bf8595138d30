"""Fixtures for the browser tests: Debian's Chromium under Playwright, and
``twistd pubsub`` servers as child processes.

Playwright's sync API cannot run inside the Twisted reactor, so these tests
run no reactor work themselves: each server is a real ``twistd`` process of
the installed package (run ``make install`` after changing it). Without
Chromium the tests skip; under PUBSUB_REQUIRE_REDIS (set by ``make test``,
whose ``browser`` target installs Chromium) they fail instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.browser.demo import CHROMIUM, launch
from tests.browser.relay import Relay
from tests.support.processes import ChildServer, twistd_process


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for a module's tests."""
    if not Path(CHROMIUM).exists():
        missing = f"{CHROMIUM} is missing (make browser installs Debian's chromium)"
        if os.environ.get("PUBSUB_REQUIRE_REDIS"):
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def twistd():
    """Make ``twistd pubsub`` processes (``start()`` them); each is stopped after the test."""
    servers: list[ChildServer] = []

    def start(*options: str) -> ChildServer:
        server = twistd_process(*options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def relay():
    """Make a Relay to a server's port (``relay(port)``), whose connections the
    test can cut; each is closed after the test."""
    relays: list[Relay] = []

    def make(target: int) -> Relay:
        made = Relay(target)
        relays.append(made)
        return made

    yield make
    for made in relays:
        made.close()
