"""Event-loop plumbing: a loop in a thread of its own (for runtimes used from sync code and
foreign loops), and tasks that start at once.

Calls handed to a loop from other threads go through :func:`call_soon_threadsafe` and
:func:`wrap_future`, which wake a loop once per burst of calls, not once per call.

This is the one module that uses asyncio's private names (``_get_running_loop``,
``_current_tasks`` before 3.12, ``_enter_task``/``_leave_task``, ``_asyncio_future_blocking``,
a selector loop's ``_selector``); tests/test_start_task.py and tests/test_polling.py check
each of them on every Python version the project supports (3.10 to 3.13).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import os
import selectors
import sys
import threading
import time
import weakref
from asyncio.tasks import _enter_task, _leave_task
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

T = TypeVar("T")

#: ``threading.get_ident``. ``getattr(loop, "_thread_id", None) == thread_ident()`` tells that
#: ``loop`` runs in this thread now (asyncio's loops say so while they run, and LoopThread
#: tells loops of other kinds): with ``NESTING not in ASYNCIO_NAMES`` (no nest_asyncio,
#: under which another loop may run inside it), what ``running_loop() is loop`` answers, without
#: a call. The hot paths of a call check it so, and ask :func:`running_loop` only when it fails.
thread_ident = threading.get_ident
ASYNCIO_NAMES: Mapping[str, Any] = vars(asyncio)
NESTING = "_nest_patched"  # in ASYNCIO_NAMES once nest_asyncio patched asyncio

if sys.version_info >= (3, 12):
    #: The running loop of this thread, or None: asyncio.get_running_loop without the
    #: exception, which costs more than the whole check on the hot path of a call.
    running_loop = asyncio._get_running_loop
else:
    # Before 3.12 asyncio's look-up asks the kernel for the process id each time (getpid(),
    # a system call: 0.15 us here, two or three times per call), to notice a fork. Here a
    # thread remembers the loop it found, which is still its running loop while that loop
    # runs in this thread (a thread runs one loop at a time); a fork forgets them all. Not
    # once nest_asyncio patched asyncio: there a loop may run inside another in one thread.
    _get_running_loop = asyncio._get_running_loop
    _ident = thread_ident
    _asyncio_names = ASYNCIO_NAMES

    class _Found(threading.local):
        loop: Any = None  # a class default: a thread that never found one reads it at once

    _found = _Found()

    def running_loop() -> asyncio.AbstractEventLoop | None:
        """The running loop of this thread, or None (asyncio's, without its getpid())."""
        loop = _found.loop
        if loop is not None:
            if loop._thread_id == _ident() and NESTING not in _asyncio_names:
                return loop  # type: ignore[no-any-return]
            _found.loop = None  # it stopped (or another thread runs it now)
        running = _get_running_loop()
        # Remembered only when it tells which thread runs it (_thread_id), as asyncio's own
        # loops do, and the loops of other kinds (uvloop's) that a LoopThread runs (a plain
        # thread finds none, and asyncio answers that without the system call).
        if running is not None and getattr(running, "_thread_id", None) == _ident():
            _found.loop = running
        return running

    def _forget_loops() -> None:
        global _found
        _found = _Found()

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_loops)

if sys.version_info >= (3, 12):
    #: The task running on ``loop`` (``current_task(loop)``), or None.
    current_task = asyncio.current_task  # in C from 3.12
else:
    # What asyncio.current_task reads, without its Python frame around a dict look-up.
    current_task = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]


class Awaiting:
    """What a :class:`PollingSelector` asks before each sleep: whether an answer is due soon
    (:meth:`awaiting`), and how long to poll for it (:attr:`poll_s`)."""

    poll_s: float = 0.0

    def awaiting(self) -> bool:
        """True while something this object sent has its answer still to come."""
        return False


# How long a loop does not poll once it handed user code to threads (see threads_at_work).
_QUIET_S = 0.002


