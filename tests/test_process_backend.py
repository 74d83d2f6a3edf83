"""The process backend with real worker processes: calls, streams, batching, composition,
payloads, placement of fractional GPUs read from the replicas' own environment."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest

import embserve
import embserve.wire
from embserve.backends import load_backend, resolve_backend
from embserve.spi import STREAM_WINDOW, decode, encode
from embserve_process import ProcessBackend
from tests.waiting import wait_for

T = TypeVar("T")

pytestmark = pytest.mark.timeout(60)


class Boom(ValueError):
    """A user exception that must keep its type across the process boundary."""


class Unrebuildable(Exception):
    """Pickles, but cannot be rebuilt from its args on the other side."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@embserve.deployment(max_ongoing_requests=16, user_config={"scale": 2})
class Echo:
    """One worker that exercises every kind of user code."""

    def __init__(self) -> None:
        self.scale = 1
        self.cancelled = 0
        self.produced = 0

    def reconfigure(self, config: dict[str, int]) -> None:
        self.scale = config["scale"]

    async def __call__(self, x: int) -> int:
        return x * self.scale

    def where(self) -> dict[str, Any]:
        context = embserve.get_replica_context()
        return {
            "pid": os.getpid(),
            "deployment": context.deployment,
            "replica_id": context.replica_id,
            "worker": context.worker,
            "gpu_ids": context.gpu_ids,
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def fail(self) -> None:
        raise Boom("bad input")

    async def in_a_task(self) -> bool:
        # User code may rely on running inside a task: asyncio.timeout, anyio cancel scopes
        # (and so httpx) need one, also before the method's first await.
        import anyio

        with anyio.fail_after(5):
            await asyncio.sleep(0)
        return asyncio.current_task() is not None

    def fail_oddly(self) -> None:
        raise Unrebuildable("odd", 7)

    def arr(self, a: np.ndarray) -> np.ndarray:
        a += 1  # arrays arrive writable, in memory of their own
        return a

    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def acount(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            self.produced = i + 1
            yield i

    def produced_count(self) -> int:
        return self.produced

    async def slow(self) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def cancelled_count(self) -> int:
        return self.cancelled

    def unpicklable(self) -> Any:
        return lambda: None  # cloudpickle sends it; a generator cannot be sent at all

    def generator_object(self) -> Any:
        return (i for i in range(3))


@embserve.deployment(max_ongoing_requests=16)
class Batched:
    """A batched method, batching in its worker."""

    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def __call__(self, items: list[int]) -> list[tuple[int, int]]:
        return [(item, len(items)) for item in items]


@embserve.deployment
class Ingress:
    """Calls Echo through a handle from inside its own worker process."""

    def __init__(self, echo: embserve.Handle) -> None:
        self.echo = echo

    async def __call__(self, x: int) -> int:
        return int(await self.echo.remote(x)) + 1

    def sync_call(self, x: int) -> int:
        return int(self.echo.remote(x).result(timeout_s=10)) + 1

    async def chained(self, x: int) -> int:
        first = self.echo.remote(x)
        return int(await self.echo.remote(first))  # a Response passed as an argument

    async def streamed(self, n: int) -> list[int]:
        return [i async for i in self.echo.count.options(stream=True).remote(n)]

    async def failing(self) -> str:
        try:
            await self.echo.fail.remote()
        except Boom as exc:
            return f"caught {type(exc).__name__}: {exc}"
        return "not raised"


@embserve.deployment(max_ongoing_requests=2)
class Blocking:
    """Sync user code that reads its request's context."""

    def context(self) -> tuple[str, str | None, bool]:
        request = embserve.get_request_context()
        return request.request_id, request.routing_key, request.deadline is not None


@embserve.deployment(health_check_period_s=0.1)
class Fragile:
    """Healthy until told otherwise; its health check runs in the worker."""

    def __init__(self) -> None:
        self.sick = False

    def fall_ill(self) -> None:
        self.sick = True

    def check_health(self) -> None:
        if self.sick:
            raise RuntimeError("sick")

    def pid(self) -> int:
        return os.getpid()


@embserve.deployment
class Vanishing:
    """Its worker exits while the constructor runs."""

    def __init__(self) -> None:
        os._exit(3)


@embserve.deployment
class Broken:
    """Fails in its constructor, in its worker."""

    def __init__(self) -> None:
        raise RuntimeError("no weights here")


@pytest.fixture(scope="module")
def rt() -> Iterator[embserve.Runtime]:
    """One process runtime for the module, with a declared capacity of 2 GPUs."""
    with embserve.Runtime(backend=ProcessBackend(resources={"CPU": 8, "GPU": 2})) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def echo(rt: embserve.Runtime) -> embserve.Handle:
    """The Echo deployment, started once."""
    return rt.run(Echo.bind(), name="echo")


def test_the_backend_is_found_by_name() -> None:
    assert load_backend("process") is ProcessBackend
    assert isinstance(resolve_backend("process"), ProcessBackend)
    assert embserve.backends.ProcessBackend is ProcessBackend


def test_async_and_sync_user_code_run_in_another_process(echo: embserve.Handle) -> None:
    assert echo.remote(21).result(timeout_s=10) == 42  # user_config applied at start
    where = echo.where.remote().result(timeout_s=10)
    assert where["pid"] != os.getpid()
    assert where["worker"] == str(where["pid"])
    assert where["deployment"] == "echo" and where["replica_id"].startswith("echo#")
    # The capacity has GPUs and this replica asked for none: it sees none.
    assert where["gpu_ids"] == () and where["cuda"] == ""


def test_user_code_runs_inside_a_task(echo: embserve.Handle) -> None:
    assert echo.in_a_task.remote().result(timeout_s=10) is True


def test_user_exceptions_keep_their_type_and_the_worker_traceback(echo: embserve.Handle) -> None:
    with pytest.raises(Boom, match="bad input") as info:
        echo.fail.remote().result(timeout_s=10)
    text = embserve.remote_traceback(info.value)
    assert text is not None and "def fail" not in text and "in fail" in text


def test_an_exception_that_cannot_be_rebuilt_arrives_as_remote_error(
    echo: embserve.Handle,
) -> None:
    with pytest.raises(embserve.wire.RemoteError, match="Unrebuildable: odd") as info:
        echo.fail_oddly.remote().result(timeout_s=10)
    assert "fail_oddly" in (embserve.remote_traceback(info.value) or "")


def test_results_that_cannot_be_pickled_fail_the_call(echo: embserve.Handle) -> None:
    assert callable(echo.unpicklable.remote().result(timeout_s=10))
    with pytest.raises(TypeError, match="generator"):
        echo.generator_object.remote().result(timeout_s=10)
    assert echo.remote(1).result(timeout_s=10) == 2  # the replica is fine afterwards


def test_arguments_that_cannot_be_pickled_fail_the_call_and_free_its_slot(
    rt: embserve.Runtime, echo: embserve.Handle
) -> None:
    with pytest.raises(TypeError, match="lock"):
        echo.remote(threading.Lock()).result(timeout_s=10)
    assert echo.remote(1).result(timeout_s=10) == 2  # the replica is fine afterwards

    def in_flight() -> int:
        return sum(r.ongoing_requests for r in rt.status().deployments["echo"].replicas)

    wait_for(lambda: in_flight() == 0)


def test_an_8mb_numpy_array_round_trips(echo: embserve.Handle) -> None:
    array = np.arange(1_048_576, dtype=np.float64)  # 8 MiB
    result = echo.arr.remote(array).result(timeout_s=20)
    assert result.nbytes == 8 * 1_048_576 and result.flags.writeable
    np.testing.assert_array_equal(result, array + 1)
    assert array[0] == 0  # the caller's array was not touched


def test_streams_from_sync_and_async_generators(echo: embserve.Handle) -> None:
    assert list(echo.count.options(stream=True).remote(5)) == [0, 1, 2, 3, 4]
    assert list(echo.acount.options(stream=True).remote(3)) == [0, 1, 2]

    async def first_then_stop() -> int:
        stream = echo.acount.options(stream=True).remote(1_000_000)
        async for item in stream:
            stream.cancel()
            return int(item)
        return -1

    assert asyncio.run(first_then_stop()) == 0
    # Longer than the stream window: the consumer's grants keep it going.
    assert list(echo.count.options(stream=True).remote(500)) == list(range(500))
    assert echo.remote(2).result(timeout_s=10) == 4


def test_a_stream_runs_at_most_a_window_ahead_of_its_reader(echo: embserve.Handle) -> None:
    stream = echo.acount.options(stream=True).remote(10_000)
    iterator = iter(stream)
    assert next(iterator) == 0
    # The generator may run ahead by the window, and no further, however long we wait.
    wait_for(lambda: echo.produced_count.remote().result(timeout_s=10) >= STREAM_WINDOW)
    time.sleep(0.1)  # a chance to overrun, were the window not enforced
    assert echo.produced_count.remote().result(timeout_s=10) <= STREAM_WINDOW + 1
    stream.cancel()


def test_batching_works_inside_the_worker(rt: embserve.Runtime) -> None:
    batched = rt.run(Batched.bind(), name="batched")
    responses = [batched.remote(i) for i in range(8)]
    results = [r.result(timeout_s=10) for r in responses]
    assert [item for item, _ in results] == list(range(8))
    assert max(size for _, size in results) > 1
    rt.delete("batched")


def test_cancelling_a_call_cancels_async_user_code_in_the_worker(echo: embserve.Handle) -> None:
    before = echo.cancelled_count.remote().result(timeout_s=10)
    response = echo.slow.remote()
    time.sleep(0.05)  # let it reach the worker; the assertion below polls, this only orders
    response.cancel()
    wait_for(lambda: echo.cancelled_count.remote().result(timeout_s=10) == before + 1)


def test_handles_inside_a_worker_call_other_deployments(
    rt: embserve.Runtime, echo: embserve.Handle
) -> None:
    ingress = rt.run(Ingress.bind(Echo.bind()), name="ingress")
    assert ingress.remote(5).result(timeout_s=10) == 11
    assert ingress.sync_call.remote(5).result(timeout_s=10) == 11
    assert ingress.chained.remote(3).result(timeout_s=10) == 12
    assert ingress.streamed.remote(3).result(timeout_s=10) == [0, 1, 2]
    assert ingress.failing.remote().result(timeout_s=10) == "caught Boom: bad input"


def test_a_constructor_failure_is_a_deployment_failure(rt: embserve.Runtime) -> None:
    with pytest.raises(embserve.DeploymentFailedError, match="no weights here"):
        rt.run(Broken.bind(), name="broken")
    assert "broken" not in rt.status().deployments
    with pytest.raises(embserve.DeploymentFailedError, match=r"died while starting.*code 3"):
        rt.run(Vanishing.bind(), name="vanishing")


def test_a_worker_failing_its_health_check_is_replaced(rt: embserve.Runtime) -> None:
    handle = rt.run(Fragile.bind(), name="fragile")
    first = handle.pid.remote().result(timeout_s=10)
    handle.fall_ill.remote().result(timeout_s=10)
    # Replaced by a new worker (a new pid), not merely taken out of routing.
    wait_for(lambda: handle.pid.remote().result(timeout_s=10) != first)
    status = rt.status().deployments["fragile"]
    assert [r.info["pid"] for r in status.replicas] != [first]
    rt.delete("fragile")


@embserve.deployment(num_replicas=4, resources={"GPU": 0.5})
def gpu_env() -> tuple[str, str | None, tuple[str, ...]]:
    """The replica id, its own CUDA_VISIBLE_DEVICES, and the GPUs of its context."""
    context = embserve.get_replica_context()
    return context.replica_id, os.environ.get("CUDA_VISIBLE_DEVICES"), context.gpu_ids


def test_fractional_gpus_are_bin_packed_and_a_fifth_replica_waits(rt: embserve.Runtime) -> None:
    handle = rt.run(gpu_env.bind(), name="gpus")
    seen: dict[str, tuple[str | None, tuple[str, ...]]] = {}
    for _ in range(400):
        replica_id, cuda, gpu_ids = handle.remote().result(timeout_s=10)
        seen[replica_id] = (cuda, gpu_ids)
        if len(seen) == 4:
            break
    assert sorted(seen.values()) == [("0", ("0",)), ("0", ("0",)), ("1", ("1",)), ("1", ("1",))]
    infos = [r.info for r in rt.status().deployments["gpus"].replicas]
    assert sorted(tuple(i["gpu_ids"]) for i in infos) == [("0",), ("0",), ("1",), ("1",)]

    fifth = rt.run(gpu_env.options(num_replicas=1).bind(), name="fifth", wait=False)
    message = wait_for(lambda: rt.status().deployments["fifth"].message)
    assert message.startswith("waiting for resources: GPU")
    assert rt.status().deployments["fifth"].running_replicas == 0
    rt.delete("gpus")
    _, cuda, gpu_ids = fifth.remote().result(timeout_s=20)
    assert cuda in ("0", "1") and gpu_ids == (cuda,)
    rt.delete("fifth")


def test_a_demand_that_can_never_fit_fails_at_once(rt: embserve.Runtime) -> None:
    with pytest.raises(embserve.DeploymentFailedError, match="GPU: asks 3"):
        rt.run(gpu_env.options(num_replicas=1, resources={"GPU": 3}).bind(), name="huge")


def test_frames_keep_numpy_buffers_out_of_band() -> None:
    array = np.ones((256, 256))
    frames = encode({"a": array, "f": lambda: 1})  # a lambda forces the cloudpickle path
    assert len(frames) == 2 and memoryview(frames[1]).nbytes == array.nbytes
    back = decode([bytes(frames[0]), bytearray(frames[1])])
    np.testing.assert_array_equal(back["a"], array)
    assert back["f"]() == 1


def test_busy_polling_can_be_turned_off() -> None:
    with pytest.raises(ValueError, match="busy_poll_s"):
        ProcessBackend(busy_poll_s=1.0)
    assert ProcessBackend().busy_poll_s in (0.0, 100e-6)
    with embserve.Runtime(backend=ProcessBackend(busy_poll_s=0)) as runtime:
        handle = runtime.run(Echo.bind(), name="sleepy")
        assert handle.remote(4).result(timeout_s=10) == 8


def test_the_request_context_reaches_a_worker(rt: embserve.Runtime) -> None:
    handle = rt.run(Blocking.bind(), name="context")
    first_id, key, has_deadline = (
        handle.options(routing_key="user-7").context.remote().result(timeout_s=10)
    )
    # The id the handle made in this process is the one user code sees in the worker.
    assert first_id.startswith(embserve.request._PREFIX) and key == "user-7"
    assert not has_deadline
    second_id, key, _ = handle.context.remote().result(timeout_s=10)
    assert second_id != first_id and key is None
    timed = rt.run(Blocking.options(request_timeout_s=10).bind(), name="context-timed")
    assert timed.context.remote().result(timeout_s=10)[2]  # the deadline crossed too
    rt.delete("context")
    rt.delete("context-timed")


# -- plain threads' calls, on each replica's direct line ------------------------------------


@embserve.deployment(max_ongoing_requests=2)
class Napping:
    """Sync code that takes its time in the worker, and says which worker it is."""

    def pid(self) -> int:
        return os.getpid()

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def test_a_plain_threads_call_is_answered_while_the_runtimes_loop_is_held(
    rt: embserve.Runtime, echo: embserve.Handle
) -> None:
    assert echo.remote(1).result() == 2  # the first call turns the shared counts on
    assert rt.loop is not None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(10)

    rt.loop.call_soon_threadsafe(hold)
    assert held.wait(10)
    answers: list[int] = []
    try:
        caller = threading.Thread(target=lambda: answers.append(echo.remote(21).result()))
        caller.start()
        caller.join(10)
        # The thread sent its call and read the answer itself, on the replica's direct line.
        assert answers == [42]
    finally:
        release.set()


def test_a_thread_waiting_on_a_killed_worker_fails_at_once_and_the_next_call_is_served(
    rt: embserve.Runtime,
) -> None:
    handle = rt.run(Napping.bind(), name="napping")
    pid = handle.pid.remote().result()  # also turns the shared counts on
    errors: list[BaseException] = []

    def nap() -> None:
        try:
            handle.nap.remote(30).result()
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=nap)
    caller.start()
    # The call holds its slot while it runs on the line, and status says so.
    wait_for(lambda: "1 in flight" in str(rt.status()))
    os.kill(pid, signal.SIGKILL)
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], embserve.ReplicaDiedError)
    assert errors[0].started and "SIGKILL" in str(errors[0])
    wait_for(lambda: handle.pid.remote().result() not in (pid, None))  # a new worker serves
    rt.delete("napping")


def test_threads_at_once_share_the_line_and_the_loop_and_each_call_is_answered_once(
    rt: embserve.Runtime,
) -> None:
    handle = rt.run(Napping.bind(), name="napping-many")
    handle.pid.remote().result()
    answers: list[float] = []
    lock = threading.Lock()

    def caller(n: int) -> None:
        for i in range(20):
            got = handle.nap.remote((100 * n + i) / 1e5).result()
            with lock:
                answers.append(got)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(answers) == sorted((100 * n + i) / 1e5 for n in range(6) for i in range(20))
    rt.delete("napping-many")
