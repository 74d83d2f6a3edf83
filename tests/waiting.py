"""Waiting for state in tests: poll with a deadline, never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T], timeout_s: float = 20.0, step_s: float = 0.005) -> T:
    """Poll ``probe`` until it returns something true and return that; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing within {timeout_s} s (last: {value!r})")
        time.sleep(step_s)


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Return once ``predicate()`` is true; fail the test if the deadline passes first."""
    wait_for(predicate, timeout_s)


def settle(responses: Iterable[Any], timeout_s: float = 20.0) -> list[Any]:
    """Each response's result, or the exception it ended with (a ``TimeoutError`` for one
    still not done after ``timeout_s``), in order."""
    ended: list[Any] = []
    for response in responses:
        try:
            ended.append(response.result(timeout_s=timeout_s))
        except Exception as exc:
            ended.append(exc)
    return ended