class PollingSelector(selectors.BaseSelector):
    """A loop's selector (``inner``, which does the work) that polls for up to a moment before
    each sleep: always ``poll_s``, and longer while one of its :attr:`waiters` awaits an answer.

    Waking a sleeping thread costs about as much as a whole call to another process does (on a
    virtual machine, several times as much), and the answer mostly comes within that moment;
    a loop with nothing due sleeps as before, after its poll. Between looks it yields the core
    to any thread waiting for it (on a small machine, often the caller's), and the GIL with it.
    It does not poll for a moment after :func:`threads_at_work` said it handed user code to
    other threads, which need the GIL for longer than a look lasts.
    """

    def __init__(self, inner: selectors.BaseSelector, poll_s: float = 0.0) -> None:
        self.inner = inner
        self.poll_s = poll_s
        self.waiters: weakref.WeakSet[Awaiting] = weakref.WeakSet()
        self.quiet_until = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        inner = self.inner
        if timeout is not None and timeout <= 0:
            return inner.select(timeout)
        poll_s = self.poll_s
        if self.waiters:
            for waiter in self.waiters:
                if waiter.poll_s > poll_s and waiter.awaiting():
                    poll_s = waiter.poll_s
        if poll_s <= 0:
            return inner.select(timeout)
        clock = time.monotonic
        start = clock()
        if start < self.quiet_until:
            return inner.select(timeout)
        deadline = start + (poll_s if timeout is None else min(poll_s, timeout))
        while True:
            ready = inner.select(0)
            if ready:
                return ready
            now = clock()
            if now >= deadline:
                break
            # Let a thread waiting for this core run (a caller's, or this process's own).
            os.sched_yield()
        if timeout is not None:
            timeout = max(0.0, timeout - (now - start))
        return inner.select(timeout)

    # The rest is the inner selector's.

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self.inner.modify(fileobj, events, data)

    def get_key(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self.inner.get_key(fileobj)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self.inner.get_map()

    def close(self) -> None:
        self.inner.close()


def _polling_selector(loop: asyncio.AbstractEventLoop) -> PollingSelector | None:
    # The loop's selector, made a PollingSelector the first time (None: the loop has no
    # selector of asyncio's kind to wrap, e.g. uvloop's or Windows' proactor).
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, PollingSelector):
        return selector
    if not isinstance(selector, selectors.BaseSelector):
        return None
    polling = PollingSelector(selector)
    loop._selector = polling  # type: ignore[attr-defined]
    return polling


def default_poll_s() -> float:
    """How long a replica's loop and its caller's poll before they sleep, by default: 100 µs
    where this process may use two CPUs or more (the other end runs meanwhile), else 0."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return 100e-6 if cpus >= 2 else 0.0


def threads_at_work(loop: asyncio.AbstractEventLoop) -> None:
    """``loop`` handed user code to other threads: if it is a polling loop, it does not poll
    for the next moment (2 ms), so that they have the GIL to themselves."""
    selector = getattr(loop, "_selector", None)
    if type(selector) is PollingSelector:
        selector.quiet_until = time.monotonic() + _QUIET_S


def new_loop(poll_s: float = 0.0) -> asyncio.AbstractEventLoop:
    """A new event loop that polls for up to ``poll_s`` before each sleep (see
    :class:`PollingSelector`): for a replica process, whose next request mostly comes within
    that moment."""
    loop = asyncio.new_event_loop()
    if poll_s > 0:
        selector = _polling_selector(loop)
        if selector is not None:
            selector.poll_s = poll_s
    return loop


def poll_while(loop: asyncio.AbstractEventLoop, waiter: Awaiting) -> None:
    """Have ``loop`` poll for up to ``waiter.poll_s`` before each sleep while ``waiter`` awaits
    an answer (its selector becomes a :class:`PollingSelector`); nothing when ``waiter.poll_s``
    is 0 or the loop has no selector to poll (uvloop). Held weakly: a waiter that is gone is
    forgotten."""
    if waiter.poll_s > 0:
        selector = _polling_selector(loop)
        if selector is not None:
            selector.waiters.add(waiter)


#: The event loops a runtime of its own thread may run on (``Runtime(loop=...)``).
LOOPS = ("auto", "asyncio", "uvloop")


def check_loop(kind: str) -> None:
    """Raise ``ValueError`` unless ``kind`` is one of :data:`LOOPS`."""
    if kind not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}; got {kind!r}")


def loop_factory(kind: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a runtime's own event loop: uvloop's for ``"uvloop"``, and for ``"auto"``
    where uvloop is installed (as uvicorn chooses); else asyncio's. Raises ``ValueError`` for
    another kind, and for ``"uvloop"`` where it is not installed."""
    check_loop(kind)
    if kind != "asyncio" and sys.platform != "win32":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    if kind == "uvloop":
        raise ValueError("loop='uvloop' needs uvloop (pip install uvloop; not on Windows)")
    return asyncio.new_event_loop


