"""The replica's own process: a listener, one comm to the runtime, one :class:`ReplicaHost`.

Started by the replica's Dask task (:mod:`embserve_dask._worker`) with the replica's
``CUDA_VISIBLE_DEVICES`` already in its environment, so no user module is imported before the
devices are chosen. The task sends its settings and the pickled spec over a pipe; the process
listens on the worker's host with the worker's security, sends its contact address back, and
from then on the runtime talks to it directly. It exits when the runtime's comm closes, when the
task says ``stop``, or when the task's process goes away (the pipe closes, or the worker process
is no longer its parent).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
import traceback
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

from distributed.comm import core as comm_core

from embserve import handle as handle_module
from embserve._host import ReplicaHost
from embserve.context import ReplicaContext
from embserve.handle import Response, ResponseStream, resolve_responses, start_call
from embserve.replica import ReplicaSpec
from embserve.request import Request
from embserve_dask._protocol import Peer

__all__ = ["CONNECT_TIMEOUT_S", "main"]

#: How long a replica waits for its runtime to connect before it gives up and exits.
CONNECT_TIMEOUT_S = 60.0

# How often the process checks that the worker that started it is still its parent, in case
# the pipe outlives it (a forked grandchild holding its end).
_PARENT_CHECK_S = 1.0

# distributed's functions are untyped; they are used through this name.
listen: Any = comm_core.listen


class _ReplicaServer:
    """The replica's listener, its comm to the runtime, and its host."""

    def __init__(self, pipe: Connection, parent_pid: int, settings: dict[str, Any]) -> None:
        self.pipe = pipe
        self.parent_pid = parent_pid
        self.settings = settings
        self.replica_id: str = settings["replica_id"]
        self.host: ReplicaHost | None = None
        self.peer: Peer | None = None
        self._stop = asyncio.Event()
        self._draining = False

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._on_pipe)
        check = loop.call_later(_PARENT_CHECK_S, self._check_parent)
        security = self.settings["security"]
        listener = listen(
            self.settings["listen"],
            self._on_comm,
            deserialize=True,
            **security.get_listen_args("worker"),
        )
        await listener.start()
        timeout = loop.call_later(CONNECT_TIMEOUT_S, self._give_up_waiting)
        try:
            self.pipe.send(("listening", listener.contact_address))
            await self._stop.wait()
        finally:
            timeout.cancel()
            check.cancel()
            loop.remove_reader(self.pipe.fileno())
            listener.stop()
            self._close_host()
            if self.peer is not None:
                self.peer.abort("its replica process stopped")

    def _give_up_waiting(self) -> None:
        if self.peer is None:
            self._stop.set()

    def _check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            self._stop.set()
        else:
            asyncio.get_running_loop().call_later(_PARENT_CHECK_S, self._check_parent)

    def _on_pipe(self) -> None:
        try:
            message = self.pipe.recv()
        except (EOFError, OSError):  # the task's process is gone
            self._stop.set()
            return
        if message[0] == "drain":
            self._drain(scheduler_lost=message[1])
        else:  # "stop": the task was cancelled or its worker closed
            self._stop.set()

    def _drain(self, *, scheduler_lost: bool) -> None:
        if self._draining:
            return
        self._draining = True
        if self.peer is not None:
            self.peer.notify("draining", {"scheduler_lost": scheduler_lost})
        else:
            # No runtime has connected yet: nothing to drain, so stop waiting for one.
            self._stop.set()

    async def _on_comm(self, comm: Any) -> None:
        if self.peer is not None:  # one runtime, one comm: anything else is a stray
            comm.abort()
            return
        self.peer = Peer(comm, self._serve, self._serve_stream, name="the runtime")
        try:
            await self.peer.run()
        finally:
            self._stop.set()

    # -- requests from the runtime --------------------------------------------------------

    async def _serve(self, op: str, value: Any) -> Any:
        host = self.host
        if op == "call":
            assert host is not None
            return await host.call(Request.from_wire(host.spec.deployment, value))
        if op == "start":
            return await self._start()
        if op == "health":
            assert host is not None
            await host.check_health()
            return None
        if op == "reconfigure":
            assert host is not None
            await host.reconfigure(value)
            return None
        if op in ("stop", "exit"):
            self._close_host()
            return None
        raise ValueError(f"unknown request {op!r}")

    def _serve_stream(self, op: str, value: Any) -> AsyncIterator[Any]:
        assert self.host is not None and op == "stream"
        return self.host.stream(Request.from_wire(self.host.spec.deployment, value))

    async def _start(self) -> dict[str, Any]:
        # Unpickled only now, so that a deployment whose code cannot be imported here fails its
        # start request with the import error, as a failing constructor does.
        spec = pickle.loads(self.settings.pop("spec"))
        assert isinstance(spec, ReplicaSpec)
        settings = self.settings
        gpu_ids = tuple(settings["gpu_ids"])
        info = {
            "worker": settings["worker"],
            "worker_name": settings["worker_name"],
            "pid": os.getpid(),
            "worker_pid": self.parent_pid,
            "gpu_ids": list(gpu_ids),
            "resources": dict(spec.config.resources),
            "worker_resources": settings["worker_resources"],
        }
        context = ReplicaContext(
            spec.deployment,
            spec.replica_id,
            gpu_ids=gpu_ids,
            worker=settings["worker"],
            extra=info,
        )
        assert self.peer is not None
        if spec.runtime_id:
            proxy = _RuntimeProxy(self.peer, asyncio.get_running_loop())
            handle_module.register_submitter(spec.runtime_id, proxy)
        self.host = ReplicaHost(spec, context)
        await self.host.start()
        return info

    def _close_host(self) -> None:
        host, self.host = self.host, None
        if host is not None:
            host.close()


class _RuntimeProxy:
    """Handles unpickled in a replica call their runtime through this, over its comm."""

    def __init__(self, peer: Peer, loop: asyncio.AbstractEventLoop) -> None:
        self.peer = peer
        self.loop = loop

    def submit(self, request: Request) -> Response | ResponseStream:
        if request.stream:
            return ResponseStream(lambda: self._stream(request), self.loop)
        return start_call(self.loop, self._submit(request))

    async def _submit(self, request: Request) -> Any:
        request.args, request.kwargs = await resolve_responses(request.args, request.kwargs)
        return await self.peer.request("submit", (request.target, request.to_wire()))

    async def _stream(self, request: Request) -> AsyncIterator[Any]:
        request.args, request.kwargs = await resolve_responses(request.args, request.kwargs)
        async for item in self.peer.stream("submit_stream", (request.target, request.to_wire())):
            yield item


def main() -> None:
    """The process's entry point: ``argv`` holds the pipe's file descriptor and the parent pid."""
    fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    # Ctrl-C in a terminal reaches the whole process group; the worker decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe = Connection(fd)
    code = 0
    # Not asyncio.run: its clean-up waits for executor threads, and a thread stuck in user code
    # must not keep a stopped replica's process alive.
    loop = asyncio.new_event_loop()
    try:
        sys_path, settings = pipe.recv()
        # The worker's own path (upload_file, its local directory): user code resolves as there.
        sys.path[:] = sys_path
        loop.run_until_complete(_ReplicaServer(pipe, parent_pid, settings).main())
    except BaseException:
        code = 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
