"""The Dask backend on an in-process LocalCluster over loopback TCP: calls, placement, status."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import distributed
import numpy as np
import pytest

import embserve
from embserve.errors import DeploymentFailedError
from embserve.spi import STREAM_WINDOW
from embserve_dask import DaskBackend
from tests.dask.clusters import loopback_cluster
from tests.waiting import wait_for, wait_until

# distributed's constructors are untyped; tests use them through these names.
Client: Any = distributed.Client
wait: Any = distributed.wait


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two in-process workers, each declaring one GPU, on 127.0.0.1."""
    with loopback_cluster(
        n_workers=2, threads_per_worker=2, processes=False, resources={"GPU": 1}
    ) as local_cluster:
        yield local_cluster


@pytest.fixture(scope="module")
def runtime(cluster: Any) -> Iterator[embserve.Runtime]:
    """One runtime on the cluster for the whole module."""
    with embserve.Runtime(backend=DaskBackend(cluster)) as rt:
        yield rt


@embserve.deployment(num_replicas=2, max_ongoing_requests=8)
class Model:
    """A deployment with every kind of method."""

    def __init__(self, scale: int) -> None:
        self.scale = scale
        self.config: Any = None

    async def __call__(self, x: Any) -> Any:
        return x * self.scale

    def where(self) -> tuple[str, str, tuple[str, ...]]:
        context = embserve.get_replica_context()
        return context.worker, context.replica_id, context.gpu_ids

    def fail(self) -> None:
        raise KeyError("no such thing")

    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def acount(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def get_config(self) -> Any:
        return self.config


@embserve.deployment(resources={"GPU": 0.5}, num_replicas=4)
class HalfGPU:
    """Four half-GPU replicas: exactly what two GPU=1 workers hold."""

    def where(self) -> tuple[str, tuple[str, ...]]:
        context = embserve.get_replica_context()
        return context.worker, context.gpu_ids


@embserve.deployment(resources={"GPU": 0.5})
class OneMoreHalf:
    """A fifth half-GPU replica, which fits only once the others are gone."""

    def __call__(self) -> str:
        return embserve.get_replica_context().worker


@embserve.deployment
class Broken:
    """A constructor that fails."""

    def __init__(self) -> None:
        raise RuntimeError("cannot load the weights")


def test_calls_methods_streams_and_errors(runtime: embserve.Runtime) -> None:
    handle = runtime.run(Model.bind(3), name="model")
    assert handle.remote(2).result(timeout_s=10) == 6
    array = np.arange(100_000, dtype=np.float64)
    np.testing.assert_array_equal(handle.remote(array).result(timeout_s=10), array * 3)
    with pytest.raises(KeyError, match="no such thing") as info:
        handle.fail.remote().result(timeout_s=10)
    assert "in fail" in (embserve.errors.remote_traceback(info.value) or "")
    assert list(handle.options(stream=True).count.remote(4)) == [0, 1, 2, 3]
    assert list(handle.options(stream=True).acount.remote(3)) == [0, 1, 2]
    runtime.run(Model.options(user_config={"v": 1}, version="1").bind(3), name="model")
    assert {handle.get_config.remote().result(timeout_s=10)["v"] for _ in range(6)} == {1}
    runtime.delete("model")


def test_replicas_of_a_deployment_spread_over_workers(
    runtime: embserve.Runtime, cluster: Any
) -> None:
    handle = runtime.run(Model.bind(1), name="spread")
    replicas = runtime.status().deployments["spread"].replicas
    workers = {r.info["worker"] for r in replicas}
    assert workers == set(cluster.scheduler_info["workers"])
    seen = {handle.where.remote().result(timeout_s=10)[0] for _ in range(20)}
    assert seen == workers
    runtime.delete("spread")


def test_fractional_gpus_are_bin_packed_and_a_short_deployment_waits(
    runtime: embserve.Runtime, cluster: Any
) -> None:
    handle = runtime.run(HalfGPU.bind(), name="half")
    replicas = runtime.status().deployments["half"].replicas
    per_worker: dict[str, int] = {}
    for replica in replicas:
        per_worker[replica.info["worker"]] = per_worker.get(replica.info["worker"], 0) + 1
        assert replica.info["gpu_ids"] == ["0"]
    assert sorted(per_worker.values()) == [2, 2]
    assert handle.where.remote().result(timeout_s=10)[1] == ("0",)

    runtime.run(OneMoreHalf.bind(), name="more", wait=False)
    deadline = time.monotonic() + 10
    while "GPU=0.5" not in runtime.status().deployments["more"].message:
        assert time.monotonic() < deadline, runtime.status().deployments["more"]
        time.sleep(0.01)
    message = runtime.status().deployments["more"].message
    assert "most free on any worker is 0" in message
    # Freeing the GPUs lets the waiting replica start.
    runtime.delete("half")
    more = runtime.get_handle("more")
    assert more.remote().result(timeout_s=20) in cluster.scheduler_info["workers"]
    runtime.delete("more")


@embserve.deployment
class Waiter:
    """Waits until cancelled, and says so when asked (it runs in a process of its own)."""

    def __init__(self) -> None:
        self.cancelled = False

    async def __call__(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def was_cancelled(self) -> bool:
        return self.cancelled


@embserve.deployment(health_check_period_s=0.05)
class Flaky:
    """Turns unhealthy when told to; its replacement starts healthy."""

    def __init__(self) -> None:
        self.sick = False

    def check_health(self) -> None:
        if self.sick:
            raise RuntimeError("out of GPU memory")

    def sicken(self) -> None:
        self.sick = True

    def __call__(self) -> str:
        return embserve.get_replica_context().replica_id


def test_cancelling_a_response_cancels_async_user_code(runtime: embserve.Runtime) -> None:
    handle = runtime.run(Waiter.bind(), name="waiter")
    response = handle.remote()
    deadline = time.monotonic() + 10
    while runtime.status().deployments["waiter"].replicas[0].ongoing_requests == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert response.cancel()
    wait_until(lambda: handle.was_cancelled.remote().result(timeout_s=10))
    runtime.delete("waiter")


def test_a_failing_health_check_replaces_the_replica(runtime: embserve.Runtime) -> None:
    handle = runtime.run(Flaky.bind(), name="flaky")
    assert handle.remote().result(timeout_s=10) == "flaky#0"
    handle.sicken.remote().result(timeout_s=10)
    deadline = time.monotonic() + 10
    while handle.remote().result(timeout_s=10) == "flaky#0":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    runtime.delete("flaky")


def _one() -> int:
    return 1


def test_dask_itself_keeps_other_tasks_off_the_gpus_replicas_hold(
    runtime: embserve.Runtime, cluster: Any
) -> None:
    runtime.run(Model.options(resources={"GPU": 1}).bind(1), name="gpus")
    with Client(cluster) as client:
        # Each replica's task holds its worker's whole GPU for as long as the replica lives.
        other = client.submit(_one, resources={"GPU": 1}, pure=False)
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):  # distinct before 3.11
            wait(other, timeout=0.5)
        runtime.delete("gpus")
        assert other.result(timeout=10) == 1


@embserve.deployment(max_ongoing_requests=4)
class Producer:
    """A fast generator that counts what it produced."""

    def __init__(self) -> None:
        self.produced = 0

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            self.produced = i + 1
            yield i

    def produced_count(self) -> int:
        return self.produced


def test_a_stream_runs_at_most_a_window_ahead_of_its_reader(runtime: embserve.Runtime) -> None:
    handle = runtime.run(Producer.bind(), name="producer")
    stream = handle.options(stream=True).count.remote(10_000)
    iterator = iter(stream)
    assert next(iterator) == 0
    # The generator runs ahead by the window, and no further, however long we keep asking.
    wait_for(lambda: handle.produced_count.remote().result(timeout_s=10) >= STREAM_WINDOW)
    for _ in range(50):
        assert handle.produced_count.remote().result(timeout_s=10) <= STREAM_WINDOW + 1
    # Read on: the reader's grants keep it going, to the end.
    assert list(iterator) == list(range(1, 10_000))
    runtime.delete("producer")


def test_a_failing_constructor_fails_the_deployment(runtime: embserve.Runtime) -> None:
    with pytest.raises(DeploymentFailedError, match="cannot load the weights"):
        runtime.run(Broken.bind(), name="broken")


def test_async_runtime_reaches_the_cluster_through_an_address(cluster: Any) -> None:
    address = cluster.scheduler_address.replace("tcp://", "dask://")

    async def main() -> list[int]:
        async with embserve.Runtime(backend=address) as rt:
            handle = await rt.run_async(Model.options(num_replicas=1).bind(2), name="m")
            assert rt.status().backend.startswith("dask tcp://127.0.0.1")
            return list(await asyncio.gather(*(handle.remote(i) for i in range(20))))

    assert asyncio.run(main()) == [2 * i for i in range(20)]


@embserve.deployment
class LoopProbe:
    """Says how long its replica's loop polls before it sleeps."""

    async def __call__(self) -> float:
        selector = asyncio.get_running_loop()._selector
        return float(getattr(selector, "poll_s", 0.0))


@pytest.mark.parametrize("poll_s", [0.0, 200e-6])
def test_replicas_and_their_caller_poll_as_busy_poll_s_says(cluster: Any, poll_s: float) -> None:
    async def main() -> tuple[float, bool]:
        backend = DaskBackend(cluster.scheduler_address, busy_poll_s=poll_s)
        async with embserve.Runtime(backend=backend) as rt:
            handle = await rt.run_async(LoopProbe.bind(), name="probe")
            in_replica = await handle.remote()
            selector = asyncio.get_running_loop()._selector
            waiters = getattr(selector, "waiters", ())
            return in_replica, any(waiter.poll_s == poll_s for waiter in waiters)

    in_replica, caller_polls = asyncio.run(main())
    assert in_replica == poll_s
    assert caller_polls is (poll_s > 0)
    with pytest.raises(ValueError, match="busy_poll_s"):
        DaskBackend(cluster.scheduler_address, busy_poll_s=1.0)


def test_from_address_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="dask://host:8786"):
        DaskBackend.from_address("http://127.0.0.1:8786")
    assert DaskBackend.from_address("tls://10.0.0.1:8786")._target == "tls://10.0.0.1:8786"


def test_import_embserve_stays_free_of_dask() -> None:
    code = "import embserve, sys; assert not {'dask', 'distributed'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
