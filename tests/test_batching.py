"""The batcher on a simulated clock: when batches leave, what callers get, limits, the policy."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embserve
from embserve.batching import (
    AdaptivePolicy,
    DynamicBatcher,
    FixedPolicy,
    batch_capacity,
    live_batchers,
)
from embserve.errors import remote_traceback
from embserve.metrics import Histogram
from tests.clock import FakeClock, settle

pytestmark = pytest.mark.anyio


class Recorder:
    """A batch function that records its batches and can be told to fail or hold."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.fail_on: object = None
        self.wrong_length = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise KeyError(f"bad {self.fail_on}")
        if self.wrong_length:
            return items[:-1]
        return [("out", item) for item in items]


def make(
    fn: Callable[[list[Any]], Any],
    clock: FakeClock,
    *,
    size: int = 4,
    wait: float = 0.01,
    **kwargs: Any,
) -> DynamicBatcher:
    return DynamicBatcher(fn, FixedPolicy(size, wait), clock=clock, **kwargs)


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    return asyncio.ensure_future(coro)


async def test_full_batch_leaves_at_once_without_time_passing() -> None:
    clock, fn = FakeClock(), Recorder()
    batcher = make(fn, clock, size=3)
    tasks = [spawn(batcher.submit(i)) for i in range(7)]
    await settle()
    assert fn.batches == [[0, 1, 2], [3, 4, 5]]
    assert [await t for t in tasks[:6]] == [("out", i) for i in range(6)]
    assert not tasks[6].done()
    await clock.advance(0.01)
    assert fn.batches[-1] == [6]
    assert await tasks[6] == ("out", 6)


async def test_wait_counts_from_the_first_waiting_item_not_the_last_batch() -> None:
    clock, fn = FakeClock(), Recorder()
    batcher = make(fn, clock, size=10, wait=0.01)
    first = spawn(batcher.submit("a"))
    await clock.advance(0.004)
    second = spawn(batcher.submit("b"))
    await clock.advance(0.0059)
    assert fn.batches == []
    await clock.advance(0.0002)
    assert fn.batches == [["a", "b"]]
    assert await first == ("out", "a") and await second == ("out", "b")
    # A long idle period, then a lone item: it waits exactly its own timeout, no more, no less.
    await clock.advance(5.0)
    lone = spawn(batcher.submit("c"))
    await clock.advance(0.0099)
    assert not lone.done()
    await clock.advance(0.0001)
    assert await lone == ("out", "c")
    assert batcher.metrics.queue_wait_s_max == pytest.approx(0.01)


async def test_an_exception_reaches_its_batch_and_only_it() -> None:
    clock, fn = FakeClock(), Recorder()
    fn.fail_on = "bad"
    batcher = make(fn, clock, size=2)
    tasks = [spawn(batcher.submit(x)) for x in ("ok1", "bad", "ok2", "ok3")]
    await settle()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], KeyError) and isinstance(results[1], KeyError)
    assert results[2:] == [("out", "ok2"), ("out", "ok3")]
    assert batcher.metrics.failed_batches == 1 and batcher.metrics.batches == 2


