"""Cancelling requests, the leases held until their work ended, and the end of the connection."""

from __future__ import annotations

import asyncio

import pytest

import embserve
from embserve.router import PowerOfTwoChoicesRouter
from tests.remote.parts import (
    Connect,
    call,
    eventually,
    state,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


# -- cancelling ----------------------------------------------------------------------------


async def test_cancelling_a_call_cancels_async_user_code(connect: Connect) -> None:
    async with connect() as ends:
        task = asyncio.ensure_future(ends.replica.call(call("slow")))
        await eventually(state.started.is_set)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: state.cancelled == 1)
        assert await ends.replica.call(call("add", 1, 1)) == 2


@pytest.mark.parametrize("how", ["call", "send"])
async def test_a_cancelled_sync_call_holds_its_lease_until_its_thread_ends(
    connect: Connect, how: str
) -> None:
    async with connect() as ends:
        replica = ends.replica
        router = PowerOfTwoChoicesRouter(max_ongoing_requests=4)
        router.set_replicas([replica])
        request = call("blocked")
        lease = router.try_assign(request)
        assert lease is not None
        request.lease = lease
        if how == "call":
            task = asyncio.ensure_future(replica.call(request))
            await eventually(state.started.is_set)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            future = asyncio.get_running_loop().create_future()
            withdraw = replica.send(request, future)
            assert withdraw is not None
            await eventually(state.started.is_set)
            withdraw()
        lease.release()  # what the request path does once the caller gave up
        for _ in range(50):  # the cancel reaches the replica, whose thread runs on
            await asyncio.sleep(0)
        assert replica.ongoing == 1
        state.release.set()
        await eventually(lambda: replica.ongoing == 0)
        assert not replica._pending.held  # type: ignore[union-attr]


async def test_a_cancelled_async_call_gives_its_lease_back(connect: Connect) -> None:
    async with connect() as ends:
        replica = ends.replica
        router = PowerOfTwoChoicesRouter(max_ongoing_requests=4)
        router.set_replicas([replica])
        request = call("slow")
        lease = router.try_assign(request)
        assert lease is not None
        request.lease = lease
        task = asyncio.ensure_future(replica.call(request))
        await eventually(state.started.is_set)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        lease.release()
        await eventually(lambda: replica.ongoing == 0)


# -- the end of the connection -------------------------------------------------------------


async def test_the_connection_closing_fails_calls_in_flight_as_started(connect: Connect) -> None:
    async with connect() as ends:
        call_in_flight = asyncio.ensure_future(ends.replica.call(call("slow")))
        stream = ends.replica.stream(call("count", 1_000_000))
        assert await stream.__anext__() == 0
        await eventually(state.started.is_set)
        sent = asyncio.get_running_loop().create_future()
        assert ends.replica.send(call("slow"), sent) is not None
        ends.replica_loop.call_soon_threadsafe(ends.replica_end.close)
        with pytest.raises(embserve.ReplicaDiedError) as died:
            await call_in_flight
        assert died.value.started
        with pytest.raises(embserve.ReplicaDiedError) as sent_died:
            await sent
        assert sent_died.value.started
        with pytest.raises(embserve.ReplicaDiedError):
            async for _ in stream:
                pass
        # After the end, nothing leaves: the router may retry these elsewhere.
        with pytest.raises(embserve.ReplicaDiedError) as later:
            await ends.replica.call(call("add", 1, 1))
        assert not later.value.started
        with pytest.raises(embserve.ReplicaDiedError) as later_stream:
            async for _ in ends.replica.stream(call("count", 3)):
                pass
        assert not later_stream.value.started
        assert (
            ends.replica.send(call("add", 1, 1), asyncio.get_running_loop().create_future()) is None
        )
        pending = ends.replica._pending
        assert pending is not None and not pending.calls and not pending.streams


async def test_a_call_on_a_transport_closed_here_never_leaves(connect: Connect) -> None:
    async with connect() as ends:
        ends.caller_end.close()
        with pytest.raises(embserve.ReplicaDiedError) as info:
            await ends.replica.call(call("add", 1, 1))
        assert not info.value.started
