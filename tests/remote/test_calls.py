"""Calls over the protocol: results, request metadata, errors, values, the fast send path."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import embserve
from embserve._remote.messages import CALL, OK
from embserve.wire import RemoteError
from tests.remote.parts import (
    Boom,
    Broken,
    Connect,
    Healthy,
    Model,
    call,
    eventually,
    spy,
    state,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


# -- calls ---------------------------------------------------------------------------------


async def test_start_reports_the_replica_and_calls_return_results(connect: Connect) -> None:
    async with connect(Model, user_config={"scale": 3}) as ends:
        assert ends.info == {"where": "here"}
        assert ends.replica.state is embserve.ReplicaState.RUNNING
        assert await ends.replica.call(call("__call__", 2)) == 6  # async, user_config applied
        assert await ends.replica.call(call("add", 2, 3)) == 5  # sync, in a thread
        results = await asyncio.gather(*(ends.replica.call(call("add", i, i)) for i in range(50)))
        assert results == [2 * i for i in range(50)]


async def test_the_request_context_reaches_user_code(connect: Connect) -> None:
    async with connect() as ends:
        request = call("context", request_id="abc-123", routing_key="user-7")
        # Where it runs, as the replica's side says: its worker, its info, the GPUs it sees.
        context = await ends.replica.call(request)
        assert context == ("abc-123", "user-7", "test-worker", "here", ("7",))


async def test_health_checks_and_reconfigure(connect: Connect) -> None:
    async with connect(Healthy) as ends:
        await ends.replica.check_health()
        Healthy.sick = True
        try:
            with pytest.raises(RuntimeError, match="sick"):
                await ends.replica.check_health()
        finally:
            Healthy.sick = False
    async with connect() as ends:
        await ends.replica.reconfigure({"scale": 5})
        assert await ends.replica.call(call("__call__", 2)) == 10


async def test_a_constructor_failure_is_a_deployment_failure(connect: Connect) -> None:
    with pytest.raises(embserve.DeploymentFailedError, match="no weights here"):
        async with connect(Broken):
            pass


# -- errors and values ---------------------------------------------------------------------


async def test_exceptions_keep_their_type_and_the_replica_traceback(connect: Connect) -> None:
    async with connect() as ends:
        with pytest.raises(Boom, match="bad input") as info:
            await ends.replica.call(call("fail"))
        text = embserve.remote_traceback(info.value)
        assert text is not None and "in fail" in text
        with pytest.raises(RemoteError, match="Unrebuildable: odd") as odd:
            await ends.replica.call(call("fail_oddly"))
        assert "fail_oddly" in (embserve.remote_traceback(odd.value) or "")
        with pytest.raises(RemoteError, match="RuntimeError: holds a lock"):
            await ends.replica.call(call("fail_unpicklably"))


async def test_unpicklable_results_and_arguments_fail_their_call_only(connect: Connect) -> None:
    async with connect() as ends:
        with pytest.raises(TypeError, match="generator"):
            await ends.replica.call(call("generator_object"))
        with pytest.raises(TypeError, match="lock"):
            await ends.replica.call(call("add", threading.Lock(), 1))
        assert await ends.replica.call(call("add", 1, 1)) == 2  # the replica is fine


async def test_numpy_buffers_travel_out_of_band(connect: Connect) -> None:
    async with connect() as ends:
        to_replica, to_caller = spy(ends.caller_end), spy(ends.replica_end)
        array = np.arange(1_048_576, dtype=np.float64)  # 8 MiB
        result = await ends.replica.call(call("array", array))
        np.testing.assert_array_equal(result, array + 1)
        assert result.flags.writeable and array[0] == 0  # the caller's array was not touched
        for kind, frames in (to_replica[-1], to_caller[-1]):
            assert kind in (CALL, OK)
            assert len(frames) == 2 and memoryview(frames[1]).nbytes == array.nbytes
            assert memoryview(frames[0]).nbytes < 1024  # the pickle holds no array data


async def test_small_arrays_travel_inside_the_pickle_and_arrive_writable(connect: Connect) -> None:
    async with connect() as ends:
        to_replica, to_caller = spy(ends.caller_end), spy(ends.replica_end)
        array = np.arange(512, dtype=np.float32)  # 2 KiB: a frame of its own costs more
        result = await ends.replica.call(call("array", array))
        np.testing.assert_array_equal(result, array + 1)
        assert result.flags.writeable
        for kind, frames in (to_replica[-1], to_caller[-1]):
            assert kind in (CALL, OK)
            assert len(frames) == 1


# -- the fast send path --------------------------------------------------------------------


async def test_the_send_path_settles_the_callers_future(connect: Connect) -> None:
    async with connect() as ends:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        assert ends.replica.send(call("add", 20, 22), future) is not None
        assert await future == 42
        failing = loop.create_future()
        assert ends.replica.send(call("fail"), failing) is not None
        with pytest.raises(Boom):
            await failing
        unsendable = loop.create_future()
        assert ends.replica.send(call("add", threading.Lock(), 1), unsendable) is None
        assert not unsendable.done()


async def test_withdrawing_a_sent_call_cancels_it(connect: Connect) -> None:
    async with connect() as ends:
        future = asyncio.get_running_loop().create_future()
        withdraw = ends.replica.send(call("slow"), future)
        assert withdraw is not None
        await eventually(state.started.is_set)
        withdraw()
        await eventually(lambda: state.cancelled == 1)
        assert not future.done()  # the caller that withdrew it cancels it itself
        await eventually(lambda: not ends.replica._pending.calls)  # type: ignore[union-attr]


# -- notices -------------------------------------------------------------------------------


async def test_notices_from_the_replica_side_reach_the_callers_hook(connect: Connect) -> None:
    async with connect() as ends:
        # Ignored by default: the replica goes on serving.
        ends.replica_loop.call_soon_threadsafe(ends.server.notify, "unheard")
        assert await ends.replica.call(call("add", 1, 1)) == 2
        notices: list[object] = []
        ends.replica.on_notice = notices.append  # type: ignore[method-assign,assignment]
        for notice in ({"draining": True}, "second"):
            ends.replica_loop.call_soon_threadsafe(ends.server.notify, notice)
        await eventually(lambda: len(notices) == 2)
        assert notices == [{"draining": True}, "second"]  # in order, as values
        assert await ends.replica.call(call("add", 2, 2)) == 4
