"""Every request ends exactly once, whatever replicas die and callers cancel.

A backend twin whose replicas die at random (before a request starts, or while it runs) drives
the real runtime, controller and router.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any, ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st

import embserve
from embserve.backends import Backend
from embserve.replica import Replica, ReplicaSpec, ReplicaState, Request
from tests.replicas import StubReplica


class FlakyReplica(StubReplica):
    """Dies with probability ``death_rate`` per call, before or during the call."""

    def __init__(self, spec: ReplicaSpec, backend: FlakyBackend) -> None:
        super().__init__(spec.replica_id, spec.deployment)
        self.backend = backend
        self.limit = spec.config.ongoing_limit
        self.active = 0

    async def call(self, call: Request) -> Any:
        backend = self.backend
        if self.state is ReplicaState.STOPPED:
            raise embserve.ReplicaDiedError("dead", started=False)
        self.active += 1
        backend.peak = max(backend.peak, self.active)
        try:
            roll = backend.rng.random()
            if roll < backend.death_rate / 2:
                self.die()
                raise embserve.ReplicaDiedError("died before start", started=False)
            for _ in range(backend.rng.randrange(3)):
                await asyncio.sleep(0)
            backend.executions[call.args[0]] += 1
            if roll > 1 - backend.death_rate / 2:
                self.die()
                raise embserve.ReplicaDiedError("died while running", started=True)
            return call.args[0]
        finally:
            self.active -= 1

    def die(self) -> None:
        if self.state is not ReplicaState.STOPPED:
            self.state = ReplicaState.STOPPED
            self.backend.on_replica_died(self, "killed by the test")

    async def stop(self) -> None:
        self.state = ReplicaState.STOPPED


class FlakyBackend(Backend):
    name: ClassVar[str] = "flaky"

    def __init__(self, seed: int, death_rate: float) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.death_rate = death_rate
        self.peak = 0
        self.executions: Counter[int] = Counter()

    async def start_replica(self, spec: ReplicaSpec) -> Replica:
        replica = FlakyReplica(spec, self)
        replica.state = ReplicaState.RUNNING
        return replica


@embserve.deployment(num_replicas=3, max_ongoing_requests=2, max_queued_requests=-1)
def identity(x: int) -> int:
    return x


@given(
    seed=st.integers(0, 2**16),
    requests=st.integers(1, 60),
    death_rate=st.sampled_from([0.0, 0.05, 0.2]),
    cancel_rate=st.sampled_from([0.0, 0.1]),
    max_retries=st.integers(0, 2),
)
@settings(max_examples=40, deadline=None)
def test_every_request_ends_exactly_once(
    seed: int, requests: int, death_rate: float, cancel_rate: float, max_retries: int
) -> None:
    async def scenario() -> None:
        backend = FlakyBackend(seed, death_rate)
        rng = random.Random(seed + 1)
        async with embserve.Runtime(backend=backend, seed=seed) as runtime:
            handle = await runtime.run_async(identity.options(max_retries=max_retries).bind())
            responses = [handle.remote(i) for i in range(requests)]
            cancelled = {i for i in range(requests) if rng.random() < cancel_rate}
            await asyncio.sleep(0)
            for index in cancelled:
                responses[index].cancel()
            outcomes = await asyncio.gather(
                *(_outcome(r) for r in responses), return_exceptions=False
            )
        assert backend.peak <= 2, "a replica ran more than max_ongoing_requests at once"
        for index, outcome in enumerate(outcomes):
            if outcome == "ok":
                # Ran to completion at least once, and at most 1 + max_retries times.
                assert 1 <= backend.executions[index] <= 1 + max_retries
            elif outcome == "died":
                assert backend.executions[index] == 1 + max_retries
            else:
                assert outcome == "cancelled" and index in cancelled
                assert backend.executions[index] <= 1 + max_retries

    asyncio.run(scenario())


async def _outcome(response: embserve.Response) -> str:
    try:
        await response
    except embserve.ReplicaDiedError:
        return "died"
    except asyncio.CancelledError:
        return "cancelled"
    return "ok"
