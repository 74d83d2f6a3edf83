"""Every per-request structure empties once requests end, however they end.

Thousands of requests that succeed, raise, time out, are cancelled or are refused for
backpressure; afterwards no router queue, in-flight count, task registry or pending-reply map
holds anything (the leak of LitServe#452 was a response map that grew when requests failed).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest

import embserve
from tests.waiting import wait_until


# The timeout leaves the admitted requests time to be answered while the loop also turns away
# the rest of the storm, on a loaded 2-core machine too; kind 2 outlives it.
@embserve.deployment(
    num_replicas=2, max_ongoing_requests=4, max_queued_requests=32, request_timeout_s=0.25
)
class Mixed:
    async def __call__(self, i: int) -> int:
        kind = i % 5
        if kind == 1:
            raise ValueError(i)
        if kind == 2:
            await asyncio.sleep(1)  # outlives request_timeout_s
        if kind == 3:
            await asyncio.sleep(0.001)
        return i


def per_request_state(runtime: embserve.Runtime) -> dict[str, int]:
    controller = runtime._controllers["mixed"]
    state = {
        "queued": controller.router.queued,
        "in_flight": sum(r.ongoing for r in controller.running),
        "background_tasks": len(runtime._dispatch.background),
        "controller_tasks": len(controller._tasks),
    }
    for replica in controller.running:
        for name in ("_calls", "_killed", "_streams"):
            value: Any = getattr(replica, name, None)
            if value is not None:
                state[f"{replica.replica_id}.{name}"] = len(value)
        # A remote replica's requests awaiting answers, leases held for work still running
        # after its caller gave up, and the handle calls its user code made.
        pending: Any = getattr(replica, "_pending", None)
        if pending is not None:
            state[f"{replica.replica_id}.pending_calls"] = len(pending.calls)
            state[f"{replica.replica_id}.pending_streams"] = len(pending.streams)
            state[f"{replica.replica_id}.held_leases"] = len(pending.held)
        forwarder: Any = getattr(replica, "_forwarder", None)
        if forwarder is not None:
            state[f"{replica.replica_id}.forwarded_calls"] = len(forwarder.tasks)
    return state


@pytest.fixture(params=["local", "process"])
def runtime(request: pytest.FixtureRequest) -> Iterator[embserve.Runtime]:
    with embserve.Runtime(backend=request.param) as rt:
        yield rt


def test_per_request_state_empties_after_a_storm(runtime: embserve.Runtime) -> None:
    handle = runtime.run(Mixed.bind(), name="mixed")
    outcomes: dict[str, int] = {}

    async def storm() -> None:
        responses = [handle.remote(i) for i in range(2000)]
        for i, response in enumerate(responses):
            if i % 7 == 0:
                response.cancel()
        for response in responses:
            try:
                await response
                kind = "ok"
            except BaseException as exc:  # every way a request can end is counted
                kind = type(exc).__name__
            outcomes[kind] = outcomes.get(kind, 0) + 1

    asyncio.run(storm())
    assert sum(outcomes.values()) == 2000
    assert {
        "ok",
        "ValueError",
        "RequestTimeoutError",
        "CancelledError",
        "BackPressureError",
    } <= set(outcomes)
    gc.collect()
    wait_until(lambda: not any(per_request_state(runtime).values()))
