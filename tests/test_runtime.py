"""The runtime on the in-thread backend: lifecycle, calls, errors, health, updates, shutdown."""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import embserve
from embserve import Runtime
from tests.waiting import wait_until


@embserve.deployment
def double(x: int) -> int:
    return 2 * x


@embserve.deployment(num_replicas=2)
class Echo:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    async def __call__(self, x: Any) -> Any:
        return x

    def where(self) -> dict[str, Any]:
        context = embserve.get_replica_context()
        return {"replica": context.replica_id, "thread": threading.current_thread().name}

    async def where_async(self) -> str:
        return threading.current_thread().name

    def words(self, n: int) -> Iterator[str]:
        for i in range(n):
            yield f"{self.prefix}{i}"

    async def numbers(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def fail(self, message: str) -> None:
        raise ValueError(message)


@pytest.fixture
def rt() -> Iterator[Runtime]:
    with Runtime(seed=0) as runtime:
        yield runtime


# -- lifecycle ----------------------------------------------------------------------------


def test_sync_context_starts_serves_and_leaves_no_thread(no_thread_left: None) -> None:
    with Runtime() as runtime:
        handle = runtime.run(double.bind())
        assert handle.remote(21).result(timeout_s=1) == 42
        handle.remote(1).result()
    assert runtime.loop is not None and runtime.loop.is_closed()


@pytest.mark.anyio
async def test_async_context_runs_on_the_callers_loop_and_leaves_no_task() -> None:
    before = asyncio.all_tasks()
    async with Runtime() as runtime:
        assert runtime.loop is asyncio.get_running_loop()
        handle = await runtime.run_async(Echo.bind())
        assert await handle.remote("hi") == "hi"
        # async user code runs on this very thread: no hop
        assert await handle.where_async.remote() == threading.current_thread().name
    assert asyncio.all_tasks() == before


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_runtime_of_its_own_thread_runs_on_the_loop_asked_for(loop: str) -> None:
    pytest.importorskip("uvloop")
    from embserve._loop import running_loop

    with Runtime(loop=loop) as runtime:
        assert runtime.loop is not None
        assert ("uvloop" in type(runtime.loop).__module__) == (loop == "uvloop")
        assert runtime.run(double.bind()).remote(4).result() == 8

        async def found() -> tuple[bool, bool]:  # twice: the second time it was remembered
            return running_loop() is runtime.loop, running_loop() is runtime.loop

        assert asyncio.run_coroutine_threadsafe(found(), runtime.loop).result() == (True, True)
        assert running_loop() is None  # this thread runs no loop
    # Once the loop is closed, its thread no longer says it runs it.
    assert getattr(runtime.loop, "_thread_id", None) is None


def test_an_unknown_loop_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="loop must be one of auto, asyncio, uvloop"):
        Runtime(loop="trio")


def test_runtime_starts_on_first_use_and_shuts_down(no_thread_left: None) -> None:
    runtime = Runtime()
    handle = runtime.run(double.bind())
    assert handle.remote(2).result(timeout_s=1) == 4
    runtime.shutdown()
    with pytest.raises(embserve.EmbserveError, match="shut down"):
        handle.remote(2)
    with pytest.raises(embserve.EmbserveError, match="shut down"):
        runtime.run(double.bind())


def test_module_level_helpers_use_a_default_runtime(no_thread_left: None) -> None:
    """The Ray Serve idiom: run an app, call a method through the handle, get the result."""
    handle = embserve.run(Echo.bind(), name="echo", route_prefix=None)  # no HTTP server
    try:
        assert handle.words.options(stream=True).remote(2) is not None
        assert embserve.get_handle("echo").remote(5).result(timeout_s=1) == 5
        assert handle.where.remote().result()["replica"].startswith("echo#")
    finally:
        embserve.shutdown()


# -- calls ---------------------------------------------------------------------------------


