"""The one request path: every way in builds a Request, a router lease is released once, sync
user code keeps its slot until its thread ends, and a deployment that cannot start fails its
requests at once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pytest

import embserve
from embserve.replica import Replica
from embserve.request import Request
from embserve.router import Router
from tests.waiting import wait_until


class RecordingRouter(Router):
    """A custom router (the documented way to write one): least loaded, and it keeps a log."""

    seen: list[Request] = []

    def choose(self, replicas: Sequence[Replica], request: Request) -> Replica | None:
        RecordingRouter.seen.append(request)
        best = min(replicas, key=lambda r: r.ongoing)
        return best if best.ongoing < self.max_ongoing_requests else None


@embserve.deployment(router=RecordingRouter, num_replicas=2)
class Context:
    async def __call__(self, tag: str) -> tuple[str, str]:
        return tag, embserve.get_request_context().request_id

    def sync_id(self) -> str:
        return embserve.get_request_context().request_id


def test_a_router_subclass_places_every_request_it_is_given() -> None:
    RecordingRouter.seen.clear()
    with embserve.Runtime() as rt:
        handle = rt.run(Context.bind(), name="ctx")
        assert handle.remote("a").result(timeout_s=5)[0] == "a"
        keyed = handle.options(routing_key="user-1")
        assert keyed.remote("b").result(timeout_s=5)[0] == "b"
        assert all(isinstance(r, Request) for r in RecordingRouter.seen)
        assert [r.routing_key for r in RecordingRouter.seen] == [None, "user-1"]
        assert [r.target for r in RecordingRouter.seen] == ["ctx", "ctx"]
        replicas = rt.status().deployments["ctx"].replicas
        assert sum(r.ongoing_requests for r in replicas) == 0


def test_router_option_refuses_what_is_not_a_router() -> None:
    with pytest.raises(TypeError, match="Router subclass"):
        embserve.deployment(router=dict)(Context.target)
    with pytest.raises(ValueError, match="Router subclass"):
        embserve.deployment(router="fastest")(Context.target)


def test_user_code_sees_the_id_of_its_request_in_async_and_sync_methods() -> None:
    with embserve.Runtime() as rt:
        handle = rt.run(Context.bind(), name="ctx")
        ids = {handle.remote("x").result(timeout_s=5)[1] for _ in range(20)}
        assert len(ids) == 20 and all(ids)
        assert handle.sync_id.remote().result(timeout_s=5)
    with pytest.raises(RuntimeError, match="outside a request"):
        embserve.get_request_context()


def test_a_lease_is_given_back_once_however_often_it_is_released() -> None:
    from tests.replicas import StubReplica

    router = embserve.router.make_router(
        "round_robin", max_ongoing_requests=1, max_queued_requests=-1
    )
    replica = StubReplica("r", "d")
    router.set_replicas([replica])
    lease = router.try_assign(Request("d"))
    assert lease is not None and replica.ongoing == 1
    let_go = lease.hold()
    lease.release()
    lease.release()
    assert replica.ongoing == 1  # held: its work still runs
    let_go()
    let_go()
    assert replica.ongoing == 0
    assert lease.hold() is not let_go and replica.ongoing == 0  # nothing left to hold


@embserve.deployment(max_ongoing_requests=1, num_replicas=2, request_timeout_s=0.2)
class Stuck:
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def __call__(self, wait: bool) -> str:
        if wait:
            self.gate.wait(30)
        return embserve.get_replica_context().replica_id


def test_a_sync_call_that_timed_out_keeps_its_slot_until_its_thread_ends() -> None:
    gate = threading.Event()
    with embserve.Runtime() as rt:
        handle = rt.run(Stuck.bind(gate), name="stuck")
        with pytest.raises(embserve.RequestTimeoutError):
            handle.remote(True).result(timeout_s=5)

        def ongoing() -> dict[str, int]:
            replicas = rt.status().deployments["stuck"].replicas
            return {r.replica_id: r.ongoing_requests for r in replicas}

        busy = [rid for rid, count in ongoing().items() if count == 1]
        assert len(busy) == 1, ongoing()  # status counts the thread that still runs
        # Every new request goes to the other replica and is served at once: none queues
        # behind the stuck thread.
        for _ in range(10):
            assert handle.remote(False).result(timeout_s=5) != busy[0]
        gate.set()
        wait_until(lambda: sum(ongoing().values()) == 0)


class Broken:
    """Starts once; every later constructor fails, and so does its health check."""

    starts = 0
    healthy = True

    def __init__(self) -> None:
        Broken.starts += 1
        if Broken.starts > 1:
            raise OSError("the model file is gone")

    def __call__(self) -> str:
        return "ok"

    def check_health(self) -> None:
        if not Broken.healthy:
            raise RuntimeError("unhealthy")


def test_a_deployment_that_cannot_start_a_replica_fails_requests_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    Broken.starts, Broken.healthy = 0, True
    deployment = embserve.deployment(health_check_period_s=0.05)(Broken)
    with embserve.Runtime() as rt, caplog.at_level(logging.WARNING, "embserve"):
        handle = rt.run(deployment.bind(), name="broken")
        assert handle.remote().result(timeout_s=5) == "ok"
        Broken.healthy = False
        wait_until(lambda: rt.status().deployments["broken"].state == "UNHEALTHY")
        wait_until(lambda: not rt.status().deployments["broken"].running_replicas)
        with pytest.raises(embserve.DeploymentUnavailableError, match=r"'broken'.*model file"):
            handle.remote().result(timeout_s=5)
        assert issubclass(embserve.DeploymentUnavailableError, embserve.EmbserveError)

        def failures() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "starting a replica failed" in r.getMessage()]

        wait_until(lambda: len(failures()) >= 2)  # it keeps trying, with backoff, logging each
        assert "attempt 2; next try in 0.2 s" in failures()[1].getMessage()
        assert all("OSError: the model file is gone" in r.getMessage() for r in failures())
        Broken.starts = 0  # the file is back: the next try starts a replica
        Broken.healthy = True
        wait_until(lambda: rt.status().deployments["broken"].running_replicas == 1)
        assert handle.remote().result(timeout_s=5) == "ok"


def test_queued_requests_fail_when_the_last_start_fails() -> None:
    """A deploy nobody waits for that fails: its queued requests end, none hangs."""
    Broken.starts, Broken.healthy = 1, True  # the very first constructor fails
    deployment = embserve.deployment(Broken)
    with embserve.Runtime() as rt:
        handle = rt.run(deployment.bind(), name="broken", wait=False)
        with pytest.raises(embserve.DeploymentUnavailableError):
            handle.remote().result(timeout_s=5)


@embserve.deployment
class Inner:
    async def __call__(self) -> float | None:
        return embserve.get_request_context().deadline


@embserve.deployment(request_timeout_s=30)
class Outer:
    def __init__(self, inner: embserve.Handle) -> None:
        self.inner = inner

    async def __call__(self) -> tuple[float | None, float | None]:
        mine = embserve.get_request_context().deadline
        return mine, await self.inner.remote()


def test_a_call_made_while_serving_a_request_inherits_its_deadline() -> None:
    with embserve.Runtime() as rt:
        outer, inner = rt.run(Outer.bind(Inner.bind()), name="outer").remote().result(timeout_s=5)
        assert outer is not None and inner == outer
        assert rt.get_handle("Inner").remote().result(timeout_s=5) is None