class LoopThread:
    """Runs an event loop (``factory``'s, asyncio's by default) in a daemon thread until
    :meth:`stop`."""

    def __init__(
        self, name: str, factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    ) -> None:
        self.loop = (factory or asyncio.new_event_loop)()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        # A loop that does not say which thread runs it, as asyncio's do, is told here, for
        # running_loop() (so that it finds it without a system call), until it is closed.
        told = not hasattr(loop, "_thread_id")
        if told:
            loop._thread_id = threading.get_ident()  # type: ignore[attr-defined]
        try:
            loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                if told:
                    loop._thread_id = None  # type: ignore[attr-defined]

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result from this (other) thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def thread(self) -> threading.Thread:
        """The loop's thread."""
        return self._thread

    def stop(self) -> None:
        """Stop the loop, finish its pending tasks and join the thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


def start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``coro`` as a task on ``loop`` (the running loop), its first step at once.

    A call that waits for nothing (a fast async method, a cached answer) is then over before
    this returns, with no trip through the event loop and no task made for it; one that waits
    has sent what it sends before its first wait. Returns a future of the outcome: cancelling
    it cancels the coroutine, as cancelling its task would.

    The first step runs inside one of the loop's runner tasks (see :class:`_Runners`), so that
    code in it is inside a task as far as asyncio can tell (``asyncio.timeout``, anyio's cancel
    scopes and task groups work), and a coroutine that waits goes on in that same task.
    """
    try:
        runners: _Runners = loop._embserve_runners  # type: ignore[attr-defined]
    except AttributeError:
        found = _runners_of(loop)
        if found is None:
            return _plain_task(loop, coro)
        runners = found
    return runners.start(coro)  # type: ignore[return-value]


def spawn_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Future[None] | None:
    """:func:`start_task` for a call that reports its own outcome: None when it ended in its
    first step (an error that escaped it goes to the loop's exception handler)."""
    try:
        runners: _Runners = loop._embserve_runners  # type: ignore[attr-defined]
    except AttributeError:
        found = _runners_of(loop)
        if found is None:
            return _plain_task(loop, coro)
        runners = found
    return runners.start(coro, False)


def _runners_of(loop: asyncio.AbstractEventLoop) -> _Runners | None:
    # New runner tasks for ``loop``, which has none yet (None: it takes no attributes of ours).
    runners = _Runners(loop)
    try:
        # Kept by the loop itself: they live and go with it, and hold nothing else alive.
        loop._embserve_runners = runners  # type: ignore[attr-defined]
    except AttributeError:
        return None
    return runners


if sys.version_info >= (3, 12):

    def _plain_task(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]
    ) -> asyncio.Task[T]:
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]

else:

    def _plain_task(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]
    ) -> asyncio.Task[T]:
        return loop.create_task(coro)


async def stop_runners(loop: asyncio.AbstractEventLoop) -> None:
    """End the idle runner tasks :func:`start_task` keeps on ``loop`` (the running loop), so that
    a runtime that used the caller's loop leaves no task behind; busy ones end with their call.
    """
    runners = getattr(loop, "_embserve_runners", None)
    if runners is None:
        return
    del loop._embserve_runners  # type: ignore[attr-defined]
    runners.closed = True
    idle, runners.idle = runners.idle, []
    for runner in idle:
        runner.wake.cancel()
    await asyncio.gather(*(runner.task for runner in idle), return_exceptions=True)


# Idle runners a loop keeps; more than this many end when their call does.
_MAX_IDLE = 256


