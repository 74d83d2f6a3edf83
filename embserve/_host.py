"""The replica side of every backend: the user object, its methods, its threads.

A :class:`ReplicaHost` runs on one event loop (the runtime's for in-thread replicas, a worker's
own loop in process and Dask replicas). Async user code runs on that loop; sync user code runs in
the host's thread pool, sized to ``max_ongoing_requests`` so that user code never runs more calls
at once than the deployment allows, even when callers gave up on some.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import enum
import functools
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from time import perf_counter
from typing import Any

from embserve import tracing
from embserve._loop import current_task, running_loop, threads_at_work
from embserve.batching import (
    DynamicBatcher,
    batch_sizes,
    batcher_of,
    batchers_of,
    close_batchers,
)
from embserve.context import ReplicaContext, reset_replica_context, set_replica_context
from embserve.errors import (
    DeploymentFailedError,
    ReplicaDiedError,
    attach_traceback,
    format_traceback,
)
from embserve.metrics import PENDING_MAX, Histogram, ReplicaStats
from embserve.multiplex import model_loads
from embserve.replica import ReplicaSpec
from embserve.request import Request, reset_current_request, set_current_request

__all__ = ["ReplicaHost"]

logger = logging.getLogger("embserve.replica")


class _Kind(enum.Enum):
    ASYNC = 1
    SYNC = 2
    ASYNC_GEN = 3
    SYNC_GEN = 4


def _kind_of(fn: Callable[..., Any]) -> _Kind:
    if inspect.isasyncgenfunction(fn):
        return _Kind.ASYNC_GEN
    if inspect.iscoroutinefunction(fn):
        return _Kind.ASYNC
    if inspect.isgeneratorfunction(fn):
        return _Kind.SYNC_GEN
    call = getattr(fn, "__call__", None)  # noqa: B004  (callable objects with async __call__)
    if call is not None and not inspect.isfunction(fn) and not inspect.ismethod(fn):
        return _kind_of(call)
    return _Kind.SYNC


# Whether values of a type need materializing (see _materialize; the stand-ins define it on
# their class): by type, since looking for a missing attribute on a value costs much of a call.
_MATERIALIZES: dict[type, bool] = {}


def _materialized(value: Any) -> Any:
    # An adapter may send a plain, picklable stand-in as the first argument (the ASGI adapter's
    # request snapshot) that becomes the real object only here, beside the user code: the core
    # stays free of web frameworks. One dictionary look-up is all an ordinary value pays.
    kind = type(value)
    materializes = _MATERIALIZES.get(kind)
    if materializes is None:
        materializes = _MATERIALIZES[kind] = hasattr(kind, "__embserve_materialize__")
    return value.__embserve_materialize__() if materializes else value


def _materialize(args: tuple[Any, ...]) -> tuple[Any, ...]:
    # The arguments with the first one materialized (see _materialized).
    first = args[0]
    real = _materialized(first)
    return args if real is first else (real, *args[1:])


_UNKNOWN: Any = object()


def _in_request(request: Request, fn: Callable[[], Any]) -> Any:
    # In a host thread: the request is the current one while its code runs.
    token = set_current_request(request)
    try:
        return fn()
    finally:
        reset_current_request(token)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    # From a thread whose work outlived its caller: the loop may have closed meanwhile.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


class ReplicaHost:
    """Builds the user object of one replica and runs calls on it."""

    def __init__(self, spec: ReplicaSpec, context: ReplicaContext) -> None:
        if spec.config.app_name and not context.app_name:
            # The backends build the context; the application is the runtime's knowledge.
            context = dataclasses.replace(context, app_name=spec.config.app_name)
        self.spec = spec
        self.context = context
        self._executor = ThreadPoolExecutor(
            max_workers=spec.config.ongoing_limit,
            thread_name_prefix=f"embserve-{spec.replica_id}",
            initializer=set_replica_context,
            initargs=(context,),
        )
        self._instance: Any = None
        self._methods: dict[str, tuple[Callable[..., Any], _Kind, Histogram]] = {}
        self._in_threads: set[Future[Any]] = set()
        self._execution: dict[str, Histogram] = {}
        # The tasks running a call here, so that end_calls() can end the ones that outlived
        # the drain with ReplicaDiedError instead of leaving them to hang.
        self._calls: set[asyncio.Task[Any] | None] = set()
        self._ended: set[asyncio.Task[Any]] = set()
        # Per method: the batcher send() queues its items in, or None (not batched: call() it).
        self._senders: dict[str, DynamicBatcher | None] = {}
        # The loop it runs on, from start(): asked once, not per call (before Python 3.12 each
        # look-up of the running loop is a system call, getpid).
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Construct the user object and apply ``user_config``.

        Raises :class:`~embserve.DeploymentFailedError` carrying the user's traceback when the
        constructor (or the first ``reconfigure``) raises.
        """
        spec = self.spec
        self._loop = asyncio.get_running_loop()
        if inspect.isclass(spec.target):
            factory = functools.partial(spec.target, *spec.init_args, **spec.init_kwargs)
            try:
                self._instance = await self._in_thread(factory)
            except Exception as exc:
                self.close()
                raise DeploymentFailedError(
                    f"the constructor of deployment {spec.deployment!r} raised "
                    f"{type(exc).__name__}: {exc}",
                    format_traceback(exc),
                ) from None
        else:
            self._instance = spec.target
        if spec.config.user_config is not None:
            try:
                await self.reconfigure(spec.config.user_config)
            except Exception as exc:
                self.close()
                raise DeploymentFailedError(
                    f"reconfigure() of deployment {spec.deployment!r} raised "
                    f"{type(exc).__name__}: {exc}",
                    format_traceback(exc),
                ) from None

    def _resolve(self, name: str) -> tuple[Callable[..., Any], _Kind, Histogram]:
        if not inspect.isclass(self.spec.target):
            if name != "__call__":
                raise AttributeError(
                    f"deployment {self.spec.deployment!r} is a function; it has no method {name!r}"
                )
            fn: Callable[..., Any] = self._instance
        else:
            fn = getattr(self._instance, name, None)  # type: ignore[assignment]
            if fn is None or not callable(fn) or (name.startswith("_") and name != "__call__"):
                raise AttributeError(
                    f"deployment {self.spec.deployment!r} has no public method {name!r}"
                )
        execution = self._execution.get(name)
        if execution is None:
            execution = self._execution[name] = Histogram()
        entry = (fn, _kind_of(fn), execution)
        self._methods[name] = entry
        return entry

    async def call(self, request: Request) -> Any:
        """Run one request; user exceptions propagate with the replica's traceback attached.

        Sync user code runs in the host's threads. When the caller gives up on it (a timeout,
        a client that left) the thread runs on, so the request's lease is held until it ends:
        the replica's slot stays taken, as its thread is.
        """
        method = request.method
        fn, kind, execution = self._methods.get(method) or self._resolve(method)
        args = request.args
        if args:
            args = _materialize(args)
        token = set_replica_context(self.context)
        current = set_current_request(request)
        traced = None
        if request.trace_context is not None and tracing.ENABLED:
            traced = self._span(request)
            traced.__enter__()
        task = current_task(self._loop or running_loop())
        calls = self._calls
        calls.add(task)
        began = perf_counter()
        try:
            if kind is _Kind.ASYNC:
                kwargs = request.kwargs
                return await (fn(*args, **kwargs) if kwargs else fn(*args))
            if kind is _Kind.SYNC:
                return await self._in_thread(
                    functools.partial(fn, *args, **request.kwargs), request
                )
            raise TypeError(
                f"{self.spec.deployment}.{method} is a generator: call it through "
                "handle.options(stream=True)"
            )
        except Exception as exc:
            attach_traceback(exc)
            raise
        except asyncio.CancelledError:
            if task not in self._ended:
                raise
            self._ended.discard(task)
            if sys.version_info >= (3, 11):
                task.uncancel()  # type: ignore[union-attr]
            raise ReplicaDiedError(
                f"replica {self.spec.replica_id} stopped before the request finished "
                "(graceful_shutdown_timeout_s ran out)"
            ) from None
        finally:
            calls.discard(task)
            pending = execution.pending  # Histogram.observe, without its call: once a call
            pending.append(perf_counter() - began)
            if len(pending) >= PENDING_MAX:
                execution.flush()
            if traced is not None:
                traced.__exit__(*sys.exc_info())
            reset_current_request(current)
            reset_replica_context(token)

    def run_here(self, request: Request) -> Callable[[], Any] | None:
        """What runs ``request`` in the calling thread (a sync caller's own), as :meth:`call`
        would in one of the host's threads; None unless its method is sync."""
        entry = self._methods.get(request.method)
        if entry is None:
            try:
                entry = self._resolve(request.method)
            except AttributeError:
                return None  # call() says why
        if entry[1] is not _Kind.SYNC or self._instance is None:
            return None
        return functools.partial(self._run_here, entry, request)

    def _run_here(
        self, entry: tuple[Callable[..., Any], _Kind, Histogram], request: Request
    ) -> Any:
        fn, _, execution = entry
        args = request.args
        if args:
            args = _materialize(args)
        token = set_replica_context(self.context)
        current = set_current_request(request)
        traced = None
        if request.trace_context is not None and tracing.ENABLED:
            traced = self._span(request)
            traced.__enter__()
        began = perf_counter()
        try:
            return fn(*args, **request.kwargs)
        except Exception as exc:
            attach_traceback(exc)
            raise
        finally:
            pending = execution.pending
            pending.append(perf_counter() - began)
            if len(pending) >= PENDING_MAX:
                execution.flush()
            if traced is not None:
                traced.__exit__(*sys.exc_info())
            reset_current_request(current)
            reset_replica_context(token)

    def send(self, request: Request, future: asyncio.Future[Any]) -> Callable[[], None] | None:
        """Queue ``request`` for its method's batch and settle ``future`` with its result; the
        withdraw function, or None (nothing sent) when the method is not batched, or the call
        needs more than a batch gives (keyword arguments, a trace), or cannot be queued: then
        :meth:`call` serves it, and raises what went wrong.

        The batched path of :meth:`call` with no coroutine per request: the batch's end sets
        its callers' futures in one loop over them.
        """
        method = request.method
        batcher = self._senders.get(method, _UNKNOWN)
        if batcher is _UNKNOWN:
            batcher = self._batcher(method)
        if batcher is None or request.kwargs or len(request.args) != 1:
            return None
        if request.trace_context is not None and tracing.ENABLED:
            return None
        value = request.args[0]
        if _MATERIALIZES.get(type(value)) is not False:  # _materialized(), with no call if not
            value = _materialized(value)
        try:
            withdraw: Callable[[], None] = batcher.send(value, future)
        except Exception:
            # A batcher that closed is looked up again by the next request (which finds the
            # one made in its place), not asked whether it closed by every request.
            self._senders.pop(method, None)
            return None
        return withdraw

    def _batcher(self, method: str) -> DynamicBatcher | None:
        if self._instance is None:
            return None
        try:
            fn, _, execution = self._methods.get(method) or self._resolve(method)
        except AttributeError:
            found = None
        else:
            token = set_replica_context(self.context)  # a batcher made now is this replica's
            try:
                found = batcher_of(fn, execution)
            finally:
                reset_replica_context(token)
        self._senders[method] = found
        return found

    def abandon_batches(self, error: BaseException) -> None:
        """Fail the items of this replica's batchers, waiting or running, with ``error`` (the
        replica stopped before they ended)."""
        for batcher in batchers_of(self.spec.replica_id):
            abandon = getattr(batcher, "abandon", None)
            if abandon is not None:
                abandon(error)

    def _span(self, request: Request) -> contextlib.AbstractContextManager[None]:
        # The execution span of a traced request: user code (and its handle calls) runs in it.
        return tracing.span(
            "embserve.execute",
            request.trace_context,
            {
                "embserve.deployment": self.spec.deployment,
                "embserve.replica": self.spec.replica_id,
                "embserve.method": request.method,
                "embserve.request_id": request.ensure_id(),
            },
        )

    def stats(self) -> ReplicaStats:
        """What this replica measured: execution times, batch sizes, model loads."""
        replica_id = self.spec.replica_id
        return ReplicaStats(
            execution={m: (list(h.counts), h.sum) for m, h in self._execution.items()},
            batch_sizes=batch_sizes(replica_id),
            model_loads=model_loads(replica_id),
        )

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        """Run a generator method, yielding its items; sync generators step in the thread pool."""
        method, args, kwargs = request.method, request.args, request.kwargs
        fn, kind, _ = self._methods.get(method) or self._resolve(method)
        if args:
            args = _materialize(args)
        if kind is _Kind.ASYNC_GEN:
            agen = fn(*args, **kwargs)
            try:
                while True:
                    token = set_replica_context(self.context)
                    current = set_current_request(request)
                    try:
                        item = await agen.__anext__()
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        attach_traceback(exc)
                        raise
                    finally:
                        reset_current_request(current)
                        reset_replica_context(token)
                    yield item
            finally:
                await agen.aclose()
        elif kind is _Kind.SYNC_GEN:
            gen = await self._in_thread(functools.partial(fn, *args, **kwargs), request)
            done = object()
            try:
                while True:
                    try:
                        item = await self._in_thread(functools.partial(next, gen, done), request)
                    except Exception as exc:
                        attach_traceback(exc)
                        raise
                    if item is done:
                        return
                    yield item
            finally:
                await self._in_thread(gen.close)
        else:
            raise TypeError(
                f"{self.spec.deployment}.{method} is not a generator: call it without stream=True"
            )

    async def check_health(self) -> None:
        """Run the user's ``check_health()`` if it has one; raise when it raises."""
        await self._call_optional("check_health")

    async def reconfigure(self, user_config: Any) -> None:
        """Run the user's ``reconfigure(user_config)`` (required when user_config is set)."""
        if getattr(self._instance, "reconfigure", None) is None:
            raise TypeError(
                f"deployment {self.spec.deployment!r} has a user_config but no reconfigure() method"
            )
        await self._call_optional("reconfigure", user_config)

    async def _call_optional(self, name: str, *args: Any) -> None:
        fn = getattr(self._instance, name, None)
        if fn is None or not inspect.isclass(self.spec.target):
            return
        token = set_replica_context(self.context)
        try:
            if inspect.iscoroutinefunction(fn):
                await fn(*args)
            else:
                await self._in_thread(functools.partial(fn, *args))
        finally:
            reset_replica_context(token)

    async def _in_thread(self, fn: Callable[[], Any], request: Request | None = None) -> Any:
        # Track the thread's work itself, not our wait for it: a cancelled caller stops waiting
        # while the thread runs on, and close() must know that.
        if request is None:
            work = self._executor.submit(fn)
        elif request.trace_context is not None and tracing.ENABLED:
            # The thread runs in a copy of this context: the execution span is current there.
            work = self._executor.submit(contextvars.copy_context().run, _in_request, request, fn)
        else:
            work = self._executor.submit(_in_request, request, fn)
        self._in_threads.add(work)
        work.add_done_callback(self._in_threads.discard)
        loop = self._loop or asyncio.get_running_loop()
        threads_at_work(loop)
        try:
            return await asyncio.wrap_future(work, loop=loop)
        except asyncio.CancelledError:
            lease = request.lease if request is not None else None
            if lease is not None and not work.done():
                # Cancelling could not stop the thread: its slot stays taken until it ends.
                let_go = lease.hold()
                work.add_done_callback(lambda _: _call_soon(loop, let_go))
            raise

    def end_calls(self) -> None:
        """End the calls still running here: each raises :class:`~embserve.ReplicaDiedError`
        (async user code is cancelled; sync code in a thread runs on, its result dropped)."""
        for task in self._calls:
            if task is not None:
                self._ended.add(task)
                task.cancel()

    def close(self) -> None:
        """Release the thread pool; threads still inside user code are left to finish alone."""
        busy = len(self._in_threads)
        if busy:
            logger.warning(
                "replica %s stopped with %d call(s) still running in its threads",
                self.spec.replica_id,
                busy,
            )
        self._executor.shutdown(wait=not busy, cancel_futures=True)
        if running_loop() is not None:
            close_batchers(self.spec.replica_id)
        self._instance = None
        self._methods.clear()
        self._senders.clear()