def test_sync_user_code_runs_in_the_replica_threads(rt: Runtime) -> None:
    handle = rt.run(Echo.bind())
    where = handle.where.remote().result(timeout_s=1)
    assert where["thread"].startswith("embserve-Echo#")
    assert where["replica"] in {"Echo#0", "Echo#1"}


def test_composition_passes_handles_and_responses_chain(rt: Runtime) -> None:
    @embserve.deployment
    class Outer:
        def __init__(self, inner: embserve.Handle) -> None:
            assert isinstance(inner, embserve.Handle)
            self.inner = inner

        async def __call__(self, x: int) -> int:
            return int(await self.inner.remote(x)) + 1

    handle = rt.run(Outer.bind(double.bind()))
    assert handle.remote(5).result(timeout_s=1) == 11
    # A response given as an argument arrives as its result.
    assert handle.remote(handle.remote(1)).result(timeout_s=1) == 7
    assert set(rt.status().deployments) == {"double", "Outer"}


def test_streams_iterate_sync_and_async(rt: Runtime) -> None:
    handle = rt.run(Echo.bind("w"))
    assert list(handle.options(stream=True).words.remote(3)) == ["w0", "w1", "w2"]
    assert list(handle.options(stream=True).numbers.remote(3)) == [0, 1, 2]

    async def consume() -> list[int]:
        return [x async for x in handle.options(stream=True).numbers.remote(4)]

    assert asyncio.run(consume()) == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="stream=True"):
        handle.words.remote(1).result(timeout_s=1)
    with pytest.raises(TypeError, match="not a generator"):
        list(handle.options(stream=True).remote(1))


def test_one_handle_from_a_thread_pool_and_a_foreign_loop_at_once(rt: Runtime) -> None:
    handle = rt.run(Echo.bind())

    def sync_caller(i: int) -> int:
        return int(handle.remote(i).result(timeout_s=5))

    async def async_caller() -> list[int]:
        return list(await asyncio.gather(*(handle.remote(i) for i in range(100))))

    with ThreadPoolExecutor(8) as pool:
        sync_results = pool.map(sync_caller, range(200))
        foreign = asyncio.run(async_caller())
        assert list(sync_results) == list(range(200))
    assert foreign == list(range(100))


def test_handles_pickle(rt: Runtime) -> None:
    handle = rt.run(Echo.bind()).where
    again = pickle.loads(pickle.dumps(handle))
    assert again == handle
    assert again.remote().result(timeout_s=1)["replica"].startswith("Echo#")


def test_unknown_method_and_name(rt: Runtime) -> None:
    handle = rt.run(Echo.bind())
    with pytest.raises(AttributeError, match="no public method 'nope'"):
        handle.nope.remote().result(timeout_s=1)
    with pytest.raises(KeyError, match="missing"):
        rt.get_handle("missing")


def test_response_result_timeout_and_cancel(rt: Runtime) -> None:
    cancelled = threading.Event()

    @embserve.deployment
    class Slow:
        async def __call__(self, wait: bool) -> str:
            try:
                if wait:
                    await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "done"

    handle = rt.run(Slow.bind())
    response = handle.remote(True)
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.05)
    assert response.cancel()
    assert cancelled.wait(5)
    with pytest.raises(asyncio.CancelledError):
        response.result(timeout_s=1)
    assert handle.remote(False).result(timeout_s=1) == "done"


@pytest.mark.anyio
async def test_blocking_result_on_the_runtime_loop_is_refused() -> None:
    async with Runtime() as runtime:
        handle = await runtime.run_async(Echo.bind())
        response = handle.remote(1)
        with pytest.raises(RuntimeError, match="await"):
            response.result()
        assert await response == 1
        with pytest.raises(RuntimeError, match="_async"):
            runtime.run(Echo.bind())


# -- errors ---------------------------------------------------------------------------------


