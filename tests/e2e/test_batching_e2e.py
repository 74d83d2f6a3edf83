"""Batching end to end through handles on a local runtime: sizes, order, errors, latency."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import embserve
from embserve import Runtime
from embserve.batching import live_batchers
from embserve.request import Request
from tests.test_metrics import samples

SEEN: dict[str, list[int]] = {}


def seen(name: str) -> list[int]:
    return SEEN.setdefault(name, [])


@embserve.deployment
class Doubler:
    """Batches fill (max 16) long before the 2 s wait; errors and wrong lengths on demand."""

    @embserve.batch(max_batch_size=16, batch_wait_timeout_s=2.0)
    async def __call__(self, xs: list[int]) -> list[int]:
        seen("doubler").append(len(xs))
        if -1 in xs:
            raise KeyError("a negative input")
        if -2 in xs:
            return [2 * x for x in xs][:-1]
        return [2 * x for x in xs]

    @embserve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def count(self, starts: list[int]) -> AsyncIterator[list[int]]:
        for step in range(3):
            yield [start + step for start in starts]

    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def lone(self, xs: list[int]) -> list[int]:
        return xs

    @embserve.batch(max_batch_size=64, target_latency_s=0.2)
    async def adaptive(self, xs: list[int]) -> list[int]:
        seen("adaptive").append(len(xs))
        return xs


@embserve.deployment(user_config={"max_batch_size": 2})
class Tunable:
    """Its batch size comes from user_config, through reconfigure."""

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.__call__.set_max_batch_size(config["max_batch_size"])

    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=2.0)
    async def __call__(self, xs: list[int]) -> list[int]:
        seen("tunable").append(len(xs))
        return xs


@embserve.deployment
@embserve.batch(max_batch_size=4, batch_wait_timeout_s=2.0)
async def square(xs: list[int]) -> list[int]:
    seen("square").append(len(xs))
    return [x * x for x in xs]


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with Runtime(seed=0) as rt:
        yield rt


@pytest.fixture(scope="module")
def doubler(runtime: Runtime) -> embserve.Handle:
    return runtime.run(Doubler.bind(), name="doubler")


def call_all(handle: embserve.Handle, inputs: list[int]) -> list[Any]:
    """Start every call before waiting for any, so they can share batches."""
    responses = [handle.remote(x) for x in inputs]
    out: list[Any] = []
    for response in responses:
        try:
            out.append(response.result(timeout_s=5))
        except Exception as exc:
            out.append(exc)
    return out


def test_batches_fill_results_map_in_order(doubler: embserve.Handle) -> None:
    seen("doubler").clear()
    # 32 callers and no max_ongoing_requests given: the replica admits 32 (not the default 5),
    # so full batches of 16 form at once instead of 2 s waits.
    start = time.perf_counter()
    assert call_all(doubler, list(range(32))) == [2 * x for x in range(32)]
    assert time.perf_counter() - start < 1.5
    assert seen("doubler") == [16, 16]


def test_sync_callers_from_many_threads_share_batches(doubler: embserve.Handle) -> None:
    seen("doubler").clear()
    barrier = threading.Barrier(16)

    def one(x: int) -> int:
        barrier.wait()
        return int(doubler.remote(x).result(timeout_s=5))

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(16))) == [2 * x for x in range(16)]
    assert seen("doubler") == [16]


def test_an_error_reaches_every_caller_of_its_batch_and_only_them(
    doubler: embserve.Handle,
) -> None:
    seen("doubler").clear()
    bad = call_all(doubler, [1] * 15 + [-1])
    good = call_all(doubler, list(range(16)))
    assert all(isinstance(r, KeyError) for r in bad)
    assert good == [2 * x for x in range(16)]
    assert seen("doubler") == [16, 16]


def test_callers_on_another_loop_get_their_results_errors_and_cancellations(
    doubler: embserve.Handle,
) -> None:
    # Each answer reaches the caller's loop from the step that settles it (no done callback):
    # results and the batch's error, none left waiting; and the caller may cancel.
    async def calls() -> None:
        good = [doubler.remote(x) for x in range(16)]
        assert await asyncio.wait_for(asyncio.gather(*good), 5) == [2 * x for x in range(16)]
        bad = [doubler.remote(x) for x in [1] * 15 + [-1]]
        results = await asyncio.wait_for(asyncio.gather(*bad, return_exceptions=True), 5)
        assert all(isinstance(r, KeyError) for r in results)
        doomed = doubler.remote(7)  # alone: it waits 2 s for company
        await asyncio.sleep(0.05)
        assert doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(doomed, 5)

    asyncio.run(calls())


def test_a_wrong_length_is_a_clear_error_to_the_whole_batch(doubler: embserve.Handle) -> None:
    results = call_all(doubler, [-2] + [1] * 15)
    assert all(isinstance(r, ValueError) for r in results)
    assert "returned 15 results for a batch of 16 inputs" in str(results[0])
    assert call_all(doubler, [3] * 16) == [6] * 16  # the replica is fine afterwards


def waiting_in(name: str) -> int:
    return sum(b.waiting for b in live_batchers() if b.name == name)


def test_a_cancelled_waiting_request_leaves_its_batch(doubler: embserve.Handle) -> None:
    seen("doubler").clear()
    doomed = doubler.remote(1000)
    deadline = time.monotonic() + 2
    while waiting_in("Doubler.__call__") != 1:  # it reached the replica's batcher
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert doomed.cancel()
    deadline = time.monotonic() + 2
    while waiting_in("Doubler.__call__") != 0:  # it left the batch
        assert time.monotonic() < deadline
        time.sleep(0.001)
    start = time.perf_counter()
    assert call_all(doubler, list(range(16))) == [2 * x for x in range(16)]
    assert time.perf_counter() - start < 1.5  # one full batch, nobody left waiting 2 s
    assert seen("doubler") == [16]


def test_each_streaming_caller_gets_its_own_items(doubler: embserve.Handle) -> None:
    stream = doubler.options(stream=True).count
    streams = [stream.remote(start) for start in (0, 10, 20, 30)]
    assert [list(s) for s in streams] == [[s, s + 1, s + 2] for s in (0, 10, 20, 30)]


def test_a_lone_request_waits_the_timeout_and_no_more(doubler: embserve.Handle) -> None:
    wait = 0.02
    latencies = []
    for _ in range(5):
        time.sleep(0.03)  # an idle period: the point of the test, not a wait for state
        start = time.perf_counter()
        assert doubler.lone.remote(7).result(timeout_s=1) == 7
        latencies.append(time.perf_counter() - start)
    assert min(latencies) >= wait * 0.95  # timed from this request, not from the last batch
    # The best of five: a loaded machine may delay some, but one must come on time.
    assert min(latencies) <= wait + 0.002


def test_adaptive_lone_request_does_not_wait_and_load_fills_batches(
    doubler: embserve.Handle,
) -> None:
    seen("adaptive").clear()
    start = time.perf_counter()
    assert doubler.adaptive.remote(1).result(timeout_s=1) == 1
    assert time.perf_counter() - start < 0.1  # half the 0.2 s target: it did not wait for it
    assert call_all(doubler.adaptive, list(range(48))) == list(range(48))
    assert max(seen("adaptive")) > 8


def test_batch_size_set_from_reconfigure(runtime: Runtime) -> None:
    handle = runtime.run(Tunable.bind(), name="tunable")
    seen("tunable").clear()
    assert call_all(handle, list(range(6))) == list(range(6))
    assert seen("tunable") == [2, 2, 2]


def test_a_batched_function_deployment(runtime: Runtime) -> None:
    handle = runtime.run(square.bind(), name="square")
    seen("square").clear()
    assert call_all(handle, list(range(8))) == [x * x for x in range(8)]
    assert seen("square") == [4, 4]


def test_max_ongoing_requests_too_small_for_a_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="a replica must admit at least 64 requests"):
        Doubler.options(max_ongoing_requests=5)


@embserve.deployment
class Sizes:
    """Answers each input with the size of the batch it was in."""

    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=2.0)
    async def __call__(self, xs: list[int]) -> list[tuple[int, int]]:
        return [(x, len(xs)) for x in xs]


def test_batching_in_a_worker_process() -> None:
    pytest.importorskip("embserve_process")
    with Runtime(backend="process") as rt:
        handle = rt.run(Sizes.bind())
        start = time.perf_counter()
        assert call_all(handle, list(range(16))) == [(x, 8) for x in range(16)]
        assert time.perf_counter() - start < 1.5  # full batches, not the 2 s wait


@embserve.deployment
class Gated:
    """An async batch that waits for the test's gate, and a sync one that runs in a thread."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.threads: set[str] = set()

    @embserve.batch(max_batch_size=32, batch_wait_timeout_s=2.0)
    async def __call__(self, xs: list[int]) -> list[int]:
        await self.gate.wait()
        return [x + 1 for x in xs]

    def open(self) -> None:
        self.gate.set()

    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=2.0)
    def in_thread(self, xs: list[int]) -> list[tuple[int, str, str]]:
        # Runs in the batcher's thread, with the replica's context.
        where = threading.current_thread().name
        replica = embserve.get_replica_context().deployment
        return [(x * 3, where, replica) for x in xs]


