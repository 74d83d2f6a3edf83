"""A replica's direct line: a plain thread sends its call and reads the answer itself.

A RemoteReplica and a ReplicaServer over a real socket pair, with a second pair as the line
(``RemoteReplica.connect_line``, ``ReplicaServer.add_line``); the threads that call are real
threads (``asyncio.to_thread``) while the loop that runs both ends stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

import embserve
from embserve._remote import RemoteReplica, ReplicaServer, SocketTransport, encode_start
from embserve._remote.direct import DirectLine
from embserve.context import ReplicaContext
from embserve.deployment import DeploymentConfig
from embserve.replica import ReplicaSpec
from embserve.request import Request
from embserve.response import NOT_HERE
from embserve.wire import RemoteError
from tests.remote.parts import RUNTIME_ID, Boom, Model, call, eventually, state

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@contextlib.asynccontextmanager
async def lined(target: Any = Model) -> AsyncIterator[RemoteReplica]:
    """A started replica of ``target`` with a direct line, both ends on the running loop."""
    here, there = socket.socketpair()
    line_here, line_there = socket.socketpair()
    spec = ReplicaSpec(
        "model", "model#1", target, (), {}, DeploymentConfig(), runtime_id=RUNTIME_ID
    )
    server = ReplicaServer(SocketTransport(there), worker="test-worker", info={"where": "here"})
    server.add_line(SocketTransport(line_there))
    serving = asyncio.ensure_future(server.serve())
    replica = RemoteReplica(spec)
    replica.connect(SocketTransport(here))
    replica.connect_line(line_here)
    try:
        await replica.begin(encode_start(spec, ReplicaContext("model", "model#1")))
        yield replica
    finally:
        state.release.set()
        await replica.stop()
        server.stop()
        await serving


async def in_thread(replica: RemoteReplica, request: Request) -> Any:
    """Serve ``request`` on the line from a thread of its own, as ``call_here`` does."""

    def run() -> Any:
        serve = replica.run_here(request)
        assert serve is not None, "the line was not free"
        return serve()

    return await asyncio.to_thread(run)


async def test_a_thread_gets_results_of_sync_and_async_methods_and_the_request_context() -> None:
    async with lined() as replica:
        assert await in_thread(replica, call("__call__", 4)) == 4
        assert await in_thread(replica, call("add", 2, 3)) == 5
        context = await in_thread(replica, call("context", request_id="abc", routing_key="u7"))
        assert context[:4] == ("abc", "u7", "test-worker", "here")


async def test_errors_keep_their_type_and_the_line_serves_on() -> None:
    async with lined() as replica:
        with pytest.raises(Boom, match="bad input") as info:
            await in_thread(replica, call("fail"))
        text = embserve.remote_traceback(info.value)
        assert text is not None and "in fail" in text
        with pytest.raises(RemoteError, match="Unrebuildable"):
            await in_thread(replica, call("fail_oddly"))
        with pytest.raises(TypeError, match="generator"):  # a result that cannot be pickled
            await in_thread(replica, call("generator_object"))
        with pytest.raises(TypeError):  # an argument that cannot be pickled never leaves
            await in_thread(replica, call("add", threading.Lock(), 1))
        assert await in_thread(replica, call("add", 1, 1)) == 2


async def test_large_arrays_cross_both_ways_in_frames_of_their_own() -> None:
    async with lined() as replica:
        for size in (10, 100_000, 1_000_000):  # one read; buffers; many reads per frame
            array = np.arange(size, dtype=np.float64)
            result = await in_thread(replica, call("array", array))
            np.testing.assert_array_equal(result, array + 1)
            assert result.flags.writeable


async def blocked_on_the_line(replica: RemoteReplica) -> asyncio.Future[Any]:
    """A thread's call on the line, running in user code that waits for ``state.release``."""
    serve = replica.run_here(call("blocked"))
    assert serve is not None
    running = asyncio.ensure_future(asyncio.to_thread(serve))
    await asyncio.to_thread(state.started.wait, 10)
    return running


async def test_one_call_at_a_time_a_second_thread_is_told_to_go_elsewhere() -> None:
    async with lined() as replica:
        running = await blocked_on_the_line(replica)
        assert replica.run_here(call("add", 1, 2)) is None  # taken: through the loop instead
        assert await replica.call(call("add", 1, 2)) == 3  # which still serves
        state.release.set()
        assert await running == "released"
        assert await in_thread(replica, call("add", 1, 2)) == 3  # given back


async def test_a_thread_blocked_on_a_lost_replica_gets_its_error_at_once() -> None:
    async with lined() as replica:
        running = await blocked_on_the_line(replica)
        replica.lose("its worker was killed")
        with pytest.raises(embserve.ReplicaDiedError, match="its worker was killed") as info:
            await asyncio.wait_for(running, 10)
        assert info.value.started is True
        assert replica.run_here(call("add", 1, 2)) is None  # closed: the loop's path says why


async def test_the_other_end_closing_fails_the_call_as_started() -> None:
    here, there = socket.socketpair()
    line = DirectLine(here, _gone)
    assert line.claim()
    thread_error: list[BaseException] = []

    def run() -> None:
        try:
            line.call(call("add", 1, 2))
        except BaseException as exc:
            thread_error.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert there.recv(65536)  # the call arrived; the other end dies without answering
    there.close()
    thread.join(10)
    assert len(thread_error) == 1 and isinstance(thread_error[0], embserve.ReplicaDiedError)
    assert not line.claim()


async def test_a_call_that_cannot_be_sent_is_left_to_the_loop() -> None:
    here, there = socket.socketpair()
    line = DirectLine(here, _gone)
    there.close()  # the replica's end is gone before the call
    assert line.claim()
    assert line.call(call("add", 1, 2)) is NOT_HERE  # never left: the loop may send it on
    assert not line.claim()


def test_a_thread_interrupted_while_its_answer_is_due_closes_the_line() -> None:
    """Ctrl-C in a script blocked in ``.result()``: the line closes (its replica's side sees it
    end and cancels the call); later calls go through the loop instead of reading an answer
    out of step."""
    here, there = socket.socketpair()
    line = DirectLine(here, _gone)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        assert line.claim()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            line.call(call("add", 1, 2))  # the other end reads it and never answers
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert line.closed and not line.claim()
    there.settimeout(10)
    assert there.recv(65536)  # the call, sent before the interrupt
    assert there.recv(65536) == b""  # then the end of the line


async def test_no_line_means_no_direct_calls() -> None:
    here, there = socket.socketpair()
    spec = ReplicaSpec("model", "model#1", Model, (), {}, DeploymentConfig())
    server = ReplicaServer(SocketTransport(there))
    serving = asyncio.ensure_future(server.serve())
    replica = RemoteReplica(spec)
    replica.connect(SocketTransport(here))
    try:
        await replica.begin(encode_start(spec, ReplicaContext("model", "model#1")))
        assert replica.run_here(call("add", 1, 2)) is None
        await eventually(lambda: server.host is not None)
    finally:
        await replica.stop()
        server.stop()
        await serving


def _gone(started: bool) -> BaseException:
    return embserve.ReplicaDiedError("the line's replica is gone", started=started)
