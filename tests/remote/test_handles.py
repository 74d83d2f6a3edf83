"""Handles called by user code inside the replica, run by the caller's runtime."""

from __future__ import annotations

import asyncio

import pytest

import embserve
from embserve._remote import STREAM_WINDOW
from tests.remote.parts import (
    RUNTIME_ID,
    Connect,
    FakeRuntime,
    Model,
    call,
    eventually,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_handles_inside_the_replica_reach_the_callers_runtime(connect: Connect) -> None:
    runtime = FakeRuntime()
    other = embserve.Handle(RUNTIME_ID, "other", routing_key="k")
    async with connect(Model, other, submitter=runtime) as ends:
        replica = ends.replica
        assert await replica.call(call("via_handle", 5)) == ("served", 5)
        assert await replica.call(call("via_handle_sync", 6)) == ("served", 6)
        assert await replica.call(call("via_handle_stream", 200)) == list(range(200))
        assert await replica.call(call("via_handle_failing")) == "caught from the runtime"
        first = runtime.requests[0]
        assert first.target == "other" and first.routing_key == "k" and first.args == (5,)
        assert runtime.requests[2].stream is True


async def test_cancelling_a_call_cancels_the_handle_call_it_made(connect: Connect) -> None:
    runtime = FakeRuntime()
    other = embserve.Handle(RUNTIME_ID, "other")
    async with connect(Model, other, submitter=runtime) as ends:
        task = asyncio.ensure_future(ends.replica.call(call("via_handle_blocked")))
        await eventually(lambda: runtime.requests)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(runtime.cancelled.is_set)
        await eventually(lambda: not ends.replica._forwarder.tasks)  # type: ignore[union-attr]


async def test_a_stream_the_replica_gives_up_on_stops_in_the_runtime(connect: Connect) -> None:
    runtime = FakeRuntime()
    other = embserve.Handle(RUNTIME_ID, "other")
    async with connect(Model, other, submitter=runtime) as ends:
        assert await ends.replica.call(call("via_handle_stream_first", 1_000_000)) == 0
        await eventually(runtime.stream_closed.is_set)
        # The runtime's side keeps to the window the replica grants, as the replica does.
        assert runtime.produced <= STREAM_WINDOW + 2
        await eventually(lambda: not ends.replica._forwarder.tasks)  # type: ignore[union-attr]
