"""Fixtures the integration test modules share."""

from tests.integration.test_backplane import nodes  # noqa: F401 - the twistd nodes of a backplane