class _Runners:
    """A loop's runner tasks: each runs one call after another, so that starting a call costs no
    new task (making one costs more than many a call).

    A runner sits parked on a future of its own. :meth:`start` takes an idle one, makes it the
    current task and runs the call's first step in a context of the call's own. A call over by
    then leaves the runner idle; one that waits is handed to the runner, which drives it from
    there and parks again when it ends. A runner whose call was cancelled ends instead, so that
    no cancellation state carries over to the next call. With no runner idle, the call gets a
    task of its own, and a new runner is made for the calls after it.
    """

    __slots__ = ("closed", "idle", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: list[_Runner] = []
        self.closed = False

    def start(self, coro: Coroutine[Any, Any, T], keep: bool = True) -> asyncio.Future[T] | None:
        """What :func:`start_task` does (never None with ``keep``), or without ``keep``
        :func:`spawn_task`."""
        loop = self.loop
        idle = self.idle
        while idle:
            runner = idle.pop()
            if not runner.wake.done():
                break
        else:
            _Runner(self)  # for the calls after this one
            return _plain_task(loop, coro)
        context = contextvars.copy_context()
        task = runner.task
        outer = current_task(loop)
        if outer is not None:
            _leave_task(loop, outer)
        _enter_task(loop, task)
        try:
            yielded = context.run(coro.send, None)
        except BaseException as exc:  # the call is over: its outcome, now
            if not runner.wake.done():  # back to idle, unless the call cancelled the runner
                idle.append(runner)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            if not keep:
                if not isinstance(exc, (StopIteration, asyncio.CancelledError)):
                    loop.call_exception_handler({"message": f"{coro!r} failed", "exception": exc})
                return None
            done: asyncio.Future[T] = loop.create_future()
            if isinstance(exc, StopIteration):
                done.set_result(exc.value)
            elif isinstance(exc, asyncio.CancelledError):
                done.cancel()
            else:
                done.set_exception(exc)
            return done
        finally:
            _leave_task(loop, task)
            if outer is not None:
                _enter_task(loop, outer)
        outcome = _Outcome(runner)
        runner.job = (coro, context, yielded, outcome)
        if not runner.wake.done():  # not when the first step cancelled its own task
            runner.wake.set_result(None)
        return outcome


class _Outcome(asyncio.Future):  # type: ignore[type-arg]
    # The outcome of a call its runner drives; cancelling it cancels the runner's task, and the
    # call's own end then settles it.

    def __init__(self, runner: _Runner) -> None:
        super().__init__(loop=runner.runners.loop)
        self._runner: _Runner | None = runner

    def cancel(self, msg: Any = None) -> bool:
        if self.done():
            return False
        runner = self._runner
        if runner is None:
            return super().cancel(msg)
        return runner.task.cancel(msg)

    def settle(self, value: Any, error: BaseException | None) -> None:
        self._runner = None
        if error is None:
            self.set_result(value)
        elif isinstance(error, asyncio.CancelledError):
            super().cancel()
        else:
            self.set_exception(error)


class _Runner:
    __slots__ = ("job", "runners", "task", "wake")

    def __init__(self, runners: _Runners) -> None:
        self.runners = runners
        self.job: tuple[Coroutine[Any, Any, Any], contextvars.Context, Any, _Outcome] | None = None
        self.wake: asyncio.Future[None] = runners.loop.create_future()
        # In an empty context: the runner's own code reads none, and holds nobody's values.
        self.task = contextvars.Context().run(
            runners.loop.create_task, self._serve(), name="embserve-runner"
        )

    async def _serve(self) -> None:
        runners = self.runners
        if runners.closed:
            return
        runners.idle.append(self)  # only now: a task that has run can be cancelled safely
        while True:
            cancelled = False
            try:
                await self.wake
            except asyncio.CancelledError:
                cancelled = True
            job, self.job = self.job, None
            if job is None:
                return  # cancelled while idle: the loop is closing, or a call cancelled us
            coro, context, yielded, outcome = job
            try:
                value = await _Drive(coro, context, yielded, cancelled)
            except BaseException as exc:
                outcome.settle(None, exc)
                if not isinstance(exc, Exception):
                    if isinstance(exc, asyncio.CancelledError):
                        return  # this task was cancelled: a new runner takes its place
                    raise
            else:
                outcome.settle(value, None)
            if runners.closed or _cancelling(self.task) or len(runners.idle) >= _MAX_IDLE:
                return
            self.wake = runners.loop.create_future()
            runners.idle.append(self)


if sys.version_info >= (3, 11):

    def _cancelling(task: asyncio.Task[Any]) -> bool:
        return task.cancelling() > 0

else:

    def _cancelling(task: asyncio.Task[Any]) -> bool:
        return False


class _Drive:
    # Awaited by a runner: goes on with a call whose first step ran already and yielded
    # ``yielded``, each step in the call's own context. (A coroutine already started cannot be
    # awaited by a new one: this does by hand what `await` would.)

    __slots__ = ("_cancelled", "_context", "_coro", "_yielded")

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        context: contextvars.Context,
        yielded: Any,
        cancelled: bool,
    ) -> None:
        self._coro = coro
        self._context = context
        self._yielded = yielded
        self._cancelled = cancelled

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, run = self._coro, self._context.run
        yielded = self._yielded
        try:
            if self._cancelled:
                # Cancelled before the runner took over: the call sees it at its first wait,
                # as a task's coroutine would (the future it waits on is cancelled).
                if getattr(yielded, "_asyncio_future_blocking", False) and yielded.cancel():
                    yielded = run(coro.send, None)
                else:
                    yielded = run(coro.throw, asyncio.CancelledError())
            while True:
                try:
                    sent = yield yielded
                except GeneratorExit:
                    coro.close()
                    raise
                except BaseException as exc:
                    yielded = run(coro.throw, exc)
                else:
                    yielded = run(coro.send, sent)
        except StopIteration as stop:
            return stop.value


