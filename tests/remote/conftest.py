"""Fixtures of the remote-protocol tests: a caller and a replica server over each transport.

Every test runs a RemoteReplica against a ReplicaServer over an in-memory pair on one loop, an
in-memory pair across two loops in two threads, a real socket pair, and the Dask backend's comm
transport over an in-process ``distributed.comm`` pair (``inproc://``) and a loopback TCP one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

# Before the user code in tests.remote.parts is defined: importing distributed installs tblib's
# pickling of every exception class that exists then (rebuilding even those whose constructor
# wants other arguments), and the suite's Unrebuildable must stay a class it does not know,
# whichever tests ran in this process before.
import distributed  # noqa: F401
import pytest

from embserve._loop import LoopThread
from embserve._remote import (
    RemoteReplica,
    ReplicaServer,
    SocketTransport,
    Transport,
    encode_start,
    memory_pair,
)
from embserve.context import ReplicaContext
from embserve.deployment import DeploymentConfig
from embserve.replica import ReplicaSpec
from tests.remote.parts import (
    RUNTIME_ID,
    Connect,
    Ends,
    FakeRuntime,
    Model,
    comm_pair,
    state,
)


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[None]:
    """Each test starts with a blank State, and leaves no thread blocked in user code."""
    state.reset()
    yield
    state.release.set()


@pytest.fixture(params=["memory", "memory-threads", "socket", "dask-inproc", "dask-tcp"])
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
        elif kind.startswith("dask-"):
            from embserve_dask._transport import CommTransport

            address = "inproc://" if kind == "dask-inproc" else "tcp://127.0.0.1:0"
            here_comm, there_comm = await comm_pair(address)
            caller_end, replica_end = CommTransport(here_comm), CommTransport(there_comm)
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
        server = ReplicaServer(
            replica_end, worker="test-worker", info={"where": "here"}, gpu_ids=("7",)
        )
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
