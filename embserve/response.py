"""Responses: the future result of a call (:class:`Response`) or its stream of items
(:class:`ResponseStream`), usable from any thread and any event loop.

A call started on the runtime's own event loop is a task on that loop: no thread hop. A call
started from any other thread, or from another event loop, is handed to the runtime's loop once;
its :class:`Response` is then awaitable in the caller's loop and blocking-readable from threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from typing import Any

from embserve._loop import call_soon_threadsafe, running_loop, start_task, wrap_future

__all__ = [
    "Response",
    "ResponseStream",
    "has_responses",
    "resolve_responses",
    "start_call",
    "start_threadsafe",
]


def start_call(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Response:
    """Run ``coro`` on ``loop`` and return its :class:`Response`, from any thread.

    On ``loop`` itself its first step runs at once (see :func:`embserve._loop.start_task`); from
    elsewhere it is handed to the loop once. What every submitter (the runtime, proxies in
    workers) starts calls with.
    """
    if running_loop() is loop:
        return Response(start_task(loop, coro), loop)
    begin = functools.partial(start_task, loop, coro)
    return Response(start_threadsafe(loop, begin, discard=coro.close), loop)


def start_threadsafe(
    loop: asyncio.AbstractEventLoop,
    start: Callable[[], asyncio.Future[Any]],
    discard: Callable[[], object] | None = None,
) -> concurrent.futures.Future[Any]:
    """Run ``start`` on ``loop`` from another thread; the future of the outcome it starts.

    Cancelling the returned future cancels the call; ``discard`` runs instead of ``start`` when
    that happened before the loop got to it.
    """
    bridge: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def begin() -> None:
        if bridge.cancelled():
            if discard is not None:
                discard()
            return
        try:
            future = start()
        except BaseException as exc:
            bridge.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        _link(loop, future, bridge)

    call_soon_threadsafe(loop, begin)  # one wake of the loop per burst of calls
    return bridge


def _link(
    loop: asyncio.AbstractEventLoop,
    source: asyncio.Future[Any],
    bridge: concurrent.futures.Future[Any],
) -> None:
    # On ``loop``: ``source``'s outcome goes to ``bridge``; cancelling ``bridge`` cancels it.
    def copy(done: asyncio.Future[Any]) -> None:
        try:
            if done.cancelled():
                bridge.cancel()
            elif (exc := done.exception()) is not None:
                bridge.set_exception(exc)
            else:
                bridge.set_result(done.result())
        except concurrent.futures.InvalidStateError:  # cancelled from its own thread
            pass

    def cancel_source(_: concurrent.futures.Future[Any]) -> None:
        if bridge.cancelled() and not source.done():
            loop.call_soon_threadsafe(source.cancel)

    source.add_done_callback(copy)
    bridge.add_done_callback(cancel_source)


class Response:
    """The future result of one call.

    Await it in any event loop, or call :meth:`result` from a thread that is not the runtime's
    loop. :meth:`cancel` cancels the request (async user code is cancelled; sync user code runs
    on, its result dropped).
    """

    __slots__ = ("_future", "_loop")

    def __init__(
        self,
        future: asyncio.Future[Any] | concurrent.futures.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._future = future
        self._loop = loop

    def __await__(self) -> Generator[Any, None, Any]:
        future = self._future
        if isinstance(future, asyncio.Future) and running_loop() is self._loop:
            return (yield from future.__await__())
        waiter = wrap_future(self._concurrent(), running_loop() or asyncio.get_event_loop())
        return (yield from waiter.__await__())

    def _concurrent(self) -> concurrent.futures.Future[Any]:
        future = self._future
        if isinstance(future, concurrent.futures.Future):
            return future
        bridge: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(_link, self._loop, future, bridge)
        self._future = bridge
        return bridge

    def result(self, timeout_s: float | None = None) -> Any:
        """Block until the result is there and return it (or raise the call's exception).

        Raises ``TimeoutError`` after ``timeout_s`` (the request goes on; cancel it if need be),
        and ``RuntimeError`` when called on the runtime's event loop, where it would deadlock.
        """
        if running_loop() is self._loop:
            raise RuntimeError(
                "Response.result() would block the runtime's event loop; use `await response`"
            )
        future = self._concurrent()
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if future.done():  # the call itself raised a TimeoutError (RequestTimeoutError)
                raise
            raise TimeoutError(f"no result within {timeout_s} s") from None
        except concurrent.futures.CancelledError:
            raise asyncio.CancelledError("the request was cancelled") from None

    def cancel(self) -> bool:
        """Cancel the request; returns False when it already finished."""
        future = self._future
        if future.done():
            return False
        if isinstance(future, asyncio.Future) and running_loop() is not self._loop:
            self._loop.call_soon_threadsafe(future.cancel)
            return True
        return future.cancel()

    def done(self) -> bool:
        """Whether the call finished (with a result, an error, or cancelled)."""
        return self._future.done()


class ResponseStream:
    """The items of a streaming call, as a sync or async iterator.

    The request starts when iteration begins. Items come one at a time from the runtime's loop;
    :meth:`cancel` (or breaking out of an ``async for``) stops the generator in the replica.
    """

    def __init__(
        self,
        factory: Callable[[], AsyncIterator[Any]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._factory = factory
        self._loop = loop
        self._iterator: AsyncIterator[Any] | None = None

    def _it(self) -> AsyncIterator[Any]:
        if self._iterator is None:
            self._iterator = self._factory()
        return self._iterator

    def _on_loop(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self._loop)

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Any:
        if running_loop() is self._loop:
            return await self._it().__anext__()
        return await asyncio.wrap_future(self._on_loop(self._next_on_loop))

    async def _next_on_loop(self) -> Any:
        return await self._it().__anext__()

    def __iter__(self) -> Iterator[Any]:
        if running_loop() is self._loop:
            raise RuntimeError("iterate a stream on the runtime's loop with `async for`")
        while True:
            try:
                yield self._on_loop(self._next_on_loop).result()
            except StopAsyncIteration:
                return

    def cancel(self) -> None:
        """Stop the stream and the generator that feeds it."""
        if self._iterator is None:
            return
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is None:
            return
        if running_loop() is self._loop:
            self._loop.create_task(aclose())
        else:
            self._on_loop(aclose).result()


def has_responses(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether any argument is a :class:`Response` (checked before paying for a resolve)."""
    for value in args:
        if isinstance(value, Response):
            return True
    return any(isinstance(value, Response) for value in kwargs.values()) if kwargs else False


async def resolve_responses(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments with every :class:`Response` among them replaced by its result.

    Responses are awaited together. Used wherever a call leaves for a replica: responses are
    handles to this process's futures, so only their results may travel.
    """
    if not has_responses(args, kwargs):
        return args, kwargs

    async def value(v: Any) -> Any:
        return await v if isinstance(v, Response) else v

    resolved = await asyncio.gather(*(value(v) for v in args), *(value(v) for v in kwargs.values()))
    return tuple(resolved[: len(args)]), dict(zip(kwargs, resolved[len(args) :], strict=True))