# --------------------------------------------------------------------------- other threads


class _Inbox:
    # Calls handed to one loop from other threads, run by one callback per burst: the first call
    # of a burst wakes the loop (call_soon_threadsafe writes to its self-pipe), the others find
    # the drain already on its way and only append. Each call runs in the context it was handed
    # over in, as call_soon_threadsafe would run it.

    __slots__ = ("calls", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: deque[tuple[contextvars.Context | None, Callable[[], object]]] = deque()
        self.scheduled = False

    def put(
        self, call: Callable[[], object], context: contextvars.Context | None, defer: bool
    ) -> None:
        self.calls.append((context, call))
        if not self.scheduled:
            # Set before the wake: a drain that starts now sees this call, or a later drain
            # is scheduled for it (drain() clears the flag before it takes the calls).
            self.scheduled = True
            here = running_loop() if defer else None
            if here is not None and here is not self.loop:
                # Wake it once this loop's turn is over: the other answers settled in this
                # turn go with the same wake. (Writing the wake-up releases the GIL, and the
                # woken loop would otherwise drain one answer per write.)
                here.call_soon(self.wake)
            else:
                self.wake()

    def wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:  # the loop is closed: nothing will ever run these
            self.scheduled = False
            self.calls.clear()
            raise

    def drain(self) -> None:
        self.scheduled = False
        calls = self.calls
        # Only the calls there now: those added meanwhile have a drain of their own scheduled.
        for _ in range(len(calls)):
            context, call = calls.popleft()
            try:
                if context is None:
                    call()
                else:
                    context.run(call)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                self.loop.call_exception_handler({"message": f"{call!r} failed", "exception": exc})


def call_soon_threadsafe(
    loop: asyncio.AbstractEventLoop,
    call: Callable[[], object],
    *,
    copy_context: bool = True,
    defer: bool = False,
) -> None:
    """``loop.call_soon_threadsafe(call)``, from another thread, with one wake of ``loop`` per
    burst of calls instead of one per call.

    ``call`` runs on ``loop`` in a copy of the calling thread's context (``copy_context``), or
    in the loop's drain callback's own (for plumbing that reads no context). With ``defer``,
    called from a running loop, the wake waits for the end of that loop's turn, so that all
    it hands over in the turn goes with one wake (for answers, which the loop that settles
    them outlives; never for requests, which a loop about to end must not leave behind).
    Raises ``RuntimeError`` when ``loop`` is closed (at once, or, deferred, at the wake).
    """
    inbox: _Inbox | None = getattr(loop, "_embserve_inbox", None)
    if inbox is None:
        inbox = _Inbox(loop)
        try:
            loop._embserve_inbox = inbox  # type: ignore[attr-defined]
        except AttributeError:  # a loop that takes no attributes: each call wakes it
            loop.call_soon_threadsafe(call)
            return
    inbox.put(call, contextvars.copy_context() if copy_context else None, defer)


AnyFuture = asyncio.Future[Any] | concurrent.futures.Future[Any]


def set_results(futures: list[asyncio.Future[Any]], results: Iterable[Any]) -> None:
    """Settle each future of ``futures`` that is not done with its result in ``results`` (as
    many, in order), on their loop, in one step (a batch's answers).

    When the first future's class has a ``set_results`` class method of the same signature
    (the request path's sent futures, which give back a replica slot and count the request),
    it settles them all, so that what its futures do beside is done once for all of them; it
    settles futures of other classes as this function does.
    """
    if not futures:
        return
    many = getattr(type(futures[0]), "set_results", None)
    if many is not None:
        many(futures, results)
        return
    for future, result in zip(futures, results):  # noqa: B905 (same length: the caller's)
        if not future.done():
            future.set_result(result)


def settle_like(target: AnyFuture, source: AnyFuture) -> None:
    """Settle ``target`` as ``source`` (done) ended: with its result, its exception, or
    cancelled. Raises what settling a ``target`` already done raises."""
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


def wrap_future(
    future: concurrent.futures.Future[T], loop: asyncio.AbstractEventLoop
) -> asyncio.Future[T]:
    """``asyncio.wrap_future(future, loop=loop)`` (``loop`` running in this thread), with the
    outcomes of many futures settled in other threads reaching ``loop`` in one wake per burst.

    Cancelling the returned future cancels ``future``.
    """
    waiter: asyncio.Future[T] = loop.create_future()

    def copy() -> None:
        if not waiter.done():
            settle_like(waiter, future)

    def settled(_: concurrent.futures.Future[T]) -> None:
        if running_loop() is loop:
            copy()
            return
        with contextlib.suppress(RuntimeError):  # the waiting loop closed: nobody is left
            call_soon_threadsafe(loop, copy, copy_context=False, defer=True)

    def cancelled(_: asyncio.Future[T]) -> None:
        if waiter.cancelled():
            future.cancel()

    waiter.add_done_callback(cancelled)
    future.add_done_callback(settled)
    return waiter


def start_from_loop(
    loop: asyncio.AbstractEventLoop,
    here: asyncio.AbstractEventLoop,
    start: Callable[[], asyncio.Future[T]],
    discard: Callable[[], object] | None = None,
) -> asyncio.Future[T]:
    """Run ``start`` on ``loop`` from a coroutine on ``here``, another loop running in this
    thread; a future of ``here`` settled with the outcome of the future ``start`` returns.

    What ``asyncio.wrap_future(start_threadsafe(...))`` does without the thread-safe future
    between (its lock and condition, and a second callback chain), and with one hand-over per
    burst each way for all the calls between the two loops: each call is one object, the
    caller's future, which carries it there and its outcome back. ``start`` runs in a copy of
    the caller's context. Cancelling the returned future cancels the call (``discard`` runs
    instead of ``start`` when that happened before ``loop`` got to it).
    """
    crossing: _Crossing = _Crossing(loop=here)
    crossing.start = start
    crossing.discard = discard
    crossing.source = None
    crossing.context = contextvars.copy_context()
    lanes = getattr(here, "_embserve_lanes", None)  # _lane()'s look-up, with no call when found
    lane = lanes.get(loop) if lanes is not None else None
    if lane is None:
        lane = _lane(loop, here)
    crossing.lane = lane
    lane.calls.append(crossing)
    if not lane.calling:
        # Set before the hand-over: a begin_all that starts now sees this call, or a later
        # one is handed over for it (begin_all clears the flag before it takes the calls).
        lane.calling = True
        try:
            call_soon_threadsafe(loop, lane.begin_all, copy_context=False)
        except RuntimeError:  # ``loop`` is closed: nothing will ever begin these
            lane.calling = False
            lane.calls.clear()
            raise
    return crossing


class Answered(asyncio.Future):  # type: ignore[type-arg]
    """A future that tells its ``then`` function (one, or None) of its outcome in the step that
    settles it: a done callback would wait for a later turn of the loop. :func:`when_done` sets
    it (for the hand-over of a call's outcome to another loop or thread); a subclass calls
    :meth:`answered` after each way it is settled (result, exception, cancelled), and whoever
    makes one sets ``then`` to None. Once told, ``then`` is let go, as asyncio lets go of done
    callbacks: it mostly holds what holds this future, a cycle only the garbage collector
    would free otherwise."""

    __slots__ = ("then",)
    then: Callable[[asyncio.Future[Any]], object] | None

    def answered(self) -> None:
        """Tell ``then`` (once settled), and let go of it."""
        then = self.then
        if then is not None:
            self.then = None
            then(self)


def when_done(future: asyncio.Future[T], callback: Callable[[asyncio.Future[T]], object]) -> None:
    """Call ``callback(future)`` once ``future`` is settled: in the step that settles it when
    it is an :class:`Answered` future with no ``then`` yet, else as a done callback (a turn of
    the loop later)."""
    if isinstance(future, Answered) and future.then is None:
        future.then = callback
    else:
        future.add_done_callback(callback)


class _Crossing(asyncio.Future):  # type: ignore[type-arg]
    # One call of start_from_loop, and the caller's future of it: begun and settled on its
    # lane's ``loop``, answered on ``here``. Cancelling it cancels the call there.

    __slots__ = ("context", "discard", "lane", "source", "start")
    context: contextvars.Context
    discard: Callable[[], object] | None
    lane: _Lane
    source: asyncio.Future[Any] | None  # once ``loop`` made it
    start: Callable[[], asyncio.Future[Any]]

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        source = self.source
        if source is not None and not source.done():  # else begin_all sees it cancelled
            with contextlib.suppress(RuntimeError):
                self.lane.loop.call_soon_threadsafe(source.cancel)
        return True

    def settled(self, source: asyncio.Future[Any]) -> None:  # on ``loop``; ``source`` is done
        lane = self.lane
        lane.answers.append(self)
        if not lane.answering:  # as in start_from_loop, the other way
            lane.answering = True
            with contextlib.suppress(RuntimeError):  # ``here`` closed: nobody is left to tell
                call_soon_threadsafe(lane.here, lane.answer_all, copy_context=False, defer=True)


class _Lane:
    # The calls from coroutines on one loop (``here``) to another (``loop``): handed over in
    # bursts, begun on ``loop`` by one begin_all per burst, and their outcomes handed back
    # in bursts, settled on ``here`` by one answer_all. Each deque is appended to in one
    # thread and emptied in the other (one step each under the GIL), each flag set by the
    # appending side and cleared by the emptying side before it looks.

    __slots__ = ("answering", "answers", "calling", "calls", "here", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, here: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.here = here
        self.calls: deque[_Crossing] = deque()
        self.calling = False
        self.answers: deque[_Crossing] = deque()
        self.answering = False

    def begin_all(self) -> None:  # on ``loop``
        self.calling = False
        calls = self.calls
        for _ in range(len(calls)):  # those there now: later ones have a begin_all of their own
            crossing = calls.popleft()
            if crossing.cancelled():
                if crossing.discard is not None:
                    crossing.discard()
                continue
            try:
                source = crossing.context.run(crossing.start)
            except BaseException as exc:
                failed: asyncio.Future[Any] = self.loop.create_future()
                failed.set_exception(exc)
                crossing.source = failed
                crossing.settled(failed)
                if not isinstance(exc, Exception):
                    if calls:  # the rest go in a begin_all of their own
                        self.calling = True
                        self.loop.call_soon(self.begin_all)
                    raise
                continue
            crossing.source = source
            if source.done():  # over in its first step: its outcome goes back in this burst
                crossing.settled(source)
                continue
            if isinstance(source, Answered) and source.then is None:  # when_done(), inline
                source.then = crossing.settled
            else:
                source.add_done_callback(crossing.settled)
            if crossing.cancelled():  # cancelled while this ran, before the source was there
                source.cancel()

    def answer_all(self) -> None:  # on ``here``
        self.answering = False
        answers = self.answers
        for _ in range(len(answers)):
            crossing = answers.popleft()
            if not crossing.done():
                source = crossing.source
                assert source is not None
                if source.cancelled() or source.exception() is not None:
                    settle_like(crossing, source)
                else:  # the usual outcome, without settle_like's call
                    crossing.set_result(source.result())


def _lane(loop: asyncio.AbstractEventLoop, here: asyncio.AbstractEventLoop) -> _Lane:
    # The lane from ``here`` (the running loop) to ``loop``: kept by ``here``, which alone
    # makes and looks up its lanes, and which they go with.
    lanes: dict[asyncio.AbstractEventLoop, _Lane] | None = getattr(here, "_embserve_lanes", None)
    if lanes is None:
        lanes = {}
        try:
            here._embserve_lanes = lanes  # type: ignore[attr-defined]
        except AttributeError:  # a loop that takes no attributes: a lane per call
            return _Lane(loop, here)
    lane = lanes.get(loop)
    if lane is None:
        for closed in [other for other in lanes if other.is_closed()]:
            del lanes[closed]  # runtimes come and go; their lanes with them
        lane = lanes[loop] = _Lane(loop, here)
    return lane
