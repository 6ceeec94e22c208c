"""Shared fixtures: live Redis and Label Studio servers (see tests/support/live_services.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.live_services import LiveLabelStudio, running_label_studio, running_redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a private, non-persistent redis-server for this test session."""
    with running_redis() as url:
        yield url


@pytest.fixture(scope="session")
def label_studio() -> Iterator[LiveLabelStudio]:
    """A private Label Studio for this test session (url, token, document_root, client)."""
    with running_label_studio() as live:
        yield live
