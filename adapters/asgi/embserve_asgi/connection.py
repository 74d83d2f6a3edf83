"""The client side of a request: noticing it left, and cleaning up after it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Message, Receive

__all__ = ["DisconnectWatch", "DisconnectWatchers", "abandon", "discard_body", "iterate"]

# A request answered within one or two of these never pays for a task that listens for the
# client leaving; slower ones are cancelled at most about twice this long after it left. Body
# deadlines are enforced at these ticks too.
DISCONNECT_WATCH_DELAY_S = 0.01
# Past the size limit, at most this much more of a refused body is read and dropped.
DISCARD_LIMIT = 8 * 1024 * 1024


class DisconnectWatch:
    """Watches one request: its body deadline while the body is read, then its client leaving.

    While ``reading`` the request body, the owner's timer cancels the task serving the request
    once the body is overdue (``expired``); afterwards, it cancels the task when the client
    disconnects (``gone``). Either way the task sees ``CancelledError`` and answers by the flag.
    """

    __slots__ = (
        "_owner",
        "_reader",
        "_receive",
        "_task",
        "closed",
        "deadline",
        "expired",
        "gone",
        "reading",
        "seen",
    )

    def __init__(
        self, owner: DisconnectWatchers, receive: Receive, task: asyncio.Task[Any] | None
    ) -> None:
        self._owner = owner
        self._receive = receive
        self._task = task
        self._reader: asyncio.Future[Message] | None = None
        self.closed = False
        self.gone = False
        self.seen = False
        self.reading = True
        self.expired = False
        self.deadline = 0.0  # set by the first tick that sees the body still being read

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

    def expire(self) -> None:
        """The body is overdue: stop reading it (cancel the task that waits for it)."""
        # Only called while `reading`, which the task clears in the same step as its last
        # receive() returns: the cancellation always lands in that receive(), never later.
        if self._task is not None:
            self.expired = True
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
    """The one timer of an App that enforces body deadlines and notices clients leaving.

    Both cost a request nothing unless it lasts: one timer for all requests in flight (not one
    each) ticks while any is. A body still being read at a tick gets its deadline then (so a
    deadline is ``body_timeout_s`` plus up to a tick); a request seen by two ticks after its body
    starts listening for a disconnect (a task reading ``receive``): most requests are answered
    before that could matter.
    """

    __slots__ = ("active", "body_timeout_s", "timer")

    def __init__(self, body_timeout_s: float | None = None) -> None:
        self.active: set[DisconnectWatch] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.body_timeout_s = body_timeout_s

    def watch(self, receive: Receive, task: asyncio.Task[Any] | None = None) -> DisconnectWatch:
        """Watch one request, from before its body is read; see :class:`DisconnectWatch`.

        ``task`` is the task serving it (default: the current one).
        """
        watch = DisconnectWatch(self, receive, task or asyncio.current_task())
        self.active.add(watch)
        if self.timer is None:
            # An App is served by one event loop; its requests share this timer.
            self.timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_DELAY_S, self._tick)
        return watch

    def _tick(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for watch in list(self.active):
            if watch.reading:
                if self.body_timeout_s is None:
                    continue
                if not watch.deadline:
                    watch.deadline = now + self.body_timeout_s
                elif now >= watch.deadline:
                    watch.expire()
            elif watch.seen:
                watch.listen()
            else:
                watch.seen = True
        if self.active:
            self.timer = loop.call_later(DISCONNECT_WATCH_DELAY_S, self._tick)


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
