"""Dask worker processes killed under 64-way load from handles.

The worker (not only the replica's process) is killed with SIGKILL while its replica runs
calls: every call ends within a bound; calls that had not started there run on the other
replica; those it was running end with ReplicaDiedError; the runtime hears of the death from
Dask and places a replacement on the worker that remains, and the deployment serves again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

import embserve
from embserve_dask import DaskBackend
from tests.dask.clusters import loopback_cluster
from tests.processes import alive
from tests.waiting import settle, wait_for

pytestmark = pytest.mark.timeout(90)

LOAD = 64


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two worker processes with nannies (which restart a killed one), room for two replicas
    each, on 127.0.0.1."""
    with loopback_cluster(n_workers=2, threads_per_worker=2, processes=True) as local_cluster:
        yield local_cluster


@embserve.deployment(num_replicas=2, max_ongoing_requests=4)
class Slow:
    """Answers after ``delay`` seconds, saying which process ran it."""

    async def __call__(self, delay: float) -> int:
        await asyncio.sleep(delay)
        return os.getpid()


def running(rt: embserve.Runtime) -> dict[str, Any]:
    """The RUNNING replicas of ``slow``: replica id -> info."""
    replicas = rt.status().deployments["slow"].replicas
    return {r.replica_id: r for r in replicas if r.state is embserve.ReplicaState.RUNNING}


def test_a_worker_killed_under_load_ends_every_call_and_capacity_returns(cluster: Any) -> None:
    with embserve.Runtime(backend=DaskBackend(cluster)) as rt:
        handle = rt.run(Slow.bind(), name="slow")
        before = running(rt)
        assert len({r.info["worker"] for r in before.values()}) == 2
        responses = [handle.remote(0.05) for _ in range(LOAD)]
        # The victim: a replica that is running calls now.
        victim_id = wait_for(lambda: [i for i, r in running(rt).items() if r.ongoing_requests])[0]
        victim = before[victim_id].info
        killed = time.monotonic()
        os.kill(victim["worker_pid"], signal.SIGKILL)
        outcomes = settle(responses)
        assert time.monotonic() - killed < 20  # nothing hung
        failures = [o for o in outcomes if isinstance(o, Exception)]
        # Only what the victim was running fails, as started; the rest ran on the other one.
        assert len(failures) <= Slow.config.ongoing_limit
        assert all(isinstance(f, embserve.ReplicaDiedError) and f.started for f in failures)
        assert len(outcomes) == LOAD
        # Capacity returns: two replicas again, none on the dead worker, serving.
        wait_for(lambda: victim_id not in running(rt) and len(running(rt)) == 2, timeout_s=20)
        after = running(rt)
        assert victim["worker"] not in {r.info["worker"] for r in after.values()}
        pids = {r.info["pid"] for r in after.values()}
        assert {handle.remote(0).result(timeout_s=10) for _ in range(8)} <= pids
        # The replica's own process did not outlive its worker.
        wait_for(lambda: not alive(victim["pid"]), timeout_s=10)