async def test_a_result_of_the_wrong_length_fails_every_caller_of_the_batch() -> None:
    clock, fn = FakeClock(), Recorder()
    fn.wrong_length = True
    batcher = make(fn, clock, size=3)
    tasks = [spawn(batcher.submit(i)) for i in range(3)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        assert isinstance(result, ValueError)
        assert "returned 2 results for a batch of 3 inputs" in str(result)


async def test_a_cancelled_waiting_request_leaves_its_batch() -> None:
    clock, fn = FakeClock(), Recorder()
    batcher = make(fn, clock, size=3, wait=0.01)
    first = spawn(batcher.submit("a"))
    await clock.advance(0.002)
    second = spawn(batcher.submit("b"))
    await settle()
    first.cancel()
    await settle()
    assert batcher.waiting == 1
    # The wait now counts from "b", the new first item, which arrived at +2 ms.
    await clock.advance(0.0095)
    assert fn.batches == []
    await clock.advance(0.001)
    assert fn.batches == [["b"]]
    assert await second == ("out", "b")


async def test_a_cancelled_running_request_has_its_result_dropped() -> None:
    clock, fn = FakeClock(), Recorder()
    fn.gate = asyncio.Event()
    batcher = make(fn, clock, size=3)
    tasks = [spawn(batcher.submit(i)) for i in range(3)]
    await settle()
    assert fn.batches == [[0, 1, 2]]
    tasks[1].cancel()
    await settle()
    fn.gate.set()
    assert await tasks[0] == ("out", 0) and await tasks[2] == ("out", 2)
    assert tasks[1].cancelled()


def rows_in(batch: list[list[int]]) -> int:
    return sum(len(rows) for rows in batch)


async def test_batch_size_fn_batches_by_cost_and_refuses_oversized_requests() -> None:
    clock, fn = FakeClock(), Recorder()
    batcher = make(fn, clock, size=10, batch_size_fn=rows_in)
    rows = [[1] * 4, [2] * 4, [3] * 4, [4] * 1]
    tasks = [spawn(batcher.submit(r)) for r in rows]
    await settle()
    assert [sum(len(r) for r in b) for b in fn.batches] == [8]  # 4 + 4, the next 4 won't fit
    await clock.advance(0.01)
    assert [len(b) for b in fn.batches] == [2, 2]
    await asyncio.gather(*tasks)
    with pytest.raises(ValueError, match="cost is 11, more than max_batch_size=10"):
        await batcher.submit([0] * 11)


async def test_batch_size_fn_is_called_on_the_list_of_a_batch_as_in_ray() -> None:
    # Padded to the longest: the size of a batch is not the sum of its items' sizes.
    clock, fn = FakeClock(), Recorder()
    seen: list[int] = []

    def padded(batch: list[str]) -> int:
        seen.append(len(batch))
        return len(batch) * max(len(text) for text in batch)

    batcher = make(fn, clock, size=12, batch_size_fn=padded)
    tasks = [spawn(batcher.submit(t)) for t in ("aaaa", "b", "cc", "dddddd")]
    await clock.advance(0.01)
    # 4, then 2 x 4 = 8, then 3 x 4 = 12 fit; 4 x 6 = 24 does not.
    assert fn.batches[0] == ["aaaa", "b", "cc"]
    await clock.advance(0.01)
    assert fn.batches[1] == ["dddddd"]
    await asyncio.gather(*tasks)
    assert 1 in seen and 4 in seen  # each item alone on arrival, the growing batch when taken


async def test_a_batched_stream_ends_one_callers_stream_at_stop_iteration() -> None:
    clock = FakeClock()

    async def chars(texts: list[str]) -> AsyncIterator[list[Any]]:
        for i in range(max(len(t) for t in texts)):
            yield [t[i] if i < len(t) else StopIteration for t in texts]

    batcher = DynamicBatcher(chars, FixedPolicy(2, 0.01), clock=clock, streaming=True)

    async def collect(text: str) -> str:
        return "".join([c async for c in batcher.submit_stream(text)])

    tasks = [spawn(collect("ab")), spawn(collect("wxyz"))]
    await settle()
    assert [await t for t in tasks] == ["ab", "wxyz"]


async def test_bucket_key_keeps_different_keys_apart() -> None:
    clock, fn = FakeClock(), Recorder()
    batcher = make(fn, clock, size=2, bucket_key=lambda item: item[0])
    tasks = [spawn(batcher.submit(x)) for x in ("a1", "b1", "a2", "b2", "a3")]
    await settle()
    assert fn.batches == [["a1", "a2"], ["b1", "b2"]]
    await clock.advance(0.01)
    assert fn.batches[-1] == ["a3"]
    await asyncio.gather(*tasks)


async def test_max_concurrent_batches_bounds_running_batches() -> None:
    clock, fn = FakeClock(), Recorder()
    fn.gate = asyncio.Event()
    batcher = make(fn, clock, size=1, max_concurrent_batches=2)
    tasks = [spawn(batcher.submit(i)) for i in range(5)]
    await settle()
    assert fn.batches == [[0], [1]]
    fn.gate.set()
    await asyncio.gather(*tasks)
    assert fn.batches == [[0], [1], [2], [3], [4]]


async def test_streaming_each_caller_gets_its_own_items() -> None:
    clock = FakeClock()

    async def gen(items: list[int]) -> AsyncIterator[list[int]]:
        for step in range(3):
            yield [item * 10 + step for item in items]

    batcher = make(gen, clock, size=2, streaming=True)

    async def collect(item: int) -> list[int]:
        return [out async for out in batcher.submit_stream(item)]

    a, b = spawn(collect(1)), spawn(collect(2))
    assert await a == [10, 11, 12] and await b == [20, 21, 22]
    assert batcher.metrics.batch_sizes == {2: 1}


async def test_streaming_error_reaches_every_caller_of_the_batch() -> None:
    clock = FakeClock()

    async def gen(items: list[int]) -> AsyncIterator[list[int]]:
        yield items
        raise KeyError("broke")

    batcher = make(gen, clock, size=2, streaming=True)

    async def collect(item: int) -> list[int]:
        return [out async for out in batcher.submit_stream(item)]

    results = await asyncio.gather(collect(1), collect(2), return_exceptions=True)
    assert all(isinstance(r, KeyError) for r in results)


async def test_close_fails_waiting_items() -> None:
    clock, fn = FakeClock(), Recorder()
    batcher = make(fn, clock, size=5)
    task = spawn(batcher.submit(1))
    await settle()
    await batcher.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        await task
    assert clock.pending == 0
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit(2)


async def test_metrics_count_sizes_waits_and_execution() -> None:
    clock = FakeClock()

    async def slow(items: list[int]) -> list[int]:
        clock.time += 0.003  # the batch "takes" 3 ms of simulated time
        return items

    batcher = make(slow, clock, size=2, wait=0.01)
    assert batcher in live_batchers()
    tasks = [spawn(batcher.submit(i)) for i in range(3)]
    await settle()
    await clock.advance(0.01)
    await asyncio.gather(*tasks)
    snap = batcher.metrics.snapshot()
    assert snap["batch_sizes"] == {2: 1, 1: 1}
    assert snap["mean_batch_size"] == 1.5
    assert snap["exec_s_sum"] == pytest.approx(0.006)
    assert snap["queue_wait_s_max"] == pytest.approx(0.01)


async def test_adaptive_sends_a_lone_request_without_waiting_and_fills_under_load() -> None:
    clock, fn = FakeClock(), Recorder()
    batcher = DynamicBatcher(fn, AdaptivePolicy(0.05, max_batch_size=64), clock=clock)
    assert await batcher.submit("lone") == ("out", "lone")  # no clock advance needed
    tasks = [spawn(batcher.submit(i)) for i in range(40)]
    await asyncio.gather(*tasks)
    assert fn.batches[1] == list(range(40))


def test_adaptive_policy_sizes_batches_to_the_target() -> None:
    policy = AdaptivePolicy(target_latency_s=0.02, max_batch_size=1000)
    assert policy.max_size() == 1000 and policy.predict(1) is None
    for size in (1, 8, 32, 64, 8, 32):
        policy.observe(size, 0.001 + 0.0001 * size)  # 1 ms fixed + 0.1 ms per item
    assert policy.predict(10) == pytest.approx(0.002)
    assert policy.max_size() == 90  # (10 ms - 1 ms) / 0.1 ms
    assert policy.wait_s() == pytest.approx((0.02 - 0.01) / 2)
    policy.max_batch_size = 16
    assert policy.max_size() == 16


def test_decorator_validates_its_arguments() -> None:
    def rows(xs: list[int]) -> Any:
        yield xs

    with pytest.raises(TypeError, match="streaming batch must be an `async def` generator"):
        embserve.batch(rows)
    with pytest.raises(ValueError, match="max_batch_size"):
        embserve.batch(max_batch_size=0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        embserve.batch(batch_wait_timeout_s=-1)
    with pytest.raises(TypeError, match="batch_size_fn"):
        embserve.batch(batch_size_fn=3)  # type: ignore[call-overload]


async def test_decorated_function_and_setters_outside_a_replica() -> None:
    seen: list[int] = []

    @embserve.batch(max_batch_size=4, batch_wait_timeout_s=10)
    async def double(xs: list[int]) -> list[int]:
        seen.append(len(xs))
        return [2 * x for x in xs]

    tasks = [spawn(double(i)) for i in range(2)]
    await settle()
    assert seen == []
    double.set_max_batch_size(2)  # a waiting batch that is now full leaves at once
    assert await asyncio.gather(*tasks) == [0, 2]
    assert seen == [2]
    double.set_batch_wait_timeout_s(0)
    assert await double(5) == 10
    assert seen == [2, 1]


def test_a_batched_deployment_admits_a_full_batch() -> None:
    class Model:
        @embserve.batch(max_batch_size=16, max_concurrent_batches=2)
        async def __call__(self, xs: list[int]) -> list[int]:
            return xs

    assert batch_capacity(Model)[0] == 32
    dep = embserve.deployment(Model)
    assert dep.config.ongoing_limit == 64  # twice: the next batch fills while one runs
    assert embserve.deployment(max_ongoing_requests=40)(Model).config.ongoing_limit == 40
    with pytest.raises(ValueError, match=r"max_ongoing_requests=8 is smaller than 32.*Model"):
        embserve.deployment(max_ongoing_requests=8)(Model)
    with pytest.raises(ValueError, match="max_batch_size=16 x max_concurrent_batches=2"):
        dep.options(max_ongoing_requests=4)
    with pytest.raises(TypeError, match="unknown deployment option"):
        dep.options(batch_capacity=1)


# --------------------------------------------------------------------------- invariants

operation = st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 5)),  # an item of that cost
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.001, 0.004, 0.01, 0.03])),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("finish"), st.just(0)),
)


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(operation, max_size=40),
    limit=st.integers(5, 12),
    concurrency=st.integers(1, 3),
    adaptive=st.booleans(),
)
def test_invariants_under_random_schedules(
    ops: list[tuple[str, Any]], limit: int, concurrency: int, adaptive: bool
) -> None:
    """Batches never exceed the limit; each live item is answered once, with its own result."""

    async def scenario() -> None:
        clock = FakeClock()
        batches: list[list[tuple[int, int]]] = []
        gates: list[asyncio.Event] = []

        async def fn(items: list[tuple[int, int]]) -> list[int]:
            batches.append(items)
            gate = asyncio.Event()
            gates.append(gate)
            await gate.wait()
            return [ident for ident, _ in items]

        policy = AdaptivePolicy(0.02, limit) if adaptive else FixedPolicy(limit, 0.01)
        batcher = DynamicBatcher(
            fn,
            policy,
            clock=clock,
            max_concurrent_batches=concurrency,
            batch_size_fn=lambda items: sum(item[1] for item in items),
        )
        tasks: list[asyncio.Task[Any]] = []
        for kind, value in ops:
            if kind == "submit":
                tasks.append(spawn(batcher.submit((len(tasks), value))))
            elif kind == "advance":
                await clock.advance(value)
            elif kind == "cancel" and tasks:
                tasks[value % len(tasks)].cancel()
            elif kind == "finish":
                for gate in gates:
                    gate.set()
            await settle(3)
            running = sum(not gate.is_set() for gate in gates)
            assert running <= concurrency
        # Drain: release everything and let timers fire until all callers are answered.
        for _ in range(50):
            for gate in gates:
                gate.set()
            await clock.advance(0.02)
            if all(task.done() for task in tasks):
                break
        assert all(task.done() for task in tasks)
        seen: list[int] = []
        for batch_items in batches:
            assert sum(cost for _, cost in batch_items) <= limit
            idents = [ident for ident, _ in batch_items]
            assert idents == sorted(idents)  # first come, first in
            seen.extend(idents)
        assert len(seen) == len(set(seen))
        for ident, task in enumerate(tasks):
            if not task.cancelled():
                assert task.result() == ident
                assert ident in seen
        assert batcher.waiting == 0

    asyncio.run(scenario())