@pytest.mark.anyio
async def test_batched_requests_take_no_task_each_and_one_pass_answers_them() -> None:
    async with Runtime() as rt:
        handle = await rt.run_async(Gated.bind(), name="gated")
        before = len(asyncio.all_tasks())
        responses = [handle.remote(i) for i in range(32)]  # one full batch, held at the gate
        await asyncio.sleep(0)
        # The batch's task, and nothing per request (each used to hold a runner task).
        assert len(asyncio.all_tasks()) - before <= 2
        await handle.open.remote()
        assert [await r for r in responses] == [i + 1 for i in range(32)]


@pytest.mark.anyio
async def test_a_batch_answered_in_one_step_gives_back_every_slot_and_counts_each_request() -> None:
    # The batch's answers settle its callers, give back their slots and count them at once; a
    # caller that left while the batch ran is counted as cancelled, and its slot not twice.
    async with Runtime() as rt:
        handle = await rt.run_async(Gated.bind(), name="g")
        responses = [handle.remote(i) for i in range(32)]  # one full batch, held at the gate
        await asyncio.sleep(0)
        assert rt.status().deployments["g"].replicas[0].ongoing_requests == 32
        assert responses[3].cancel()
        await handle.open.remote()
        results = await asyncio.gather(*responses, return_exceptions=True)
        assert [r for i, r in enumerate(results) if i != 3] == [i + 1 for i in range(32) if i != 3]
        assert isinstance(results[3], asyncio.CancelledError)
        assert rt.status().deployments["g"].replicas[0].ongoing_requests == 0
        found = samples(await rt.metrics_async())
        counts = {
            outcome: found[("embserve_requests_total", (("deployment", "g"), ("outcome", outcome)))]
            for outcome in ("ok", "cancelled")
        }
        assert counts == {"ok": 32, "cancelled": 1}  # 31 of the batch and the gate's opener


