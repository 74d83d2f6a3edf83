"""The remote-replica protocol (embserve._remote), the same contract over every transport.

Each test runs a caller (RemoteReplica) against a replica server (ReplicaServer) over an
in-memory pair on one loop, an in-memory pair across two loops in two threads, and a real
socket pair. Both ends are in this process, so user code shares state with the test (module
globals, thread-safe) and no worker process is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest

import embserve
from embserve._loop import LoopThread
from embserve._remote import (
    STREAM_WINDOW,
    RemoteReplica,
    ReplicaServer,
    SocketTransport,
    Transport,
    encode_start,
    memory_pair,
)
from embserve._remote.codec import Frame
from embserve._remote.messages import CALL, OK
from embserve.context import ReplicaContext
from embserve.deployment import DeploymentConfig
from embserve.handle import Response, ResponseStream, start_call
from embserve.replica import ReplicaSpec
from embserve.request import Request
from embserve.router import PowerOfTwoChoicesRouter
from embserve.wire import RemoteError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

RUNTIME_ID = "remote-contract-tests"


class Boom(ValueError):
    """A user exception that must keep its type."""


class Unrebuildable(Exception):
    """Pickles, but cannot be rebuilt from its args on the other side."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class State:
    """What user code tells the test; shared by both ends (one process), thread-safe enough."""

    def __init__(self) -> None:
        self.produced = 0
        self.taken = 0
        self.most_ahead = 0
        self.cancelled = 0
        self.closed_streams = 0
        self.started = threading.Event()
        self.release = threading.Event()


state = State()


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[None]:
    global state
    state = State()
    yield
    state.release.set()  # no thread of a test stays blocked in user code


