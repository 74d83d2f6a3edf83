"""The :class:`DynamicBatcher`: one replica's queues of waiting items and the batches it starts.

Public through :mod:`embserve.batching`; import the names from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from embserve._batch_contract import Batcher
from embserve._batch_policy import BatchMetrics, BatchPolicy, Clock, LoopClock, Timer
from embserve._loop import current_task, set_results
from embserve.errors import attach_traceback
from embserve.metrics import PENDING_MAX, Histogram
from embserve.request import set_current_request

__all__ = ["DynamicBatcher", "live_batchers"]


_END = object()


def _fits(results: Any, size: int) -> bool:
    # Lists, tuples and arrays (one row per input) are accepted; a str or dict is never meant.
    if isinstance(results, (str, bytes, dict)) or not hasattr(results, "__len__"):
        return False
    return len(results) == size


class _Item:
    """One waiting request: its input, cost, arrival time, and where its answer goes."""

    __slots__ = ("arrived", "cost", "future", "queue", "value")

    sent = False  # whether it came through send() (the batcher records its execution time)

    def __init__(self, value: Any, cost: int, arrived: float) -> None:
        self.value = value
        self.cost = cost
        self.arrived = arrived
        self.future: asyncio.Future[Any] | None = None
        self.queue: asyncio.Queue[tuple[bool, Any]] | None = None  # streaming only

    @property
    def gone(self) -> bool:
        """The caller no longer wants an answer."""
        return self.future is not None and self.future.done()


class _SentItem(_Item):
    """An item queued by :meth:`DynamicBatcher.send`; calling it withdraws it (one object per
    request for both)."""

    __slots__ = ("batcher",)

    sent = True
    batcher: DynamicBatcher  # made by DynamicBatcher.send, which sets every field

    def __call__(self) -> None:
        self.batcher._withdraw(self)


_new_item = object.__new__


class _Bucket:
    """Items that may share a batch (same ``bucket_key``), in arrival order."""

    __slots__ = ("cost", "due", "items", "key", "timer")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.items: deque[_Item] = deque()
        self.cost = 0
        self.due = False
        self.timer: Timer | None = None


class DynamicBatcher(Batcher[Any, Any]):
    """Sends a batch when its limit is reached or its first item has waited long enough.

    Args:
        batch_fn: ``async`` function of a list of inputs returning a list of as many outputs
            (or, with ``streaming``, an async generator yielding such lists).
        policy: the limits (:class:`FixedPolicy` or :class:`AdaptivePolicy`).
        max_concurrent_batches: batches that may run at once.
        batch_size_fn: size of a list of inputs (rows, tokens); default their number. A batch
            never exceeds the limit; an input whose own size does fails with ``ValueError``.
        bucket_key: inputs with different keys never share a batch.
        clock: time and timers (default: the running loop's).
        streaming: ``batch_fn`` is an async generator; use :meth:`submit_stream`.
        in_thread: ``batch_fn`` is a plain (sync) function: each batch runs in a thread of the
            batcher's own (``max_concurrent_batches`` of them), so the loop goes on taking
            requests, and filling the next batch, while one computes.
        name: used in error messages.

    Must be created and used on one event loop (the replica's). Batches run in a copy of the
    context the batcher was made in, with no current request (a batch serves many).
    """

    def __init__(
        self,
        batch_fn: Callable[[list[Any]], Any],
        policy: BatchPolicy,
        *,
        max_concurrent_batches: int = 1,
        batch_size_fn: Callable[[list[Any]], int] | None = None,
        bucket_key: Callable[[Any], Hashable] | None = None,
        clock: Clock | None = None,
        streaming: bool = False,
        in_thread: bool = False,
        name: str = "batched function",
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.policy = policy
        self.metrics = BatchMetrics()
        self.name = name
        self._fn = batch_fn
        self._concurrency = max_concurrent_batches
        self._size_fn = batch_size_fn
        self._key_fn = bucket_key
        self._clock: Clock = clock or LoopClock(self.loop)
        # The loop's own time() when the clock is the loop's: one call less per request, and
        # two when that is asyncio's, which only returns time.monotonic().
        self._now: Callable[[], float] = self._clock.now
        if clock is None:
            self._now = self.loop.time
            if type(self.loop).time is asyncio.BaseEventLoop.time:
                self._now = time.monotonic
        self._streaming = streaming
        self._buckets: dict[Hashable, _Bucket] = {}
        # The running batches (tasks, or thread work for in_thread) and their items.
        self._running: dict[asyncio.Task[None] | Future[Any], list[_Item]] = {}
        self._closed = False
        self._arrivals = 0
        self._quiet_check: int | None = None  # arrivals seen when the last check was set
        self._in_thread = in_thread
        self._running_cost = 0  # the cost of the items of running batches
        self._peak = 0.0  # requests in the batcher lately (see _pipelined_limit)
        self._executor: ThreadPoolExecutor | None = None
        #: Where :meth:`send` records each item's time from arrival to result (set by the
        #: replica host, whose per-method execution histogram it is), or None.
        self.execution: Histogram | None = None
        # Batch tasks start in this context, not in that of whichever caller filled the batch.
        self._context = contextvars.copy_context()
        self._context.run(set_current_request, None)
        _live.add(self)

    # -- the caller's side

    async def submit(self, item: Any) -> Any:
        """Queue ``item`` and return its own result once its batch ran."""
        entry = self._enqueue(item)
        future = entry.future = self.loop.create_future()
        self._after_arrival(entry)
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(entry)
            raise

    def send(self, item: Any, future: asyncio.Future[Any]) -> Callable[[], None]:
        """Queue ``item`` and settle ``future`` with its result (or its batch's error) once its
        batch ran; returns the function that withdraws it (for when ``future`` is cancelled).

        :meth:`submit` without a coroutine or a future of its own: what the replica host uses
        when the request path awaits ``future`` itself, so that a finished batch settles its
        callers' futures in one loop over them and wakes nothing else. Raises what
        :meth:`submit` raises at once (a closed batcher, an item over the size limit).
        """
        # _SentItem(...) without the class call and __init__ frame (700 of the 48k machine
        # instructions a batched request costs): the same fields, set in this frame.
        entry = _new_item(_SentItem)
        entry.batcher = self
        entry.value = item
        entry.cost = 1
        entry.arrived = self._now()
        entry.future = future
        entry.queue = None
        if self._size_fn is not None or self._closed:  # the checks of _enqueue, if needed
            entry.cost = self._enqueue(item).cost
        self._after_arrival(entry)
        return entry

    async def submit_stream(self, item: Any) -> AsyncIterator[Any]:
        """Queue ``item`` for a streaming batch and yield its own outputs as they come."""
        entry = self._enqueue(item)
        queue = entry.queue = asyncio.Queue()
        self._after_arrival(entry)
        finished = False
        try:
            while True:
                ok, value = await queue.get()
                if not ok:
                    finished = True
                    raise value
                if value is _END:
                    finished = True
                    return
                yield value
        finally:
            if not finished:
                self._withdraw(entry)
                # Mark it gone so the running batch stops feeding it.
                entry.queue = None

    def _enqueue(self, value: Any) -> _Item:
        if self._closed:
            raise RuntimeError(f"{self.name}: the batcher is closed")
        cost = 1
        if self._size_fn is not None:
            cost = self._size_of([value])
            if cost < 1:
                raise ValueError(f"{self.name}: batch_size_fn must return >= 1 for an item")
            if cost > self.policy.max_batch_size:
                raise self._oversize_error(cost, self.policy.max_batch_size)
        return _Item(value, cost, self._now())

    def _size_of(self, values: list[Any]) -> int:
        """``batch_size_fn`` of a list of inputs, checked."""
        assert self._size_fn is not None
        size = self._size_fn(values)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{self.name}: batch_size_fn must return an int >= 0, got {size!r}")
        return size

    def _after_arrival(self, entry: _Item) -> None:
        key = self._key_fn(entry.value) if self._key_fn is not None else None
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(key)
        items = bucket.items
        items.append(entry)
        bucket.cost += entry.cost
        self._arrivals += 1
        if len(items) == 1:
            self._arm(bucket)
        policy = self.policy
        if bucket.cost >= policy.max_size():
            self._pump()
        elif policy.quiesce:
            if bucket.timer is not None:
                # Quiet means no arrival for a loop turn: callers still coming back from the
                # last batch go together, not split at whatever moment a slot frees. (Not once
                # the backstop wait has passed: then it goes with the next free slot.)
                bucket.due = False
            if self._quiet_check is not None:
                return
            self._quiet_check = self._arrivals
            self.loop.call_soon(self._check_quiet)

    def _withdraw(self, entry: _Item) -> None:
        """A caller gave up: leave the queue if the batch has not started (then it is in no
        bucket: a search only when a caller leaves, not a mark on every item taken)."""
        for bucket in self._buckets.values():
            if entry in bucket.items:
                bucket.items.remove(entry)
                bucket.cost -= entry.cost
                if not bucket.items:
                    self._disarm(bucket)
                elif bucket.items[0].arrived > entry.arrived:
                    # The first item left: the wait now counts from the new first item.
                    self._disarm(bucket)
                    self._arm(bucket)
                return

    # -- timers and dispatch

    def _arm(self, bucket: _Bucket) -> None:
        """Time the bucket from its first waiting item's arrival."""
        wait = self.policy.wait_s()
        remaining = bucket.items[0].arrived + wait - self._clock.now()
        if remaining <= 0:
            bucket.due = True
            self.loop.call_soon(self._pump)
        else:
            bucket.timer = self._clock.call_later(remaining, functools.partial(self._due, bucket))

    def _disarm(self, bucket: _Bucket) -> None:
        if bucket.timer is not None:
            bucket.timer.cancel()
            bucket.timer = None
        bucket.due = False

    def _due(self, bucket: _Bucket) -> None:
        bucket.timer = None
        if bucket.items:
            bucket.due = True
            self._pump()

    def _check_quiet(self) -> None:
        # Callers woken by the last batch reach us over a few loop turns; send once a turn
        # brings nobody new, so the batch holds everyone who was on the way.
        if self._quiet_check != self._arrivals:
            self._quiet_check = self._arrivals
            self.loop.call_soon(self._check_quiet)
            return
        self._quiet_check = None
        for bucket in self._buckets.values():
            if bucket.items:
                bucket.due = True
        self._pump()

    def _pump(self) -> None:
        """Start every batch that is ready while a batch slot is free."""
        while len(self._running) < self._concurrency:
            limit = self.policy.max_size()
            ready = None
            for bucket in self._buckets.values():
                if not bucket.items or not (bucket.due or bucket.cost >= limit):
                    continue
                if ready is None or bucket.items[0].arrived < ready.items[0].arrived:
                    ready = bucket
            if ready is None:
                return
            if self._in_thread and self.policy.quiesce:
                limit = min(limit, self._pipelined_limit())
            items = self._take(ready, limit)
            if items:
                self._start(items)

    def _pipelined_limit(self) -> int:
        # A quiescing policy whose batches run in a thread: at most half of the requests in
        # the batcher lately (waiting and running), so that one batch computes while the
        # callers of the other come back and fill the next. Sending all that wait would keep
        # the callers in step for good, the loop and the thread taking turns instead of
        # working at once. The peak follows a rise at once and a fall slowly.
        present = self._running_cost + sum(b.cost for b in self._buckets.values())
        peak = self._peak * 0.98
        self._peak = peak = present if present > peak else peak
        return max(1, int(peak + 1) // 2)

    def _take(self, bucket: _Bucket, limit: int) -> list[_Item]:
        items: list[_Item] = []
        cost = 0
        queue = bucket.items
        hard = self.policy.max_batch_size
        if self._size_fn is None:
            # Every item costs 1 (never more than the limit): the first ``limit`` go.
            take = min(len(queue), max(limit, 1))
            if take == len(queue):  # all of them, mostly: in one step
                items = list(queue)
                queue.clear()
            else:
                items = [queue.popleft() for _ in range(take)]
            bucket.cost -= take
        while queue and self._size_fn is not None:
            entry = queue[0]
            # The first item always goes, even past an adaptive size below its cost.
            if items:
                # The size of a batch is batch_size_fn of its items (as in Ray Serve), which
                # need not be the sum of their own sizes (padding to the longest, say).
                try:
                    grown = self._size_of([*(i.value for i in items), entry.value])
                except Exception:
                    grown = limit + 1  # left for the next batch, where it goes first
                if grown > limit:
                    break
            queue.popleft()
            bucket.cost -= entry.cost
            if entry.cost > hard:  # the limit was lowered after it arrived
                self._fail(entry, self._oversize_error(entry.cost, hard))
                continue
            cost += entry.cost
            items.append(entry)
        was_due = bucket.due
        self._disarm(bucket)
        if queue:
            self._arm(bucket)
            # What is left was as quiet as what was taken: it goes with the next free slot.
            bucket.due = bucket.due or (was_due and self.policy.quiesce)
        elif self._key_fn is not None:
            del self._buckets[bucket.key]
        return items

    def _oversize_error(self, cost: int, limit: int) -> ValueError:
        return ValueError(
            f"{self.name}: this request's batch_size_fn cost is {cost}, more than "
            f"max_batch_size={limit}; split it or raise max_batch_size"
        )

    @staticmethod
    def _fail(entry: _Item, exc: BaseException) -> None:
        if entry.future is not None and not entry.future.done():
            entry.future.set_exception(exc)
        if entry.queue is not None:
            entry.queue.put_nowait((False, exc))

    def _start(self, items: list[_Item]) -> None:
        now = self._clock.now()
        metrics = self.metrics
        self._running_cost += self._cost_of(items)
        # Items are taken in arrival order: the first waited longest.
        metrics.queue_wait_s_sum += now * len(items) - sum([entry.arrived for entry in items])
        waited = now - items[0].arrived
        if waited > metrics.queue_wait_s_max:
            metrics.queue_wait_s_max = waited
        if self._in_thread:
            self._start_in_thread(items, now)
            return
        run = self._run_stream if self._streaming else self._run
        task = self._context.run(self.loop.create_task, run(items, now))
        self._running[task] = items
        task.add_done_callback(self._finished)

    def _finished(self, batch: asyncio.Task[None] | Future[Any]) -> None:
        # A batch slot is free: the next ready batch starts now (its first step in a later
        # turn of the loop; a batch in a thread starts computing at once).
        items = self._running.pop(batch, None)
        if items is not None:
            self._running_cost -= self._cost_of(items)
            if not self._closed:
                self._pump()

    def _cost_of(self, items: list[_Item]) -> int:
        return len(items) if self._size_fn is None else sum(entry.cost for entry in items)

    # -- sync batch functions, in the batcher's threads

    def _start_in_thread(self, items: list[_Item], started: float) -> None:
        executor = self._executor
        if executor is None:
            executor = self._executor = ThreadPoolExecutor(
                max_workers=self._concurrency, thread_name_prefix="embserve-batch"
            )
        # A copy per batch: one context cannot be entered by two threads at once.
        work = executor.submit(self._context.copy().run, self._fn, [e.value for e in items])
        self._running[work] = items
        work.add_done_callback(functools.partial(self._thread_done, started))

    def _thread_done(self, started: float, work: Future[Any]) -> None:
        # In the batch's thread: one wake of the loop for the whole batch.
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
            self.loop.call_soon_threadsafe(self._settle_thread_batch, work, started)

    def _settle_thread_batch(self, work: Future[Any], started: float) -> None:
        items = self._running.get(work)
        self._finished(work)  # the thread takes the next batch while we answer this one
        if items is None:
            return  # abandoned
        try:
            results = work.result()
            if not _fits(results, len(items)):
                raise self._length_error(results, len(items))
        except Exception as exc:
            self._record(len(items), started, True)
            self._fail_batch(items, exc)
            return
        self._record(len(items), started, False)
        self._settle(items, results)

    def _record(self, size: int, started: float, failed: bool) -> None:
        elapsed = self._clock.now() - started
        metrics = self.metrics
        metrics.batches += 1
        metrics.items += size
        metrics.failed_batches += failed
        metrics.batch_sizes[size] = metrics.batch_sizes.get(size, 0) + 1
        metrics.exec_s_sum += elapsed
        if elapsed > metrics.exec_s_max:
            metrics.exec_s_max = elapsed
        if not failed:
            self.policy.observe(size, elapsed)

    def _length_error(self, got: Any, expected: int) -> ValueError:
        count = len(got) if hasattr(got, "__len__") else type(got).__name__
        return ValueError(
            f"{self.name} returned {count} results for a batch of {expected} inputs; a batched "
            "function must return a list with one result per input, in order"
        )

    async def _run(self, items: list[_Item], started: float) -> None:
        try:
            results = await self._fn([entry.value for entry in items])
            if not _fits(results, len(items)):
                raise self._length_error(results, len(items))
        except asyncio.CancelledError:
            self._record(len(items), started, True)
            for entry in items:
                if entry.future is not None and not entry.future.done():
                    entry.future.cancel()
            raise
        except Exception as exc:
            self._record(len(items), started, True)
            self._fail_batch(items, exc)
            return
        self._record(len(items), started, False)
        # Answers before the next batch: their hand-over to other threads and loops is then
        # on its way before that batch's first step, so their callers take them (and send
        # their next calls) while it computes, rather than once it is over.
        self._settle(items, results)
        task = current_task(self.loop)  # asyncio's asks for the loop (and, before 3.12, the pid)
        if task is not None:
            self._finished(task)

    def _settle(self, items: list[_Item], results: Any) -> None:
        # Every caller's answer in this one loop turn, in one step (set_results): each future
        # set only schedules its caller's wake-up, and the loop runs them all in its next turn.
        # (Items of batches that are not streams all have a future; set_results leaves those
        # already done, by a caller that left.)
        set_results([entry.future for entry in items], results)  # type: ignore[misc]
        self._observe(items)

    def _fail_batch(self, items: list[_Item], exc: Exception) -> None:
        attach_traceback(exc)  # once for the batch: every caller re-raises this one
        for entry in items:
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(exc)
        self._observe(items)

    def _observe(self, items: list[_Item]) -> None:
        # Items that came through send(): time from arrival to answer, as the host would have.
        execution = self.execution
        if execution is None:
            return
        now = self._now()
        pending = execution.pending
        pending.extend([now - entry.arrived for entry in items if entry.sent])
        if len(pending) >= PENDING_MAX:
            execution.flush()

    async def _run_stream(self, items: list[_Item], started: float) -> None:
        agen = self._fn([entry.value for entry in items])
        failed = False
        try:
            async for outputs in agen:
                if not _fits(outputs, len(items)):
                    raise self._length_error(outputs, len(items))
                alive = False
                for entry, output in zip(items, outputs):  # noqa: B905 (checked above)
                    queue = entry.queue
                    if queue is None:
                        continue
                    if output is StopIteration or isinstance(output, StopIteration):
                        # Ray Serve's batching guide ends one caller's stream this way.
                        queue.put_nowait((True, _END))
                        entry.queue = None
                        continue
                    queue.put_nowait((True, output))
                    alive = True
                if not alive:  # every caller left: stop computing for nobody
                    break
            for entry in items:
                if entry.queue is not None:
                    entry.queue.put_nowait((True, _END))
        except Exception as exc:
            failed = True
            for entry in items:
                if entry.queue is not None:
                    entry.queue.put_nowait((False, exc))
        finally:
            await agen.aclose()
            self._record(len(items), started, failed)

    # -- run-time changes and shutdown

    def limits_changed(self) -> None:
        """Re-time waiting buckets and send what is now ready (after a setter changed a limit)."""
        for bucket in self._buckets.values():
            if bucket.items:
                self._disarm(bucket)
                self._arm(bucket)
        self._pump()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def running(self) -> int:
        """Items in batches that are running."""
        return sum(len(items) for items in self._running.values())

    @property
    def waiting(self) -> int:
        """Items queued and not yet in a batch."""
        return sum(len(bucket.items) for bucket in self._buckets.values())

    def abandon(self, error: BaseException) -> None:
        """Fail every item, waiting or in a running batch, with ``error``, and cancel the
        running batches (the replica stopped before they ended)."""
        self._fail_waiting(error)
        running, self._running = self._running, {}
        self._running_cost = 0
        for batch, items in running.items():
            for entry in items:
                self._fail(entry, error)
            batch.cancel()  # a thread's batch runs on (it cannot be stopped), its answer dropped

    def _fail_waiting(self, error: BaseException) -> None:
        for bucket in self._buckets.values():
            self._disarm(bucket)
            for entry in bucket.items:
                self._fail(entry, error)
            bucket.items.clear()
            bucket.cost = 0

    async def close(self) -> None:
        """Fail the waiting items with ``RuntimeError``; wait for the running batches."""
        self._closed = True
        self._fail_waiting(RuntimeError(f"{self.name}: the replica is shutting down"))
        try:
            if self._running:
                waits = [
                    b if isinstance(b, asyncio.Future) else asyncio.wrap_future(b)
                    for b in self._running
                ]
                await asyncio.gather(*waits, return_exceptions=True)
        finally:
            if self._executor is not None:
                # A batch stuck in user code must not hold the replica's stop.
                self._executor.shutdown(wait=False)


_live: weakref.WeakSet[DynamicBatcher] = weakref.WeakSet()


def live_batchers() -> list[DynamicBatcher]:
    """The batchers alive in this process (for the metrics exporter: see ``.metrics``)."""
    return list(_live)