def test_a_sync_batch_runs_in_a_thread_with_the_replica_context(runtime: Runtime) -> None:
    handle = runtime.run(Gated.bind(), name="gated-sync").in_thread
    results = call_all(handle, list(range(16)))
    assert [r[0] for r in results] == [x * 3 for x in range(16)]
    assert all(r[1].startswith("embserve-batch") for r in results)  # not the loop's thread
    assert {r[2] for r in results} == {"gated-sync"}


def test_requests_in_a_batch_that_outlives_the_drain_fail_with_replica_died() -> None:
    with Runtime() as rt:
        handle = rt.run(Gated.options(graceful_shutdown_timeout_s=0).bind(), name="held")
        responses = [handle.remote(i) for i in range(32)]  # held at the gate
        deadline = time.monotonic() + 5
        while sum(b.running for b in live_batchers() if b.name == "Gated.__call__") != 32:
            assert time.monotonic() < deadline  # until the batch runs
            time.sleep(0.001)
        rt.delete("held")
        for response in responses:
            with pytest.raises(embserve.ReplicaDiedError):
                response.result(timeout_s=5)


@embserve.deployment
class RemoteBatches:
    """Batches in a worker process: answers, errors, and what cannot be pickled."""

    @embserve.batch(max_batch_size=4, batch_wait_timeout_s=2.0)
    def __call__(self, xs: list[int]) -> list[Any]:
        if -1 in xs:
            raise KeyError("a negative input")
        return [threading.Lock() if x == -2 else x * 2 for x in xs]