class Shipped:
    """A class with a batched method, sent to another process by value (as backends do)."""

    @embserve.batch(max_batch_size=4, batch_wait_timeout_s=0.001)
    async def __call__(self, xs: list[int]) -> list[int]:
        return [x + 1 for x in xs]


def test_a_batched_class_pickles_after_use_and_works_where_it_lands() -> None:
    import cloudpickle

    async def use(cls: Any) -> list[int]:
        instance = cls()
        return list(await asyncio.gather(*(instance(i) for i in range(6))))

    assert asyncio.run(use(Shipped)) == [1, 2, 3, 4, 5, 6]
    Shipped.__call__.set_max_batch_size(2)
    blob = cloudpickle.dumps(Shipped, protocol=5)
    # By value, as for a class defined in a script: a fresh copy with a fresh batcher state.
    landed = cloudpickle.loads(cloudpickle.dumps(cloudpickle.loads(blob)))
    assert asyncio.run(use(landed)) == [1, 2, 3, 4, 5, 6]


@embserve.deployment(graceful_shutdown_timeout_s=0)
class SlowBatches:
    @embserve.batch(max_batch_size=10, batch_wait_timeout_s=60)
    async def __call__(self, items: list[int]) -> list[int]:
        return items


async def test_a_replica_that_stops_closes_its_batchers() -> None:
    async with embserve.Runtime() as rt:
        handle = await rt.run_async(SlowBatches.bind(), name="slow")
        waiting = asyncio.ensure_future(handle.remote(1))
        await settle()
        mine = [b for b in live_batchers() if b.waiting]
        assert [b.closed for b in mine] == [False]
        await rt.delete_async("slow")
        assert [b.closed for b in mine] == [True]
        with pytest.raises(embserve.EmbserveError):
            await waiting


