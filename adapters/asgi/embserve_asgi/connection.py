"""The client side of a request: noticing it left, and cleaning up after it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Message, Receive

__all__ = ["DisconnectWatch", "DisconnectWatchers", "abandon", "discard_body", "iterate"]

# A request answered within one or two of these never pays for a task that listens for the
# client leaving; slower ones are cancelled at most about twice this long after it left.
DISCONNECT_WATCH_DELAY_S = 0.01
# Past the size limit, at most this much more of a refused body is read and dropped.
DISCARD_LIMIT = 8 * 1024 * 1024


class DisconnectWatch:
    """Cancels the task serving one request when its client disconnects."""

    __slots__ = ("_owner", "_reader", "_receive", "_task", "closed", "gone", "seen")

    def __init__(self, owner: DisconnectWatchers, receive: Receive) -> None:
        self._owner = owner
        self._receive = receive
        self._task = asyncio.current_task()
        self._reader: asyncio.Future[Message] | None = None
        self.closed = False
        self.gone = False
        self.seen = False

    def listen(self) -> None:
        """Start listening for the client leaving (a task reading ``receive``)."""
        if self._reader is None and not self.closed:
            self._reader = asyncio.ensure_future(self._receive())
            self._reader.add_done_callback(self._heard)

    def _heard(self, reader: asyncio.Future[Message]) -> None:
        if self.closed or reader.cancelled() or reader.exception() is not None:
            return
        if reader.result()["type"] == "http.disconnect" and self._task is not None:
            self.gone = True
            self.close()
            self._task.cancel()

    def close(self) -> None:
        """Stop watching: the request is answered."""
        if self.closed:
            return
        self.closed = True
        self._owner.active.discard(self)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()


class DisconnectWatchers:
    """Starts listening for disconnects only on requests that have run a little while.

    Listening costs a task per request, and most requests are answered before it could matter.
    One timer for all requests in flight (not one each) finds those seen by two of its ticks.
    """

    __slots__ = ("active", "timer")

    def __init__(self) -> None:
        self.active: set[DisconnectWatch] = set()
        self.timer: asyncio.TimerHandle | None = None

    def watch(self, receive: Receive) -> DisconnectWatch:
        """Watch one request; it is listened for only if it runs past a tick or two."""
        watch = DisconnectWatch(self, receive)
        self.active.add(watch)
        if self.timer is None:
            # An App is served by one event loop; its requests share this timer.
            self.timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_DELAY_S, self._tick)
        return watch

    def _tick(self) -> None:
        self.timer = None
        for watch in list(self.active):
            if watch.seen:
                watch.listen()
            else:
                watch.seen = True
        if self.active:
            self.timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_DELAY_S, self._tick)


async def abandon(items: Any) -> None:
    """Stop the generator of a stream nobody will read."""
    # A stream left mid-way (the client went, or sending failed) stops its generator now,
    # rather than whenever the garbage collector finds it.
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    cancel = getattr(items, "cancel", None)
    if cancel is not None:  # a ResponseStream: its cancel() may block when called off its loop
        await asyncio.to_thread(cancel)


async def discard_body(receive: Receive) -> None:
    """Read and drop the rest of a refused body, up to ``DISCARD_LIMIT``."""
    # Servers hold back a body's later chunks until the app takes them, and may keep the
    # connection open until then; take (and drop) a bounded amount so it can close.
    budget = DISCARD_LIMIT
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b"")) or 1


async def iterate(values: Any) -> AsyncIterator[Any]:
    """Items of a returned sync or async generator; sync steps run in a worker thread."""
    if inspect.isasyncgen(values):
        async for item in values:
            yield item
        return
    done = object()
    try:
        while True:
            item = await asyncio.to_thread(next, values, done)
            if item is done:
                return
            yield item
    finally:
        values.close()
