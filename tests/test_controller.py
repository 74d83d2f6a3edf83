"""A deployment's control loop on simulated time: health checks, request deadlines, restart
backoff and autoscaling, with no test waiting for real seconds to pass.

The runtime runs on the test's loop with a :class:`tests.clock.FakeClock`; only constructors
(which run in a replica's thread) take real time, and the tests poll for those.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

import embserve
from tests.clock import FakeClock, settle

pytestmark = pytest.mark.anyio


async def until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` on the loop (real time: threads may be involved) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the state was not reached in time")
        await asyncio.sleep(0.005)


class Flaky:
    healthy = True
    starts = 0
    failing_starts = 0

    def __init__(self) -> None:
        Flaky.starts += 1
        if Flaky.failing_starts:
            Flaky.failing_starts -= 1
            raise OSError("not yet")

    async def __call__(self) -> str:
        return embserve.get_replica_context().replica_id

    async def check_health(self) -> None:
        if not Flaky.healthy:
            raise RuntimeError("unhealthy")

    async def wait(self, gate: asyncio.Event) -> None:
        await gate.wait()


def replica_ids(rt: embserve.Runtime, name: str) -> list[str]:
    status = rt.status().deployments[name]
    return [r.replica_id for r in status.replicas if r.state is embserve.ReplicaState.RUNNING]


async def test_a_failing_health_check_replaces_the_replica_when_its_period_passes() -> None:
    clock = FakeClock()
    Flaky.healthy, Flaky.starts, Flaky.failing_starts = True, 0, 0
    deployment = embserve.deployment(health_check_period_s=30)(Flaky)
    async with embserve.Runtime(clock=clock) as rt:
        handle = await rt.run_async(deployment.bind(), name="flaky")
        first = await handle.remote()
        Flaky.healthy = False
        await clock.advance(29)
        assert replica_ids(rt, "flaky") == [first]  # not checked before the period ends
        await clock.advance(1)
        Flaky.healthy = True  # the replacement is healthy
        await until(lambda: replica_ids(rt, "flaky") not in ([first], []))
        assert await handle.remote() != first


async def test_a_deadline_passes_on_the_clock_not_on_the_wall() -> None:
    clock = FakeClock()
    deployment = embserve.deployment(request_timeout_s=60)(Flaky)
    async with embserve.Runtime(clock=clock) as rt:
        handle = await rt.run_async(deployment.bind(), name="flaky")
        gate = asyncio.Event()
        call = asyncio.ensure_future(handle.wait.remote(gate))
        await clock.advance(59)
        assert not call.done()
        await clock.advance(1)
        with pytest.raises(embserve.RequestTimeoutError, match="request_timeout_s=60"):
            await call
        gate.set()


async def test_restarts_back_off_on_the_clock() -> None:
    clock = FakeClock()
    Flaky.healthy, Flaky.starts, Flaky.failing_starts = True, 0, 0
    deployment = embserve.deployment(health_check_period_s=1)(Flaky)
    async with embserve.Runtime(clock=clock) as rt:
        handle = await rt.run_async(deployment.bind(), name="flaky")
        await handle.remote()
        Flaky.healthy, Flaky.failing_starts = False, 3
        await clock.advance(1)  # the check fails: the replica goes, its replacement fails
        Flaky.healthy = True
        await until(lambda: Flaky.starts == 2)
        with pytest.raises(embserve.DeploymentUnavailableError):
            await handle.remote()
        for delay, starts in ((0.1, 3), (0.2, 4), (0.4, 5)):  # doubling delays
            await clock.advance(delay * 0.9)
            await settle()
            assert Flaky.starts == starts - 1
            await clock.advance(delay * 0.1)
            await until(lambda starts=starts: Flaky.starts == starts)  # type: ignore[misc]
        await until(lambda: len(replica_ids(rt, "flaky")) == 1)
        assert await handle.remote()


async def test_autoscaling_decides_on_the_clock() -> None:
    clock = FakeClock()
    Flaky.healthy, Flaky.starts, Flaky.failing_starts = True, 0, 0
    deployment = embserve.deployment(
        max_ongoing_requests=10,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 1,
            "metrics_interval_s": 1,
            "look_back_period_s": 2,
            "upscale_delay_s": 3,
        },
    )(Flaky)
    async with embserve.Runtime(clock=clock) as rt:
        handle = await rt.run_async(deployment.bind(), name="flaky")
        gate = asyncio.Event()
        waiting = [asyncio.ensure_future(handle.wait.remote(gate)) for _ in range(3)]
        await settle()
        await clock.advance(2)
        assert rt.status().deployments["flaky"].target_replicas == 1  # the delay has not held
        await clock.advance(3)
        await until(lambda: rt.status().deployments["flaky"].target_replicas == 3)
        await until(lambda: len(replica_ids(rt, "flaky")) == 3)
        gate.set()
        await asyncio.gather(*waiting)


@pytest.mark.parametrize("start", [{"min_replicas": 0}, {"min_replicas": 0, "initial_replicas": 0}])
async def test_the_first_request_wakes_a_deployment_at_zero_at_once(start: dict[str, int]) -> None:
    clock = FakeClock()  # no autoscaler tick ever comes: the request alone must wake it
    Flaky.healthy, Flaky.starts, Flaky.failing_starts = True, 0, 0
    config = {"max_replicas": 2, "metrics_interval_s": 10, **start}
    deployment = embserve.deployment(autoscaling_config=config)(Flaky)
    async with embserve.Runtime(clock=clock) as rt:
        handle = await rt.run_async(deployment.bind(), name="flaky")
        assert rt.status().deployments["flaky"].target_replicas == 0
        assert Flaky.starts == 0
        answer = await asyncio.wait_for(asyncio.ensure_future(handle.remote()), 10)
        assert answer.startswith("flaky#")
        assert rt.status().deployments["flaky"].target_replicas == 1
        assert Flaky.starts == 1


@embserve.deployment(num_replicas=2, resources={"GPU": 1})
class OnAGpu:
    def __call__(self) -> str:
        return embserve.get_replica_context().replica_id


async def test_placement_that_cannot_finish_times_out_and_says_what_is_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    backend = embserve.backends.LocalBackend(resources={"GPU": 1}, gpu_ids=["0"])
    async with embserve.Runtime(backend, clock=clock) as rt:
        run = asyncio.ensure_future(rt.run_async(OnAGpu.bind(), name="gpu", timeout_s=30))
        await until(lambda: "gpu" in rt.status().deployments)
        await until(lambda: rt.status().deployments["gpu"].running_replicas == 1)
        handle = rt.get_handle("gpu")
        assert (await handle.remote()).startswith("gpu#")  # the one that runs serves meanwhile
        states = sorted(r.state.value for r in rt.status().deployments["gpu"].replicas)
        assert states == ["PENDING_ALLOCATION", "RUNNING"]
        await clock.advance(10)
        notices = [r for r in caplog.records if "is not running after 10 s" in r.getMessage()]
        assert notices and "GPU" in notices[0].getMessage()
        await clock.advance(20)
        with pytest.raises(embserve.DeploymentTimeoutError, match=r"gpu: 1/2 replicas.*GPU"):
            await run
        assert issubclass(embserve.DeploymentTimeoutError, TimeoutError)
        assert rt.status().deployments["gpu"].target_replicas == 2  # left in place
        assert (await handle.remote()).startswith("gpu#")


class SlowToLoad:
    loaded = threading.Event()

    def __init__(self) -> None:
        SlowToLoad.loaded.wait(10)

    def __call__(self) -> str:
        return embserve.get_replica_context().replica_id


async def test_the_start_notice_tells_a_running_constructor_from_a_wait_for_resources(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    SlowToLoad.loaded.clear()
    backend = embserve.backends.LocalBackend(resources={"GPU": 1}, gpu_ids=["0"])
    deployment = embserve.deployment(num_replicas=2, resources={"GPU": 1})(SlowToLoad)
    async with embserve.Runtime(backend, clock=clock) as rt:
        run = asyncio.ensure_future(rt.run_async(deployment.bind(), name="slow"))

        def states() -> list[str]:
            status = rt.status().deployments.get("slow")
            return sorted(r.state.value for r in status.replicas) if status else []

        # One replica holds the GPU and runs its constructor; the other waits for the GPU.
        await until(lambda: states() == ["PENDING_ALLOCATION", "STARTING"])
        await clock.advance(10)
        reasons = sorted(
            r.getMessage().split(" is not running after 10 s: ")[1]
            for r in caplog.records
            if "is not running after 10 s" in r.getMessage()
        )
        assert len(reasons) == 2, reasons
        assert reasons[0] == "still starting (its constructor may still be running)"
        assert reasons[1].startswith("waiting for resources: GPU")
        SlowToLoad.loaded.set()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_a_demand_that_can_never_fit_fails_at_once() -> None:
    backend = embserve.backends.LocalBackend(resources={"GPU": 1}, gpu_ids=["0"])
    async with embserve.Runtime(backend) as rt:
        with pytest.raises(embserve.DeploymentFailedError, match="cannot be placed"):
            await rt.run_async(OnAGpu.options(resources={"GPU": 2}).bind(), timeout_s=30)


def gpu_model(version: str, fail: bool = False, replicas: int = 2) -> embserve.Deployment:
    class Model:
        def __init__(self) -> None:
            if fail:
                raise OSError("the new weights are corrupt")

        async def __call__(self) -> str:
            return version

    return embserve.deployment(
        name="model",
        num_replicas=replicas,
        resources={"GPU": 1},
        version=version,
        graceful_shutdown_timeout_s=5,
    )(Model)


async def test_a_rolling_update_with_every_gpu_taken_drops_no_request() -> None:
    backend = embserve.backends.LocalBackend(resources={"GPU": 2}, gpu_ids=["0", "1"])
    async with embserve.Runtime(backend) as rt:
        handle = await rt.run_async(gpu_model("v1").bind())
        answers: list[str] = []
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                answers.append(await handle.remote())
                await asyncio.sleep(0)

        callers = [asyncio.ensure_future(caller()) for _ in range(16)]
        await until(lambda: len(answers) > 100)
        await asyncio.wait_for(rt.run_async(gpu_model("v2").bind()), 30)
        seen = len(answers)
        await until(lambda: len(answers) > seen + 100)
        stop.set()
        await asyncio.gather(*callers)  # any failed request would raise here
        assert answers[-1] == "v2" and "v1" in answers
        status = rt.status().deployments["model"]
        assert status.version == "v2" and status.running_replicas == 2


@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_failed_update_keeps_the_last_good_version_for_replacements(replicas: int) -> None:
    gpus = [str(i) for i in range(replicas)]
    backend = embserve.backends.LocalBackend(resources={"GPU": replicas}, gpu_ids=gpus)
    async with embserve.Runtime(backend) as rt:
        handle = await rt.run_async(gpu_model("v1", replicas=replicas).bind())
        failing = gpu_model("v2", fail=True, replicas=replicas)
        with pytest.raises(embserve.DeploymentFailedError, match="corrupt"):
            await asyncio.wait_for(rt.run_async(failing.bind()), 30)
        status = rt.status().deployments["model"]
        assert status.state == "UNHEALTHY"
        assert "update to v2 failed" in status.message and "version v1" in status.message
        assert status.version == "v1"
        await until(lambda: rt.status().deployments["model"].running_replicas == replicas)
        assert {await handle.remote() for _ in range(20)} == {"v1"}