@embserve.deployment
class Doubles:
    @embserve.batch(max_batch_size=4, batch_wait_timeout_s=0.001)
    async def __call__(self, items: list[int]) -> list[int]:
        return [2 * i for i in items]


async def test_a_batcher_closed_under_a_running_replica_is_replaced_for_later_requests() -> None:
    async with embserve.Runtime() as rt:
        handle = await rt.run_async(Doubles.bind(), name="doubles")
        assert await handle.remote(1) == 2
        (first,) = [b for b in live_batchers() if b.name == "Doubles.__call__" and not b.closed]
        await first.close()
        # The next request finds the closed one and is served all the same (by call()); the
        # ones after it are batched again, by the batcher made in its place.
        assert await asyncio.gather(*(handle.remote(i) for i in range(8))) == [
            2 * i for i in range(8)
        ]
        assert await handle.remote(5) == 10
        others = [b for b in live_batchers() if b.name == "Doubles.__call__" and not b.closed]
        assert len(others) == 1 and others[0].metrics.items >= 8


# --------------------------------------------------------------------------- send()


async def test_send_settles_the_given_futures_and_withdraw_leaves_the_batch() -> None:
    clock, fn = FakeClock(), Recorder()
    batcher = make(fn, clock, size=3)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(4)]
    withdraws = [batcher.send(i, f) for i, f in enumerate(futures)]
    withdraws[3]()  # before its batch started: it leaves
    assert batcher.waiting == 0
    await settle()
    assert fn.batches == [[0, 1, 2]]
    assert [f.result() for f in futures[:3]] == [("out", i) for i in range(3)]
    assert not futures[3].done()  # nobody settles a withdrawn item
    withdraws[0]()  # after its batch ran: nothing happens
    assert clock.pending == 0


