"""One deployment's request path: a lease from its router, the replica's answer, retries and
deadlines.

Every request to a deployment, whatever way it came in, goes through :meth:`RequestPath.start`
(or :meth:`RequestPath.stream`): the router hands out a lease, the replica runs the request,
and the lease is released in one place (:meth:`~embserve.router.Lease.release`), whether the
replica's answer settles a sent future (:class:`_Sent`) or ends the coroutine of a request
that needed watching (retries, a deadline). Everything here runs on the runtime's event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from time import perf_counter
from typing import Any

from embserve import tracing
from embserve._loop import Answered, start_task
from embserve.clock import Clock
from embserve.deployment import Deployment, DeploymentConfig
from embserve.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    MethodNotAllowedError,
    ReplicaDiedError,
    RequestTimeoutError,
)
from embserve.metrics import DeploymentMetrics
from embserve.replica import Replica
from embserve.request import Request
from embserve.response import NOT_HERE
from embserve.router import Lease, Router

# A request whose replica vanished before it started is sent again; this bounds how often, so a
# deployment whose replicas keep dying fails its callers instead of looping.
_MAX_UNSTARTED_RETRIES = 8
_NO_SEND = Replica.send
_set_result = asyncio.Future.set_result  # without super()'s lookup, in _Sent


def _settled() -> None:
    """A settled request's withdraw function: nothing left to withdraw."""


