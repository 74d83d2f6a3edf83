"""Responses: the future result of a call (:class:`Response`) or its stream of items
(:class:`ResponseStream`), usable from any thread and any event loop.

A call started on the runtime's own event loop is a task on that loop: no thread hop. A call
started from any other thread, or from another event loop, is handed to the runtime's loop once;
its :class:`Response` is then awaitable in the caller's loop and blocking-readable from threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from typing import Any, Protocol

from embserve._loop import (
    ASYNCIO_NAMES,
    NESTING,
    call_soon_threadsafe,
    running_loop,
    settle_like,
    start_task,
    thread_ident,
    when_done,
    wrap_future,
)

__all__ = [
    "NOT_HERE",
    "Response",
    "ResponseStream",
    "Runner",
    "deferred",
    "has_responses",
    "resolve_responses",
    "start_call",
    "start_threadsafe",
    "start_unstarted",
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
    if source.done():  # over in its first step (a fast async method): now, not a turn later
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            settle_like(bridge, source)
        return

    def copy(done: asyncio.Future[Any]) -> None:
        # The bridge may have been cancelled from its own thread meanwhile.
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            settle_like(bridge, done)

    def cancel_source(done: concurrent.futures.Future[Any]) -> None:
        # ``done`` is the bridge, taken as the argument: a bridge that held a function that
        # held it would be a cycle, freed only by the garbage collector.
        if done.cancelled() and not source.done():
            loop.call_soon_threadsafe(source.cancel)

    when_done(source, copy)
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
        # The future's own iterator, not a generator around it: one frame less each time the
        # awaiting task is resumed. On its own loop (the usual case) without a call to learn so
        # (see thread_ident).
        future = self._future
        loop = self._loop
        if isinstance(future, asyncio.Future) and (
            (getattr(loop, "_thread_id", None) == thread_ident() and NESTING not in ASYNCIO_NAMES)
            or running_loop() is loop
        ):
            return future.__await__()
        waiter = wrap_future(self._concurrent(), running_loop() or asyncio.get_event_loop())
        return waiter.__await__()

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


#: What a deferred call's ``call_here`` returns when the call must go through the loop.
NOT_HERE: Any = object()


class Runner(Protocol):
    """What serves a :func:`deferred` call: in the calling thread, or on the loop."""

    def call_here(self, request: Any, loop: asyncio.AbstractEventLoop) -> Any:
        """Serve ``request`` in this thread and return its result, or return
        :data:`NOT_HERE` when it must go through the loop."""
        ...

    def start(self, request: Any) -> asyncio.Future[Any]:
        """Start ``request`` on the loop (called on it); the future of its outcome."""
        ...


# A deferred call's states. Changes are made under one lock: the fast path takes it twice.
_PENDING, _HERE, _DONE, _STARTED = range(4)
_deferred_lock = threading.Lock()
# Per loop, the deferred calls it starts unless their thread used them within a grace time;
# one wake of the loop covers every call made meanwhile (a busy thread's calls share it).
_unstarted: dict[asyncio.AbstractEventLoop, list[_Deferred]] = {}
_GRACE_S = 0.02
_thread = threading.local()  # the last deferred call each thread made, weakly


def deferred(loop: asyncio.AbstractEventLoop, runner: Runner, request: Any) -> Response:
    """A :class:`Response` for a call from a plain thread to sync user code that may run in
    that thread (see :class:`_Deferred`)."""
    response = _Deferred(loop, runner, request)
    last = getattr(_thread, "last", None)
    _thread.last = weakref.ref(response)
    if last is not None:
        earlier = last()
        if earlier is not None and earlier._state == _PENDING:
            earlier._concurrent()  # another call before that one was read: it starts now
    with _deferred_lock:
        queue = _unstarted.get(loop)
        if queue is None:
            _unstarted[loop] = [response]
        else:
            queue.append(response)
    if queue is None:
        loop.call_soon_threadsafe(loop.call_later, _GRACE_S, start_unstarted, loop)
    return response


def start_unstarted(loop: asyncio.AbstractEventLoop) -> None:
    """On ``loop``: start the deferred calls their threads did not use yet (the loop does
    this a grace time after each burst of them, and its runtime as it shuts down)."""
    with _deferred_lock:
        queue = _unstarted.pop(loop, ())
    for response in queue:
        if response._state == _PENDING:
            response._concurrent()


class _Deferred(Response):
    # A call from a plain thread to sync user code in this process. ``result()`` in a thread
    # runs it right there, under the same admission as on the loop (the runner says whether
    # it may). Otherwise it starts on the loop: when the thread makes another call first (so
    # calls made one after another run together), when it is awaited or read with a timeout,
    # or at the latest after _GRACE_S unused (so it runs even if nobody reads it).

    __slots__ = (
        "__weakref__",
        "_error",
        "_request",
        "_runner",
        "_started",
        "_state",
        "_value",
        "_waiting",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, runner: Runner, request: Any) -> None:
        self._loop = loop
        self._runner = runner
        self._request = request
        self._state = _PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        # The call started on the loop; and what other threads wait on while it runs here.
        self._started: concurrent.futures.Future[Any] | None = None
        self._waiting: concurrent.futures.Future[Any] | None = None

    def __await__(self) -> Generator[Any, None, Any]:
        return (yield from asyncio.wrap_future(self._concurrent()).__await__())

    def _concurrent(self) -> concurrent.futures.Future[Any]:
        on_loop = running_loop() is self._loop
        with _deferred_lock:
            state = self._state
            if state == _PENDING:
                self._state = _STARTED
                begin = functools.partial(self._runner.start, self._request)
                if on_loop:  # started below, out of the lock: its first step runs user code
                    self._started = self._future = concurrent.futures.Future()
                else:
                    self._started = self._future = start_threadsafe(self._loop, begin)
            elif self._started is None:  # running in a thread, or done there
                if self._waiting is None:
                    self._waiting = concurrent.futures.Future()
                    if state == _DONE:
                        self._settle(self._waiting)
                return self._waiting
            started = self._started
        if state == _PENDING and on_loop:
            try:
                _link(self._loop, begin(), started)
            except Exception as exc:
                started.set_exception(exc)
        return started

    def _settle(self, future: concurrent.futures.Future[Any]) -> None:
        if self._error is not None:
            future.set_exception(self._error)
        else:
            future.set_result(self._value)

    def result(self, timeout_s: float | None = None) -> Any:
        if self._state == _PENDING and timeout_s is None and running_loop() is None:
            with _deferred_lock:
                claimed = self._state == _PENDING
                if claimed:
                    self._state = _HERE
            if claimed:
                self._run_here()
        if self._state == _DONE:
            if self._error is not None:
                raise self._error
            return self._value
        return super().result(timeout_s)

    def _run_here(self) -> None:
        try:
            value = self._runner.call_here(self._request, self._loop)
        except BaseException as exc:
            self._finish(None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if value is NOT_HERE:  # through the loop after all
            with _deferred_lock:
                waiting, self._waiting = self._waiting, None
                self._state = _PENDING
            started = self._concurrent()
            if waiting is not None:
                started.add_done_callback(functools.partial(settle_like, waiting))
            return
        self._finish(value, None)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        with _deferred_lock:
            self._value, self._error = value, error
            self._state = _DONE
            waiting = self._waiting
        if waiting is not None:  # another thread or loop awaits it meanwhile
            self._settle(waiting)

    def cancel(self) -> bool:
        with _deferred_lock:
            if self._state == _PENDING:  # never started: it never will
                self._error = asyncio.CancelledError("the request was cancelled")
                self._state = _DONE
                return True
            if self._state != _STARTED:
                return False  # running in a thread (sync code cannot be stopped), or done
        return super().cancel()

    def done(self) -> bool:
        if self._started is not None:
            return self._started.done()
        return self._state == _DONE


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