async def test_send_fails_every_future_of_a_failed_batch_with_the_traceback_attached() -> None:
    clock, fn = FakeClock(), Recorder()
    fn.fail_on = 1
    batcher = make(fn, clock, size=2)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(4)]
    for i, future in enumerate(futures):
        batcher.send(i, future)
    await settle()
    errors = [f.exception() for f in futures[:2]]
    assert isinstance(errors[0], KeyError) and errors[0] is errors[1]
    assert "bad 1" in (remote_traceback(errors[0]) or "")
    assert [f.result() for f in futures[2:]] == [("out", 2), ("out", 3)]


async def test_send_records_each_items_time_to_its_answer() -> None:
    clock, fn = FakeClock(), Recorder()
    batcher = make(fn, clock, size=10, wait=0.01)
    execution = Histogram()
    batcher.execution = execution
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(2)]
    batcher.send("a", futures[0])
    await clock.advance(0.004)
    batcher.send("b", futures[1])
    await clock.advance(0.01)
    assert all(f.done() for f in futures)
    assert execution.pending == [pytest.approx(0.01), pytest.approx(0.006)]
    submitted = spawn(batcher.submit("c"))  # not sent: the host records those itself
    await clock.advance(0.01)
    assert await submitted == ("out", "c")
    assert len(execution.pending) == 2