def test_user_exception_keeps_its_type_and_the_replica_traceback(rt: Runtime) -> None:
    handle = rt.run(Echo.bind())
    with pytest.raises(ValueError, match="bad input") as info:
        handle.fail.remote("bad input").result(timeout_s=1)
    text = embserve.remote_traceback(info.value)
    assert text is not None and "in fail" in text and "ValueError: bad input" in text


def test_constructor_failure_is_deployment_failed_with_traceback(rt: Runtime) -> None:
    @embserve.deployment
    class Broken:
        def __init__(self) -> None:
            raise OSError("weights not found")

    with pytest.raises(embserve.DeploymentFailedError, match="weights not found") as info:
        rt.run(Broken.bind())
    assert "OSError: weights not found" in info.value.traceback_text
    assert "Broken" not in rt.status().deployments
    assert rt.run(double.bind()).remote(1).result(timeout_s=1) == 2  # the runtime still serves


def test_backpressure_when_replicas_and_queue_are_full(rt: Runtime) -> None:
    gate = threading.Event()

    @embserve.deployment(max_ongoing_requests=1, max_queued_requests=1)
    def blocked() -> str:
        gate.wait(5)
        return "ok"

    handle = rt.run(blocked.bind())
    first, second = handle.remote(), handle.remote()
    wait_until(lambda: rt.status().deployments["blocked"].queued_requests == 1)
    with pytest.raises(embserve.BackPressureError, match="max_queued_requests=1"):
        handle.remote().result(timeout_s=1)
    gate.set()
    assert (first.result(timeout_s=5), second.result(timeout_s=5)) == ("ok", "ok")