class Model:
    """User code that exercises the protocol."""

    def __init__(self, other: embserve.Handle | None = None) -> None:
        self.other = other
        self.scale = 1

    def reconfigure(self, config: dict[str, int]) -> None:
        self.scale = config["scale"]

    async def __call__(self, x: int) -> int:
        return x * self.scale

    def add(self, a: int, b: int) -> int:
        return a + b

    def fail(self) -> None:
        raise Boom("bad input")

    def fail_oddly(self) -> None:
        raise Unrebuildable("odd", 7)

    def fail_unpicklably(self) -> None:
        error = RuntimeError("holds a lock")
        error.lock = threading.Lock()
        raise error

    def generator_object(self) -> Any:
        return (i for i in range(3))  # a generator cannot be pickled at all

    def array(self, a: np.ndarray) -> np.ndarray:
        a += 1  # arrays arrive writable, in memory of their own
        return a

    def context(self) -> tuple[str, str | None, str, Any]:
        request = embserve.get_request_context()
        replica = embserve.get_replica_context()
        return request.request_id, request.routing_key, replica.worker, replica.extra["where"]

    async def count(self, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                state.produced = i + 1
                state.most_ahead = max(state.most_ahead, state.produced - state.taken)
                yield i
        finally:
            state.closed_streams += 1

    def count_sync(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def slow(self) -> None:
        state.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state.cancelled += 1
            raise

    def blocked(self) -> str:
        state.started.set()
        state.release.wait(20)
        return "released"

    async def via_handle(self, x: int) -> Any:
        assert self.other is not None
        return await self.other.remote(x)

    def via_handle_sync(self, x: int) -> Any:
        assert self.other is not None
        return self.other.remote(x).result(timeout_s=10)

    async def via_handle_stream(self, n: int) -> list[int]:
        assert self.other is not None
        return [i async for i in self.other.options(stream=True).remote(n)]

    async def via_handle_failing(self) -> str:
        assert self.other is not None
        try:
            await self.other.fail.remote()
        except Boom as exc:
            return f"caught {exc}"
        return "not raised"

    async def via_handle_stream_first(self, n: int) -> int:
        assert self.other is not None
        stream = self.other.options(stream=True).remote(n)
        async for first in stream:
            for _ in range(200):  # chances for the runtime's stream to overrun its window
                await asyncio.sleep(0)
            stream.cancel()
            return int(first)
        return -1

    async def via_handle_blocked(self) -> Any:
        assert self.other is not None
        state.started.set()
        return await self.other.block.remote()


class Healthy:
    """A deployment whose health check fails on demand."""

    sick = False

    def check_health(self) -> None:
        if Healthy.sick:
            raise RuntimeError("sick")


class Broken:
    """Fails in its constructor."""

    def __init__(self) -> None:
        raise RuntimeError("no weights here")


class FakeRuntime:
    """The caller's runtime, as far as the replica's handle calls see it."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.cancelled = threading.Event()
        self.produced = 0
        self.stream_closed = threading.Event()

    def submit(self, request: Request) -> Response | ResponseStream:
        self.requests.append(request)
        loop = asyncio.get_running_loop()
        if request.stream:
            return ResponseStream(lambda: self._items(request.args[0]), loop)
        return start_call(loop, self._call(request))

    async def _call(self, request: Request) -> Any:
        if request.method == "fail":
            raise Boom("from the runtime")
        if request.method == "block":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return ("served", request.args[0])

    async def _items(self, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                self.produced = i + 1
                yield i
        finally:
            self.stream_closed.set()


# -- the pair of ends under test -----------------------------------------------------------


class Ends:
    """A caller and a replica server, connected, the server running."""

    def __init__(self, replica: RemoteReplica, server: ReplicaServer, info: Any) -> None:
        self.replica = replica
        self.server = server
        self.info = info
        self.caller_end: Transport
        self.replica_end: Transport
        self.replica_loop: asyncio.AbstractEventLoop


Connect = Callable[..., contextlib.AbstractAsyncContextManager[Ends]]


@pytest.fixture(params=["memory", "memory-threads", "socket"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """Connects a RemoteReplica of ``target`` to a ReplicaServer over the transport under test."""
    kind = request.param
    thread = LoopThread("replica-loop") if kind == "memory-threads" else None

    @contextlib.asynccontextmanager
    async def connected(
        target: Any = Model,
        *args: Any,
        submitter: FakeRuntime | None = None,
        **options: Any,
    ) -> AsyncIterator[Ends]:
        loop = asyncio.get_running_loop()
        replica_loop = thread.loop if thread is not None else loop
        caller_end: Transport
        replica_end: Transport
        if kind == "socket":
            here, there = socket.socketpair()
            caller_end, replica_end = SocketTransport(here), SocketTransport(there)
        else:
            caller_end, replica_end = memory_pair(loop, replica_loop)
        spec = ReplicaSpec(
            "model",
            "model#1",
            target,
            args,
            {},
            DeploymentConfig(max_ongoing_requests=8, **options),
            runtime_id=RUNTIME_ID,
        )
        server = ReplicaServer(replica_end, worker="test-worker", info={"where": "here"})
        serving: Awaitable[None]
        if thread is not None:
            serving = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(server.serve(), replica_loop)
            )
        else:
            serving = asyncio.ensure_future(server.serve())
        replica = RemoteReplica(spec, submitter=submitter)
        replica.connect(caller_end)
        try:
            info = await replica.begin(encode_start(spec, ReplicaContext("model", "model#1")))
            ends = Ends(replica, server, info)
            ends.caller_end, ends.replica_end = caller_end, replica_end
            ends.replica_loop = replica_loop
            yield ends
        finally:
            await replica.stop()
            replica_loop.call_soon_threadsafe(server.stop)
            await serving

    yield connected
    if thread is not None:
        thread.stop()


async def eventually(probe: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Turn the loop until ``probe()`` is true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s} s")
        await asyncio.sleep(0.001)


def spy(transport: Transport) -> list[tuple[int, list[Frame]]]:
    """Record every message ``transport`` sends, as (kind, frames)."""
    sent: list[tuple[int, list[Frame]]] = []
    send = transport.send

    def recording(kind: int, ident: int, frames: Any = ()) -> None:
        sent.append((kind, list(frames)))
        send(kind, ident, frames)

    transport.send = recording  # type: ignore[method-assign]
    return sent


def call(method: str, *args: Any, **fields: Any) -> Request:
    """A request for ``method`` of the deployment under test."""
    return Request("model", method, args, {}, fields.pop("request_id", "req-1"), **fields)


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
        assert await ends.replica.call(request) == ("abc-123", "user-7", "test-worker", "here")


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


# -- streams -------------------------------------------------------------------------------


async def test_streams_yield_every_item(connect: Connect) -> None:
    async with connect() as ends:
        items = [i async for i in ends.replica.stream(call("count_sync", 5))]
        assert items == [0, 1, 2, 3, 4]
        many = [i async for i in ends.replica.stream(call("count", 1000))]
        assert many == list(range(1000))  # far longer than the window: grants keep it going
        with pytest.raises(TypeError, match="not a generator"):
            async for _ in ends.replica.stream(call("add", 1, 2)):
                pass


async def test_a_fast_generator_stays_within_the_window_of_a_slow_reader(
    connect: Connect,
) -> None:
    async with connect() as ends:
        stream = ends.replica.stream(call("count", 1000))
        items = []
        async for item in stream:
            items.append(item)
            state.taken = len(items)
            if len(items) == 1:
                # The generator runs ahead by the window, and no further, however long we wait.
                await eventually(lambda: state.produced >= STREAM_WINDOW)
                for _ in range(200):  # chances to overrun, were the window not kept
                    await asyncio.sleep(0)
                assert state.produced <= STREAM_WINDOW + 1
            elif len(items) % 7 == 0:
                for _ in range(5):
                    await asyncio.sleep(0)
        assert items == list(range(1000))
        # An item is produced before the generator waits for credit to send it: one more.
        assert state.most_ahead <= STREAM_WINDOW + 1


async def test_closing_a_stream_early_closes_the_generator(connect: Connect) -> None:
    async with connect() as ends:
        stream = ends.replica.stream(call("count", 1_000_000))
        async for item in stream:
            assert item == 0
            break
        await stream.aclose()
        await eventually(lambda: state.closed_streams == 1)
        assert state.produced < 1_000_000
        await eventually(lambda: not ends.replica._pending.held)  # type: ignore[union-attr]


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


# -- handles called inside the replica -----------------------------------------------------


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