async def test_send_refuses_what_submit_refuses() -> None:
    rows: Callable[[list[Any]], int] = lambda batch: sum(len(x) for x in batch)  # noqa: E731
    batcher = make(Recorder(), FakeClock(), size=2, batch_size_fn=rows)
    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError, match="more than max_batch_size=2"):
        batcher.send([1, 2, 3], loop.create_future())
    await batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.send(1, loop.create_future())


# --------------------------------------------------------------------------- sync batches


class ThreadRecorder:
    """A sync batch function that records its batches and the thread each ran in."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, items: list[Any]) -> list[Any]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        self.entered.set()
        assert self.gate.wait(10)
        return [item * 10 for item in items]


async def test_a_sync_batch_runs_in_a_thread_while_the_loop_fills_the_next() -> None:
    fn = ThreadRecorder()
    fn.gate.clear()
    batcher = DynamicBatcher(fn, FixedPolicy(4, 0.01), in_thread=True)
    first = [spawn(batcher.submit(i)) for i in range(4)]
    assert await asyncio.to_thread(fn.entered.wait, 10)
    # The loop is free while the batch computes: the next batch fills and waits for the slot.
    second = [spawn(batcher.submit(i)) for i in range(4, 8)]
    await settle()
    assert batcher.waiting == 4 and fn.batches == [[0, 1, 2, 3]]
    fn.gate.set()
    assert await asyncio.gather(*first, *second) == [i * 10 for i in range(8)]
    assert fn.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert fn.threads and threading.current_thread().name not in fn.threads
    await batcher.close()


def test_callers_on_another_loop_get_their_answers_while_the_next_batch_runs() -> None:
    # A finished batch hands its answers over to callers on other loops before the next batch
    # starts: they take them (and send their next calls) while it computes, as numpy and GPU
    # calls let go of the GIL, instead of after it. The second batch here blocks the runtime's
    # loop, as a computation would, until the first caller has its answer.
    answered = threading.Event()

    @embserve.deployment(max_queued_requests=-1)
    class Model:
        @embserve.batch(max_batch_size=1, batch_wait_timeout_s=0)
        async def __call__(self, xs: list[int]) -> list[bool]:
            return [answered.wait(10) if xs == [2] else True]

    async def two_calls(handle: embserve.Handle) -> bool:
        first, second = handle.remote(1), handle.remote(2)  # one burst: batch 2 waits for 1
        assert await first
        answered.set()
        return bool(await second)

    with embserve.Runtime() as rt:
        handle = rt.run(Model.bind())
        assert asyncio.run(two_calls(handle)) is True


async def test_abandon_fails_waiting_and_running_items() -> None:
    fn = ThreadRecorder()
    fn.gate.clear()
    batcher = DynamicBatcher(fn, FixedPolicy(2, 10.0), in_thread=True)
    loop = asyncio.get_running_loop()
    running = [loop.create_future() for _ in range(2)]
    for i, future in enumerate(running):
        batcher.send(i, future)
    assert await asyncio.to_thread(fn.entered.wait, 10)
    waiting = loop.create_future()
    batcher.send(9, waiting)
    batcher.abandon(embserve.ReplicaDiedError("gone"))
    for future in (*running, waiting):
        assert isinstance(future.exception(), embserve.ReplicaDiedError)
    fn.gate.set()
    await batcher.close()


async def test_adaptive_batches_in_a_thread_take_half_of_who_waits() -> None:
    # 8 callers at once: a batch of 4 computes while the other 4 wait, rather than all 8 in
    # one batch and nobody filling the next while it runs.
    fn = ThreadRecorder()
    fn.gate.clear()
    batcher = DynamicBatcher(fn, AdaptivePolicy(1.0, 64), in_thread=True)
    tasks = [spawn(batcher.submit(i)) for i in range(8)]
    assert await asyncio.to_thread(fn.entered.wait, 10)
    assert fn.batches == [[0, 1, 2, 3]]
    fn.gate.set()
    assert await asyncio.gather(*tasks) == [i * 10 for i in range(8)]
    assert [len(b) for b in fn.batches] == [4, 4]
    await batcher.close()
