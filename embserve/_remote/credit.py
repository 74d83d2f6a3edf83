"""The sending side of a stream's credit window (the reading side is in ``pending.py``)."""

from __future__ import annotations

import asyncio

from embserve._remote.messages import STREAM_WINDOW

__all__ = ["Credit"]


class Credit:
    """How many more items a stream may send before its reader grants more.

    A sender awaits :meth:`take` before each item; the reader's grants (``MORE`` messages) go to
    :meth:`grant`. Runs on one event loop.
    """

    __slots__ = ("_granted", "left")

    def __init__(self, window: int = STREAM_WINDOW) -> None:
        self.left = window
        self._granted: asyncio.Event | None = None

    async def take(self) -> None:
        """Wait until one more item may be sent, and count it."""
        while self.left <= 0:
            if self._granted is None:
                self._granted = asyncio.Event()
            self._granted.clear()
            await self._granted.wait()
        self.left -= 1

    def grant(self, count: int) -> None:
        """The reader took ``count`` items: as many more may be sent."""
        self.left += count
        if self._granted is not None:
            self._granted.set()
