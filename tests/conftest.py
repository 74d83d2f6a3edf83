"""Shared test configuration: async tests run on asyncio (anyio's pytest plugin)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, the loop embserve is built on."""
    return "asyncio"


@pytest.fixture
def no_thread_left() -> Iterator[None]:
    """Fail the test if it leaves a thread running that was not there before."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads left behind: {left}"