def test_batches_in_a_worker_process_answer_fail_and_withdraw() -> None:
    pytest.importorskip("embserve_process")
    with Runtime(backend="process") as rt:
        handle = rt.run(RemoteBatches.bind())
        assert call_all(handle, list(range(8))) == [x * 2 for x in range(8)]
        failed = call_all(handle, [1, 2, 3, -1])
        assert all(isinstance(r, KeyError) for r in failed)
        unpicklable = call_all(handle, [1, 2, 3, -2])
        assert unpicklable[:3] == [2, 4, 6] and isinstance(unpicklable[3], Exception)
        # A request cancelled while it waits in the worker's batch leaves it; the slot it held
        # comes back (the replica admits 8), and the next full batch goes at once.
        doomed = handle.remote(100)
        deadline = time.monotonic() + 5
        while rt.status().deployments["RemoteBatches"].replicas[0].ongoing_requests != 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert doomed.cancel()
        while rt.status().deployments["RemoteBatches"].replicas[0].ongoing_requests != 0:
            assert time.monotonic() < deadline  # the worker said the request ended
            time.sleep(0.001)
        start = time.perf_counter()
        assert call_all(handle, [5, 6, 7, 8]) == [10, 12, 14, 16]
        assert time.perf_counter() - start < 1.5


@embserve.deployment
class BatchedOverHTTP:
    """HTTP requests batched: each arrives in the batch as the Starlette request it is."""

    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def __call__(self, requests: list[Any]) -> list[dict[str, Any]]:
        bodies = [await r.json() for r in requests]
        return [
            {"x": b["x"], "path": r.url.path, "batch": len(requests)}
            for r, b in zip(requests, bodies, strict=True)
        ]


def test_http_requests_are_batched_as_starlette_requests() -> None:
    httpx = pytest.importorskip("httpx")
    from tests.e2e.servers import hypercorn_server

    app = embserve.App({"/b": BatchedOverHTTP.bind()})
    with hypercorn_server(app) as url, ThreadPoolExecutor(8) as pool:

        def post(x: int) -> Any:
            return httpx.post(f"{url}/b/item", json={"x": x}, timeout=10).json()

        answers = list(pool.map(post, range(8)))
    assert [a["x"] for a in answers] == list(range(8))
    assert {a["path"] for a in answers} == {"/b/item"}
    assert max(a["batch"] for a in answers) > 1


@pytest.mark.anyio
@pytest.mark.parametrize("watched_at", [0, 31])
async def test_a_batch_of_sent_and_watched_requests_answers_each_once(watched_at: int) -> None:
    # A request with a deadline is watched by a coroutine, which queues it with submit() and a
    # future of the batcher's own; the others are sent, with the request path's futures. One
    # batch holds both kinds, whichever comes first.
    async with Runtime() as rt:
        handle = await rt.run_async(Gated.bind(), name="g")
        responses = []
        for i in range(32):
            if i == watched_at:
                deadline = time.monotonic() + 30
                responses.append(rt.submit(Request("g", "__call__", (i,), deadline=deadline)))
            else:
                responses.append(handle.remote(i))
        await asyncio.sleep(0)
        assert rt.status().deployments["g"].replicas[0].ongoing_requests == 32
        await handle.open.remote()
        assert await asyncio.gather(*responses) == [i + 1 for i in range(32)]
        assert rt.status().deployments["g"].replicas[0].ongoing_requests == 0
        found = samples(await rt.metrics_async())
        assert found[("embserve_requests_total", (("deployment", "g"), ("outcome", "ok")))] == 33
