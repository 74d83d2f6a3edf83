"""Handles (references to an endpoint or deployment) and the responses their calls return.

A call started on the runtime's own event loop is a task on that loop: no thread hop. A call
started from any other thread, or from another event loop, is handed to the runtime's loop once;
its :class:`Response` is then awaitable in the caller's loop and blocking-readable from threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from typing import Any, Protocol

from embserve._loop import running_loop, start_task
from embserve.request import Request, current_request

__all__ = [
    "Handle",
    "Response",
    "ResponseStream",
    "Submitter",
    "find_submitter",
    "has_responses",
    "register_submitter",
    "resolve_responses",
    "start_call",
    "unregister_submitter",
]


class Submitter(Protocol):
    """What a handle needs from the runtime that serves it (a runtime, or a proxy to one)."""

    def submit(self, request: Request) -> Any:
        """Start ``request``: a :class:`ResponseStream` when ``request.stream`` is true, else a
        :class:`Response` (whose result is a :class:`ResponseStream` when ``request.stream``
        is None and the deployment chosen for it streams)."""
        ...


# Runtimes (and, in worker processes, proxies to them) by id, so unpickled handles find theirs.
_submitters: dict[str, Submitter] = {}
_lock = threading.Lock()


def register_submitter(runtime_id: str, submitter: Submitter) -> None:
    """Make handles of ``runtime_id`` call through ``submitter`` in this process."""
    with _lock:
        _submitters[runtime_id] = submitter


def unregister_submitter(runtime_id: str) -> None:
    """Forget the submitter of ``runtime_id`` (its runtime shut down)."""
    with _lock:
        _submitters.pop(runtime_id, None)


def find_submitter(runtime_id: str) -> Submitter | None:
    """The submitter registered for ``runtime_id`` in this process, if any."""
    return _submitters.get(runtime_id)


def _find_submitter(runtime_id: str) -> Submitter:
    submitter = _submitters.get(runtime_id)
    if submitter is None:
        from embserve.errors import EmbserveError

        raise EmbserveError(
            f"this handle belongs to runtime {runtime_id!r}, which is not running in this "
            "process (it shut down, or the handle was unpickled where it cannot be reached)"
        )
    return submitter


class Handle:
    """A cheap, picklable reference to an endpoint or deployment of a runtime.

    ``h.remote(*args, **kwargs)`` calls ``__call__``; ``h.method.remote(...)`` calls another
    method; ``h.options(stream=True).remote(...)`` returns a :class:`ResponseStream` for generator
    methods; ``h.options(routing_key="user-42")`` sends calls with that key, which a deployment
    with ``router="consistent_hash"`` keeps on one replica. Handles are safe to share between
    threads and event loops.
    """

    __slots__ = ("_key", "_method", "_runtime_id", "_stream", "_submitter", "name")

    def __init__(
        self,
        runtime_id: str,
        name: str,
        *,
        method: str = "__call__",
        stream: bool = False,
        routing_key: str | None = None,
    ) -> None:
        self._runtime_id = runtime_id
        self.name = name
        self._method = method
        self._stream = stream
        self._key = routing_key
        self._submitter: Submitter | None = None

    @property
    def method_name(self) -> str:
        """The method this handle calls."""
        return self._method

    def options(
        self,
        *,
        method_name: str | None = None,
        stream: bool | None = None,
        routing_key: str | None = None,
    ) -> Handle:
        """A copy of this handle calling ``method_name``, streaming results, or routing by key."""
        if routing_key is not None and not isinstance(routing_key, str):
            raise TypeError(f"routing_key must be a str, got {routing_key!r}")
        return Handle(
            self._runtime_id,
            self.name,
            method=self._method if method_name is None else method_name,
            stream=self._stream if stream is None else stream,
            routing_key=self._key if routing_key is None else routing_key,
        )

    def __getattr__(self, method: str) -> Handle:
        if method.startswith("_"):
            raise AttributeError(method)
        return self.options(method_name=method)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Start a call; returns a :class:`Response` (a :class:`ResponseStream` when streaming).

        Responses of other calls may be passed among the arguments: the call waits for them and
        receives their results. A call made while serving a request (in a replica) inherits
        that request's deadline and trace context.
        """
        submitter = self._submitter
        if submitter is None:
            submitter = self._submitter = _find_submitter(self._runtime_id)
        request = Request(self.name, self._method, args, kwargs, "", self._key, self._stream)
        parent = current_request()
        if parent is not None:
            # A call made while serving a request is part of it: same deadline, same trace.
            request.deadline = parent.deadline
            request.trace_context = parent.trace_context
        return submitter.submit(request)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_handle,
            (self._runtime_id, self.name, self._method, self._stream, self._key),
        )

    def __repr__(self) -> str:
        method = "" if self._method == "__call__" else f".{self._method}"
        return f"Handle({self.name!r}{method})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and self.__reduce__() == other.__reduce__()

    def __hash__(self) -> int:
        return hash(self.__reduce__()[1])


def _rebuild_handle(
    runtime_id: str, name: str, method: str, stream: bool, routing_key: str | None = None
) -> Handle:
    return Handle(runtime_id, name, method=method, stream=stream, routing_key=routing_key)


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

    loop.call_soon_threadsafe(begin)
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
        return (yield from asyncio.wrap_future(self._concurrent()).__await__())

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
