"""Requests leave no reference cycles behind, from every way in, at both ends of the
remote-replica protocol.

An object in a cycle is freed only by the garbage collector, whose passes over the young
objects then grow with the requests in flight: at 64 callers they cost more than the rest of
the serving layer (3 us a request from another loop). What each request makes must go when
its last reference does. The check: serve requests with the collector off and keeping all it
finds (``gc.DEBUG_SAVEALL``), then collect and count what was garbage.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

import embserve
from embserve import Runtime
from embserve._remote import RemoteReplica, ReplicaServer, SocketTransport, encode_start
from embserve.context import ReplicaContext
from embserve.deployment import DeploymentConfig
from embserve.replica import ReplicaSpec
from embserve.request import Request

REQUESTS = 100


@embserve.deployment(max_ongoing_requests=64)
class Plain:
    async def __call__(self, x: int) -> int:
        return x + 1


@embserve.deployment(max_ongoing_requests=64)
def plain_sync(x: int) -> int:
    return x + 1


@embserve.deployment(max_ongoing_requests=64)
class Batched:
    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=0.001)
    async def __call__(self, xs: list[int]) -> list[int]:
        return [x + 1 for x in xs]


@embserve.deployment(max_ongoing_requests=64)
class BatchedSync:
    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=0.001)
    def __call__(self, xs: list[int]) -> list[int]:
        return [x + 1 for x in xs]


KINDS = {"async": Plain, "sync": plain_sync, "batched": Batched, "batched_sync": BatchedSync}


@pytest.fixture(scope="module")
def handles() -> Iterator[tuple[Runtime, dict[str, embserve.Handle]]]:
    with Runtime() as runtime:
        yield runtime, {k: runtime.run(d.bind(), name=f"g-{k}") for k, d in KINDS.items()}


class OtherLoop:
    """An event loop in a thread of its own, not the runtime's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def saved_garbage() -> Iterator[list[object]]:
    """Inside, the collector is off; on the way out it collects, keeping all it finds
    (``gc.DEBUG_SAVEALL``) in the list this yields."""
    found: list[object] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()


def garbage_of(serve: Callable[[], None]) -> list[object]:
    """What ``serve()`` left for the garbage collector (run once before, to warm up)."""
    serve()
    with saved_garbage() as found:
        serve()
    return found


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("place", ["loop", "other_loop", "thread"])
def test_a_request_leaves_nothing_for_the_garbage_collector(
    handles: tuple[Runtime, dict[str, embserve.Handle]], place: str, kind: str
) -> None:
    runtime, by_kind = handles
    handle = by_kind[kind]
    loop = runtime.loop
    assert loop is not None

    async def burst() -> None:  # requests in flight together, as under load
        results = await asyncio.gather(*(handle.remote(i) for i in range(REQUESTS)))
        assert results == [i + 1 for i in range(REQUESTS)]

    other = OtherLoop()
    try:
        if place == "loop":

            def serve() -> None:
                asyncio.run_coroutine_threadsafe(burst(), loop).result(30)

        elif place == "other_loop":

            def serve() -> None:
                asyncio.run_coroutine_threadsafe(burst(), other.loop).result(30)

        else:

            def serve() -> None:
                responses = [handle.remote(i) for i in range(REQUESTS)]
                assert [r.result(timeout_s=30) for r in responses] == [
                    i + 1 for i in range(REQUESTS)
                ]

        garbage = garbage_of(serve)
    finally:
        other.close()
    kinds = collections.Counter(type(o).__name__ for o in garbage).most_common(8)
    # None is expected; a few allow for whatever else the process did meanwhile. Each cycle
    # per request would leave REQUESTS times its size.
    assert len(garbage) < REQUESTS // 4, f"{len(garbage)} objects in cycles: {kinds}"


class RemoteModel:
    """User code for a replica reached over the remote-replica protocol."""

    async def __call__(self, x: int) -> int:
        return x + 1

    def add(self, x: int) -> int:
        return x + 1

    @embserve.batch(max_batch_size=8, batch_wait_timeout_s=0.001)
    async def batched(self, xs: list[int]) -> list[int]:
        return [x + 1 for x in xs]

    async def count(self, x: int) -> AsyncIterator[int]:
        yield x + 1


@pytest.mark.parametrize("method", ["__call__", "add", "batched", "count"])
def test_a_remote_request_leaves_nothing_for_the_garbage_collector_at_either_end(
    method: str,
) -> None:
    # Both ends of the protocol in this process (over a socket pair), so that the replica
    # server's side is looked at too: what a process or Dask worker runs.
    async def main() -> list[object]:
        here, there = socket.socketpair()
        spec = ReplicaSpec(
            "model", "model#1", RemoteModel, (), {}, DeploymentConfig(max_ongoing_requests=64)
        )
        server = ReplicaServer(SocketTransport(there), worker="w", info={}, gpu_ids=())
        serving = asyncio.ensure_future(server.serve())
        replica = RemoteReplica(spec)
        replica.connect(SocketTransport(here))
        await replica.begin(encode_start(spec, ReplicaContext("model", "model#1")))
        loop = asyncio.get_running_loop()

        async def one(i: int) -> int:
            if method == "count":
                request = Request("model", method, (i,), stream=True)
                (item,) = [x async for x in replica.stream(request)]
                return item  # type: ignore[no-any-return]
            request = Request("model", method, (i,))
            future: asyncio.Future[int] = loop.create_future()
            if replica.send(request, future) is None:
                return await replica.call(request)  # type: ignore[no-any-return]
            return await future

        async def burst() -> None:
            assert await asyncio.gather(*(one(i) for i in range(REQUESTS))) == [
                i + 1 for i in range(REQUESTS)
            ]

        try:
            await burst()
            with saved_garbage() as found:
                await burst()
            return found
        finally:
            await replica.stop()
            server.stop()
            await serving

    garbage = asyncio.run(main())
    kinds = collections.Counter(type(o).__name__ for o in garbage).most_common(8)
    assert len(garbage) < REQUESTS // 4, f"{len(garbage)} objects in cycles: {kinds}"
