"""Simulated time for tests: a clock whose timers fire only when the test advances it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class FakeTimer:
    """A timer of :class:`FakeClock`."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Simulated time: timers fire only when the test advances the clock."""

    def __init__(self) -> None:
        self.time = 100.0
        self._timers: list[tuple[float, int, FakeTimer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.time

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._timers, (self.time + delay, next(self._seq), timer, callback))
        return timer

    @property
    def pending(self) -> int:
        return sum(not timer.cancelled for _, _, timer, _ in self._timers)

    async def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers in order and letting the loop run after each."""
        await settle()  # what was started before the advance happens before it
        end = self.time + seconds
        while self._timers and self._timers[0][0] <= end + 1e-12:
            when, _, timer, callback = heapq.heappop(self._timers)
            self.time = max(self.time, when)
            if not timer.cancelled:
                callback()
                await settle()
        self.time = end
        await settle()


async def settle(turns: int = 10) -> None:
    """Let ready tasks and callbacks run (no time passes on the fake clock)."""
    for _ in range(turns):
        await asyncio.sleep(0)
