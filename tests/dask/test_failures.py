"""Worker processes that retire under load, and handles used inside replicas.

Workers killed under load: tests/reliability/test_dask_crash.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import distributed
import pytest

import embserve
from embserve_dask import DaskBackend
from tests.dask.clusters import three_workers

# distributed's constructors are untyped; tests use them through these names.
Client: Any = distributed.Client


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Three worker processes (with nannies, which restart a killed worker) on 127.0.0.1."""
    yield from three_workers()


@embserve.deployment(num_replicas=2, max_ongoing_requests=4)
class Slow:
    """Answers after ``delay`` seconds, saying where it ran."""

    async def __call__(self, delay: float) -> tuple[str, int]:
        await asyncio.sleep(delay)
        return embserve.get_replica_context().worker, os.getpid()


@embserve.deployment
class Front:
    """Calls another deployment through a handle it was given (composition)."""

    def __init__(self, back: embserve.Handle) -> None:
        self.back = back

    async def __call__(self, x: int) -> Any:
        return await self.back.remote(x), os.getpid()

    def sync_call(self, x: int) -> Any:
        return self.back.remote(x).result(timeout_s=10)

    def stream_back(self, n: int) -> list[int]:
        return list(self.back.options(stream=True).count.remote(n))


@embserve.deployment
class Back:
    """The deployment called from inside another replica."""

    def __call__(self, x: int) -> int:
        return x + 1

    def count(self, n: int) -> Iterator[int]:
        yield from range(n)


def _replica_workers(rt: embserve.Runtime, name: str) -> dict[str, Any]:
    return {
        r.replica_id: r.info
        for r in rt.status().deployments[name].replicas
        if r.state.value == "RUNNING"
    }


def _wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_handles_inside_replicas_call_back_to_the_runtime(cluster: Any) -> None:
    with embserve.Runtime(backend=DaskBackend(cluster)) as rt:
        handle = rt.run(Front.bind(Back.bind()), name="front")
        result, pid = handle.remote(1).result(timeout_s=10)
        assert result == 2 and pid != os.getpid()
        assert handle.sync_call.remote(5).result(timeout_s=10) == 6
        assert handle.stream_back.remote(3).result(timeout_s=10) == [0, 1, 2]


def test_retire_workers_drains_replicas_before_the_worker_goes(cluster: Any) -> None:
    with Client(cluster) as client, embserve.Runtime(backend=DaskBackend(client)) as rt:
        _wait_for(lambda: len(client.scheduler_info()["workers"]) == 3)
        handle = rt.run(Slow.bind(), name="slow")
        victim_id, victim = next(iter(_replica_workers(rt, "slow").items()))
        responses = [handle.remote(0.5) for _ in range(8)]
        time.sleep(0.1)
        client.retire_workers([victim["worker"]])
        # Every request, including those on the retiring worker, finishes with a result.
        results = [response.result(timeout_s=20) for response in responses]
        assert victim["worker"] in {worker for worker, _ in results}
        _wait_for(lambda: len(_replica_workers(rt, "slow")) == 2)
        assert victim_id not in _replica_workers(rt, "slow")
        assert victim["worker"] not in client.scheduler_info()["workers"]
