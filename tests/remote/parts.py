"""What the remote-protocol tests share: user code, a stand-in runtime, and helpers.

Both ends run in this process, so user code tells the test what happened through ``state``
(module globals, thread-safe enough) and no worker process is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np

import embserve
from embserve._remote import (
    RemoteReplica,
    ReplicaServer,
    Transport,
)
from embserve._remote.codec import Frame
from embserve.handle import Response, ResponseStream, start_call
from embserve.request import Request

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
        self.reset()

    def reset(self) -> None:
        """Forget what the last test was told."""
        self.produced = 0
        self.taken = 0
        self.most_ahead = 0
        self.cancelled = 0
        self.closed_streams = 0
        self.started = threading.Event()
        self.release = threading.Event()


state = State()


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

    def context(self) -> tuple[str, str | None, str, Any, tuple[str, ...]]:
        request = embserve.get_request_context()
        replica = embserve.get_replica_context()
        where = replica.extra["where"]
        return request.request_id, request.routing_key, replica.worker, where, replica.gpu_ids

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


async def comm_pair(address: str) -> tuple[Any, Any]:
    """Both ends of one ``distributed.comm`` connection, handshakes done, on the running loop:
    the one that connected to a listener on ``address``, and the one it accepted."""
    from distributed.comm import core as comm_core

    listen: Any = comm_core.listen
    connect: Any = comm_core.connect
    accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def on_comm(comm: Any) -> None:
        accepted.set_result(comm)

    listener = listen(address, on_comm, deserialize=True)
    await listener.start()
    try:
        connected = await connect(listener.contact_address, timeout=10)
        return connected, await asyncio.wait_for(accepted, 10)
    finally:
        listener.stop()