def test_request_timeout(rt: Runtime) -> None:
    @embserve.deployment(request_timeout_s=0.05)
    async def sleepy(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "awake"

    handle = rt.run(sleepy.bind())
    with pytest.raises(embserve.RequestTimeoutError, match=r"request_timeout_s=0\.05"):
        handle.remote(10).result(timeout_s=5)
    assert handle.remote(0).result(timeout_s=5) == "awake"


def test_max_ongoing_requests_is_strict(rt: Runtime) -> None:
    active: dict[str, int] = {}
    peak: dict[str, int] = {}

    @embserve.deployment(num_replicas=2, max_ongoing_requests=3, max_queued_requests=-1)
    class Counted:
        async def __call__(self) -> None:
            me = embserve.get_replica_context().replica_id
            active[me] = active.get(me, 0) + 1
            peak[me] = max(peak.get(me, 0), active[me])
            for _ in range(3):
                await asyncio.sleep(0)
            active[me] -= 1

    handle = rt.run(Counted.bind())

    async def flood() -> None:
        await asyncio.gather(*(handle.remote() for _ in range(100)))

    asyncio.run(flood())
    assert set(peak) == {"Counted#0", "Counted#1"}
    assert max(peak.values()) <= 3


# -- lifecycle of replicas ------------------------------------------------------------------


def test_failing_health_check_replaces_the_replica(rt: Runtime) -> None:
    sick: set[str] = set()

    @embserve.deployment(health_check_period_s=0.02, health_check_timeout_s=1)
    class Fragile:
        def __call__(self) -> str:
            return embserve.get_replica_context().replica_id

        def check_health(self) -> None:
            if embserve.get_replica_context().replica_id in sick:
                raise RuntimeError("out of memory")

    handle = rt.run(Fragile.bind())
    first = handle.remote().result(timeout_s=1)
    sick.add(first)
    wait_until(lambda: handle.remote().result(timeout_s=1) != first)
    status = rt.status().deployments["Fragile"]
    assert status.running_replicas == 1
    assert all(r.replica_id != first for r in status.replicas if r.state.value == "RUNNING")


def test_user_config_reconfigures_in_place_when_the_version_holds(rt: Runtime) -> None:
    @embserve.deployment(user_config={"threshold": 1}, version="1")
    class Configured:
        def __init__(self) -> None:
            self.threshold = 0

        def reconfigure(self, config: dict[str, int]) -> None:
            self.threshold = config["threshold"]

        def __call__(self) -> tuple[int, str]:
            return self.threshold, embserve.get_replica_context().replica_id

    handle = rt.run(Configured.bind())
    threshold, replica = handle.remote().result(timeout_s=1)
    assert threshold == 1
    rt.run(Configured.options(user_config={"threshold": 7}).bind())
    assert handle.remote().result(timeout_s=1) == (7, replica)
    rt.run(Configured.options(user_config={"threshold": 9}, version="2").bind())
    threshold, new_replica = handle.remote().result(timeout_s=1)
    assert threshold == 9 and new_replica != replica


def test_user_config_without_reconfigure_fails_the_deployment(rt: Runtime) -> None:
    with pytest.raises(embserve.DeploymentFailedError, match="reconfigure"):
        rt.run(double.options(user_config={"a": 1}).bind())


def test_rolling_update_drops_no_request(rt: Runtime) -> None:
    @embserve.deployment(num_replicas=2)
    class V1:
        async def __call__(self) -> str:
            await asyncio.sleep(0.001)
            return "v1"

    @embserve.deployment(num_replicas=2)
    class V2:
        async def __call__(self) -> str:
            return "v2"

    handle = rt.run(V1.bind(), name="model")
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                seen.append(handle.remote().result(timeout_s=5))
            except BaseException as exc:
                errors.append(exc)

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(caller)
        wait_until(lambda: len(seen) > 20)
        rt.run(V2.bind(), name="model")
        count = len(seen)
        wait_until(lambda: len(seen) > count + 20)
        stop.set()
    assert not errors
    assert seen[-1] == "v2" and "v1" in seen
    assert {r.replica_id for r in rt.status().deployments["model"].replicas} == {
        "model#2",
        "model#3",
    }


def test_shutdown_drains_in_flight_requests(no_thread_left: None) -> None:
    started = threading.Event()

    @embserve.deployment
    async def working() -> str:
        started.set()
        await asyncio.sleep(0.1)
        return "finished"

    runtime = Runtime()
    response = runtime.run(working.bind()).remote()
    assert started.wait(5)
    runtime.shutdown()
    assert response.result(timeout_s=0) == "finished"


def test_shutdown_bounds_the_drain_and_fails_what_is_left(no_thread_left: None) -> None:
    started = threading.Event()

    @embserve.deployment(graceful_shutdown_timeout_s=0.05)
    async def stuck() -> None:
        started.set()
        await asyncio.Event().wait()

    runtime = Runtime()
    response = runtime.run(stuck.bind()).remote()
    assert started.wait(5)
    begin = time.monotonic()
    runtime.shutdown()
    assert time.monotonic() - begin < 2
    with pytest.raises(embserve.ReplicaDiedError, match="graceful_shutdown_timeout_s"):
        response.result(timeout_s=0)


def test_delete_drains_and_removes(rt: Runtime) -> None:
    handle = rt.run(Echo.bind(), name="gone")
    assert handle.remote(1).result(timeout_s=1) == 1
    rt.delete("gone")
    assert "gone" not in rt.status().deployments
    with pytest.raises(embserve.EmbserveError, match="no endpoint or deployment named 'gone'"):
        handle.remote(1).result(timeout_s=1)


def test_status_reports_deployments_replicas_and_endpoints(rt: Runtime) -> None:
    rt.run(Echo.bind(), name="status-demo", route_prefix="/demo")
    status = rt.status()
    deployment = status.deployments["status-demo"]
    assert (deployment.state, deployment.running_replicas, deployment.target_replicas) == (
        "HEALTHY",
        2,
        2,
    )
    assert status.endpoints["status-demo"].route_prefix == "/demo"
    plain = status.to_dict()
    assert plain["deployments"]["status-demo"]["replicas"][0]["state"] == "RUNNING"
    with pytest.raises(ValueError, match="route prefix '/demo'"):
        rt.run(double.bind(), route_prefix="/demo")


def test_run_without_waiting_serves_once_replicas_run(rt: Runtime) -> None:
    constructed = threading.Event()

    @embserve.deployment
    class Late:
        def __init__(self) -> None:
            constructed.wait(5)

        def __call__(self) -> str:
            return "late"

    handle = rt.run(Late.bind(), wait=False)
    response = handle.remote()
    assert rt.status().deployments["Late"].state == "UPDATING"
    constructed.set()
    assert response.result(timeout_s=5) == "late"
    wait_until(lambda: rt.status().deployments["Late"].state == "HEALTHY")


def test_cancelling_a_stream_closes_the_generator(rt: Runtime) -> None:
    closed = threading.Event()

    @embserve.deployment
    class Endless:
        async def __call__(self) -> AsyncIterator[int]:
            try:
                n = 0
                while True:
                    yield n
                    n += 1
            finally:
                closed.set()

    stream = rt.run(Endless.bind()).options(stream=True).remote()
    iterator = iter(stream)
    assert [next(iterator) for _ in range(3)] == [0, 1, 2]
    stream.cancel()
    assert closed.wait(5)
    assert rt.status().deployments["Endless"].replicas[0].ongoing_requests == 0


def test_routing_keys_stick_to_replicas_with_consistent_hashing(rt: Runtime) -> None:
    handle = rt.run(Echo.options(router="consistent_hash", num_replicas=3).bind(), name="sticky")
    homes = {}
    for user in range(30):
        keyed = handle.options(routing_key=f"user-{user}").where
        homes[user] = {keyed.remote().result(timeout_s=5)["replica"] for _ in range(5)}
    assert all(len(replicas) == 1 for replicas in homes.values())
    assert len(set().union(*homes.values())) == 3
    keyed = handle.options(routing_key="user-1")
    assert pickle.loads(pickle.dumps(keyed)) == keyed != handle
    with pytest.raises(TypeError, match="routing_key"):
        handle.options(routing_key=1)  # type: ignore[arg-type]


def test_deleting_a_deployment_that_gets_traffic_is_refused() -> None:
    @embserve.deployment
    def v1(x: int) -> int:
        return x

    @embserve.deployment
    def v2(x: int) -> int:
        return -x

    with embserve.Runtime() as rt:
        handle = rt.run(v1.bind(), name="clf")
        rt.run(v2.bind(), name="clf-v2")
        rt.set_traffic("clf", {"clf": 0.5}, shadow={"clf-v2": 0.1})
        with pytest.raises(embserve.EmbserveError, match=r"endpoint\(s\) \['clf'\]"):
            rt.delete("clf-v2")
        assert handle.remote(1).result(timeout_s=5) == 1
        rt.set_traffic("clf", {"clf": 1.0})
        rt.delete("clf-v2")
        rt.delete("clf")  # an endpoint goes with its own deployment
        assert not rt.status().deployments


def test_status_reads_as_a_table_and_start_up_says_when_it_is_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @embserve.deployment(num_replicas=2, version="3")
    def table(x: int) -> int:
        return x

    with caplog.at_level(logging.INFO, "embserve"), embserve.Runtime() as rt:
        rt.run(table.bind(), route_prefix="/table")
        text = str(rt.status())
    lines = text.splitlines()
    assert lines[0] == "backend: local"
    assert lines[1].split() == ["table", "v3", "HEALTHY", "2/2", "running"]
    assert [line.split()[:2] for line in lines[2:4]] == [
        ["table#0", "RUNNING"],
        ["table#1", "RUNNING"],
    ]
    assert "0 in flight" in lines[2]
    assert lines[4] == "endpoint table /table -> table 100%"
    assert all(len(line) <= 120 for line in lines)
    messages = [r.getMessage() for r in caplog.records]
    assert "starting 2 replica(s) of 'table'" in messages
    assert any(m.startswith("'table' ready: 2/2 in ") for m in messages)
