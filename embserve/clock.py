"""Time, injected: where the runtime's controllers and batchers read the time and set timers.

Every deadline, health-check period, autoscaling interval and batch wait is measured on a
:class:`Clock`, so tests run them on simulated time (``Runtime(clock=...)``,
``Batcher(clock=...)``) instead of sleeping. :class:`LoopClock`, the default, is the event
loop's own ``time()`` and ``call_later``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "LoopClock", "Timer", "sleep"]


class Timer(Protocol):
    """A scheduled callback that can be cancelled (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None:
        """Do not run the callback."""
        ...


class Clock(Protocol):
    """A monotonic time source with timers; tests pass a simulated one."""

    def now(self) -> float:
        """Seconds on a monotonic scale (the loop's, ``time.monotonic``, by default)."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` on the loop of whoever set the timer after ``delay`` seconds."""
        ...


class LoopClock:
    """The event loop's own clock and timers (the default)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        """The loop's time."""
        return self._loop.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """``loop.call_later``."""
        return self._loop.call_later(delay, callback)


async def sleep(clock: Clock, delay: float) -> None:
    """Sleep ``delay`` seconds of ``clock``'s time."""
    wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done() -> None:
        if not wake.done():
            wake.set_result(None)

    timer = clock.call_later(delay, done)
    try:
        await wake
    finally:
        timer.cancel()