class RequestPath:
    """Serves the requests of one deployment; :class:`DeploymentController` is one.

    What it needs from the deployment's lifecycle: the deployment and its config, its router,
    the replicas in routing (``running``), why it is ``unavailable`` (or None), a clock, and
    :meth:`replica_died` to report a replica that vanished under a request.
    """

    name: str
    deployment: Deployment
    config: DeploymentConfig
    router: Router
    running: list[Replica]
    clock: Clock
    #: Whether replicas run user code in this process (their backend's ``in_process``).
    runs_in_process: bool = False
    #: Whether replicas elsewhere take a plain thread's calls on a direct line (their
    #: backend's ``direct_calls``).
    direct_calls: bool = False
    #: Why requests fail at once: set while no replica runs and the last start failed.
    unavailable: str | None

    def __init__(self, deployment: Deployment) -> None:
        #: What the runtime measured of this deployment's requests.
        self.metrics = DeploymentMetrics()
        self.deployment_changed(deployment)

    def deployment_changed(self, deployment: Deployment) -> None:
        """Forget what was learnt about the previous version's methods and options."""
        self._streams: dict[str, bool] = {}
        self._http_methods = http_methods_of(deployment.target)
        config = deployment.config
        # Every request needs watching (a task of its own): a timeout or retries.
        self._always_watched = bool(config.request_timeout_s is not None or config.max_retries)
        self._threads_asked = False
        self._here: dict[str, bool] = {}

    def replica_died(self, replica: Replica, reason: str) -> None:
        """A replica vanished under a request: stop routing to it (the lifecycle's part)."""
        raise NotImplementedError

    def streams(self, method: str) -> bool:
        """Whether ``method`` of this deployment is a generator (its requests stream)."""
        kind = self._streams.get(method)
        if kind is None:
            kind = self._streams[method] = is_generator_method(self.deployment.target, method)
        return kind

    def runs_here(self, method: str) -> bool:
        """Whether a sync caller may serve ``method`` in its own thread (:meth:`call_here`),
        when nothing needs watching: plain sync code on replicas in this process, or any
        method but a generator on replicas that take direct calls."""
        here = self._here.get(method)
        if here is None:
            target = self.deployment.target
            if self._always_watched:
                here = False
            elif self.runs_in_process:
                here = is_sync_method(target, method)
            else:
                here = self.direct_calls and is_plain_method(target, method)
            self._here[method] = here
        return here

    def check_http_method(self, method: str) -> None:
        """Raise :class:`~embserve.MethodNotAllowedError` unless the deployment answers
        ``method`` (its target's ``http_methods``, when it has them)."""
        allowed = self._http_methods
        if allowed is not None and method not in allowed:
            raise MethodNotAllowedError(method, allowed)

    def _check_available(self) -> None:
        if self.unavailable is not None and not self.running:
            raise DeploymentUnavailableError(self.unavailable)

    def start(
        self, request: Request, loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Future[Any]:
        """Start serving ``request`` on the running loop (``loop``, when the caller has it at
        hand); the future of its outcome.

        A free replica that takes requests as messages (see :meth:`Replica.send`) gets it at
        once, and the future is settled by the replica's answer, with no coroutine in between,
        when nothing needs watching (no retries, no deadline). Otherwise a task serves it, its
        first step run at once.
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        began = perf_counter()
        if self._always_watched or request.deadline is not None or self.unavailable is not None:
            return start_task(loop, self._serve(request, began))
        lease = self.router.try_assign(request)
        if lease is None:
            return start_task(loop, self._attempts(request, None, began))
        if type(lease.replica).send is not _NO_SEND:  # in-thread replicas: not worth a future
            sent = self._send(request, lease, loop, began)
            if sent is not None:
                return sent
        return start_task(loop, self._attempts(request, lease, began))

    def serve(
        self, request: Request, loop: asyncio.AbstractEventLoop | None = None
    ) -> Awaitable[Any]:
        """Serve ``request`` in the calling task: :meth:`start`'s path, driven by the caller
        (on the running loop: ``loop``, when the caller has it at hand).

        Returns what to await at once, in the task that called: the sent future, or the
        coroutine that serves the request (no task of its own, and no coroutine frame around
        it). What a caller on the runtime's loop uses (the ASGI adapter); cancelling the caller
        cancels the request.
        """
        began = perf_counter()
        if self._always_watched or request.deadline is not None or self.unavailable is not None:
            return self._serve(request, began)
        lease = self.router.try_assign(request)
        if lease is not None and type(lease.replica).send is not _NO_SEND:
            sent = self._send(request, lease, loop or asyncio.get_running_loop(), began)
            if sent is not None:
                return sent
        return self._attempts(request, lease, began)

    def call_here(self, request: Request, loop: asyncio.AbstractEventLoop) -> Any:
        """Serve ``request`` in the calling thread, a plain thread that is not ``loop``'s:
        its result, or :data:`NOT_HERE` when it must go through the loop instead.

        Runs here when nothing needs watching and a replica with room serves it in this thread
        (:meth:`~embserve.replica.Replica.run_here`: sync code in this process, or a round trip
        on a replica's direct line): the same lease, ``max_ongoing_requests`` and metrics as on
        the loop, but no thread hop. Requests that would wait for a replica, or need a
        timeout, go through the loop.
        """
        if self._always_watched or request.deadline is not None or self.unavailable is not None:
            return NOT_HERE
        router = self.router
        if not router.threads_allowed:
            if not self._threads_asked:  # the loop turns on the shared counts, once
                self._threads_asked = True
                loop.call_soon_threadsafe(router.allow_threads)
            return NOT_HERE
        lease = router.try_assign_here(request)
        if lease is None:
            return NOT_HERE
        run = lease.replica.run_here(request)
        if run is None:
            lease.release_here(loop)
            return NOT_HERE
        began = perf_counter()
        outcome = "error"
        try:
            result = run()
            outcome = "ok" if result is not NOT_HERE else ""  # not sent: the loop serves it
            return result
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            lease.release_here(loop)
            if outcome:  # a count and a list append, each one step under the GIL, as on the loop
                self.metrics.finished(outcome, perf_counter() - began)

    def _send(
        self, request: Request, lease: Lease, loop: asyncio.AbstractEventLoop, began: float
    ) -> _Sent | None:
        # The fast path, for replicas that take requests as messages (the callers checked):
        # the replica's answer settles the future and releases the lease.
        request.lease = lease
        future = _Sent(loop=loop)
        future.then = None
        withdraw = lease.replica.send(request, future)
        if withdraw is None:
            return None
        future._lease = lease  # _Sent's fields, set here: no call of its own per request
        future._withdraw = withdraw
        future._metrics = self.metrics
        future._began = began
        return future

    async def _serve(self, request: Request, began: float) -> Any:
        # A request that needs watching: a deadline (the deployment's request_timeout_s, or
        # its caller's), retries, or a deployment that fails its requests at once.
        timeout = self.config.request_timeout_s
        if timeout is not None:
            deadline = self.clock.now() + timeout
            if request.deadline is None or deadline < request.deadline:
                request.deadline = deadline
        if request.deadline is None:
            return await self._attempts(request, None, began)
        left = request.deadline - self.clock.now()
        try:
            result = await with_timeout(
                self.clock, self._attempts(request, None, None), left, self._timed_out
            )
        except BaseException as exc:
            self.metrics.finished(outcome_of(exc), perf_counter() - began)
            raise
        self.metrics.finished("ok", perf_counter() - began)
        return result

    def _timed_out(self) -> RequestTimeoutError:
        return _timed_out(self.name, self.config)

    def wake(self) -> None:
        """A request arrived while no replica runs: the lifecycle may start one now."""

    async def _lease(self, request: Request) -> Lease:
        # A free replica is found without a coroutine of its own on the usual path.
        self._check_available()
        router = self.router
        lease = router.try_assign(request)
        if lease is None:
            if not self.running:
                self.wake()
            waited = perf_counter()
            if request.trace_context is not None and tracing.ENABLED:
                attributes = {
                    "embserve.deployment": self.name,
                    "embserve.request_id": request.ensure_id(),
                }
                with tracing.span("embserve.queue", request.trace_context, attributes):
                    lease = await router.assign(request)
            else:
                lease = await router.assign(request)
            self.metrics.queue_wait.observe(perf_counter() - waited)
        request.lease = lease
        return lease

    async def _attempts(self, request: Request, lease: Lease | None, began: float | None) -> Any:
        # ``lease``: one the router already gave this request. ``began``: when the request
        # started, for its metrics (None: the caller counts it).
        retries = unstarted = 0
        try:
            while True:
                if lease is None:
                    lease = await self._lease(request)
                else:
                    request.lease = lease
                replica = lease.replica
                try:
                    result = await replica.call(request)
                except ReplicaDiedError as exc:
                    if exc.started:
                        if retries >= self.config.max_retries:
                            raise
                        retries += 1
                    else:
                        unstarted += 1
                        if unstarted > _MAX_UNSTARTED_RETRIES:
                            raise
                        self.replica_died(replica, str(exc))
                else:
                    if began is not None:
                        self.metrics.finished("ok", perf_counter() - began)
                    return result
                finally:
                    lease.release()
                    request.lease = lease = None
        except BaseException as exc:
            if began is not None:
                self.metrics.finished(outcome_of(exc), perf_counter() - began)
            raise

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        """Serve one streaming request; retried only until its first item."""
        unstarted = 0
        began = perf_counter()
        outcome = "cancelled"  # a consumer that stops reading closes the stream
        try:
            while True:
                lease = await self._lease(request)
                replica = lease.replica
                first = True
                try:
                    async for item in replica.stream(request):
                        first = False
                        yield item
                    outcome = "ok"
                    return
                except ReplicaDiedError as exc:
                    if not first or exc.started or unstarted >= _MAX_UNSTARTED_RETRIES:
                        raise
                    unstarted += 1
                    self.replica_died(replica, str(exc))
                finally:
                    lease.release()
                    request.lease = None
        except Exception as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            self.metrics.finished(outcome, perf_counter() - began)


class _Sent(Answered):
    # The outcome of a request sent to a replica as a message. The replica's answer settles it
    # and releases the lease at once, with no callback left for a later loop turn; cancelling it
    # withdraws the request (the replica may hold the lease until its work really ended).

    __slots__ = ("_began", "_lease", "_metrics", "_withdraw")
    _began: float
    _lease: Lease
    _metrics: DeploymentMetrics
    _withdraw: Callable[[], None]

    # Settling it lets go of the withdraw function (a replica's queue entry, which holds this
    # future: a cycle that only the garbage collector would otherwise free, at a cost per
    # request many times that of the store).

    def set_result(self, result: Any) -> None:
        _set_result(self, result)
        self._withdraw = _settled
        self._lease.release()
        self._metrics.finished("ok", perf_counter() - self._began)
        then = self.then
        if then is not None:  # answered(), without its call on every request
            self.then = None
            then(self)

    @classmethod
    def set_results(cls, futures: list[_Sent], results: Iterable[Any]) -> None:
        # A batch's answers (see embserve._loop.set_results): each future set as set_result
        # does, the slots given back and the requests counted once for all.
        set_result = _set_result
        now = perf_counter()
        leases: list[Lease] = []
        durations: list[float] = []
        metrics = futures[0]._metrics
        for future, result in zip(futures, results):  # noqa: B905 (same length)
            if future.done():  # cancelled: cancel() gave its slot back and counted it
                continue
            if type(future) is not cls:  # another kind of future in the same batch
                future.set_result(result)
                continue
            set_result(future, result)
            future._withdraw = _settled
            then = future.then
            if then is not None:  # as answered() does
                future.then = None
                then(future)
            leases.append(future._lease)
            if future._metrics is metrics:
                durations.append(now - future._began)
            else:
                future._metrics.finished("ok", now - future._began)
        Lease.release_all(leases)
        metrics.finished_all("ok", durations)

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        self._withdraw = _settled
        self._lease.release()
        error = exception if isinstance(exception, BaseException) else exception()
        self._metrics.finished(outcome_of(error), perf_counter() - self._began)
        self.answered()

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self._withdraw()
        self._withdraw = _settled
        self._lease.release()
        self._metrics.finished("cancelled", perf_counter() - self._began)
        self.answered()
        return True


async def with_timeout(
    clock: Clock,
    work: Awaitable[Any],
    timeout: float,
    error: Callable[[], BaseException] | None = None,
) -> Any:
    """Await ``work`` in this task; past ``timeout`` seconds of ``clock`` cancel it and raise
    ``error()`` (default: ``TimeoutError``).

    A timer that cancels this task is far cheaper than ``asyncio.wait_for``'s extra task.
    """
    make_error = error or TimeoutError
    if timeout <= 0:
        if asyncio.iscoroutine(work):
            work.close()
        raise make_error()
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = clock.call_later(timeout, expire)
    try:
        return await work
    except asyncio.CancelledError:
        if not expired:
            raise
        if sys.version_info >= (3, 11):
            task.uncancel()
        raise make_error() from None
    finally:
        timer.cancel()


def _timed_out(name: str, config: DeploymentConfig) -> RequestTimeoutError:
    if config.request_timeout_s is not None:
        return RequestTimeoutError(
            f"request to {name!r} did not finish within "
            f"request_timeout_s={config.request_timeout_s}"
        )
    return RequestTimeoutError(f"request to {name!r} did not finish before its deadline")


def outcome_of(error: BaseException) -> str:
    """How a request that raised ``error`` ended, as ``embserve_requests`` counts it."""
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, RequestTimeoutError):
        return "timeout"
    if isinstance(error, (BackPressureError, DeploymentUnavailableError)):
        return "rejected"
    return "error"


def _method_of(target: Any, method: str) -> Any:
    # The function behind ``method`` of a deployment target (class or function), or None.
    if inspect.isclass(target):
        return getattr(target, method, None)
    fn = target if method == "__call__" else None
    if fn is not None and not inspect.isfunction(fn) and not inspect.ismethod(fn):
        fn = getattr(fn, "__call__", None)  # noqa: B004  (a callable object)
    return fn


def is_generator_method(target: Any, method: str) -> bool:
    """Whether ``method`` of a deployment target (class or function) is a generator."""
    fn = _method_of(target, method)
    return inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)


def is_plain_method(target: Any, method: str) -> bool:
    """Whether ``method`` of a deployment target is a method that returns one result (sync code
    or a coroutine, not a generator of either kind)."""
    return callable(_method_of(target, method)) and not is_generator_method(target, method)


def is_sync_method(target: Any, method: str) -> bool:
    """Whether ``method`` of a deployment target is plain sync code (not a coroutine or a
    generator of either kind)."""
    fn = _method_of(target, method)
    return callable(fn) and not (
        inspect.iscoroutinefunction(fn)
        or inspect.isasyncgenfunction(fn)
        or inspect.isgeneratorfunction(fn)
    )


def http_methods_of(target: Any) -> frozenset[str] | None:
    """The HTTP methods a deployment answers (its ``http_methods``; GET brings HEAD), or None
    for all."""
    methods = getattr(target, "http_methods", None)
    if not methods:
        return None
    allowed = {str(m).upper() for m in methods}
    if "GET" in allowed:
        allowed.add("HEAD")
    return frozenset(allowed)
