"""The replica's own process: a listener, then one comm to the runtime and a server on it.

Started by the replica's Dask task (:mod:`embserve_dask._worker`) with the replica's
``CUDA_VISIBLE_DEVICES`` already in its environment, so no user module is imported before the
devices are chosen. The task sends its settings over a pipe; the process listens on the worker's
host with the worker's security, sends its contact address back, and serves the first runtime
that connects: the core's :class:`~embserve.spi.ReplicaServer` over a
:class:`~embserve_dask._transport.CommTransport`, which gets the spec in ``START`` and unpickles
it only then, here. When the task relays that its worker is closing, the server tells the
runtime in a notice. The process exits when the runtime stops it or its comm closes, when the
task says ``stop``, or when the task's process goes away (the pipe closes, or the worker process
is no longer its parent).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from distributed.comm import core as comm_core

from embserve.spi import ReplicaServer
from embserve_dask._transport import CommTransport

__all__ = ["CONNECT_TIMEOUT_S", "main"]

#: How long a replica waits for its runtime to connect before it gives up and exits.
CONNECT_TIMEOUT_S = 60.0

# How often the process checks that the worker that started it is still its parent, in case
# the pipe outlives it (a forked grandchild holding its end).
_PARENT_CHECK_S = 1.0

# distributed's functions are untyped; they are used through this name.
listen: Any = comm_core.listen


class _Replica:
    """The replica's listener, then its one comm to the runtime and the server on it."""

    def __init__(self, pipe: Connection, parent_pid: int, settings: dict[str, Any]) -> None:
        self.pipe = pipe
        self.parent_pid = parent_pid
        self.settings = settings
        self.server: ReplicaServer | None = None
        self._comm: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._stopped = False
        self._draining: dict[str, bool] | None = None  # the notice, once the worker is closing

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
        timeout = loop.call_later(CONNECT_TIMEOUT_S, self.stop)
        try:
            self.pipe.send(("listening", listener.contact_address))
            comm = await self._comm
            timeout.cancel()
            listener.stop()
            if comm is not None:
                await self._serve(comm)
        finally:
            timeout.cancel()
            check.cancel()
            loop.remove_reader(self.pipe.fileno())
            listener.stop()

    async def _serve(self, comm: Any) -> None:
        settings = self.settings
        info = {
            "worker": settings["worker"],
            "worker_name": settings["worker_name"],
            "pid": os.getpid(),
            "worker_pid": self.parent_pid,
            "gpu_ids": list(settings["gpu_ids"]),
            "worker_resources": settings["worker_resources"],
        }
        self.server = server = ReplicaServer(
            CommTransport(comm),
            worker=settings["worker"],
            info=info,
            gpu_ids=settings["gpu_ids"],
        )
        if self._draining is not None:  # the worker began closing as the runtime connected
            server.notify(self._draining)
        await server.serve()

    async def _on_comm(self, comm: Any) -> None:
        if self._comm.done():  # one runtime, one comm: anything else is a stray
            comm.abort()
            return
        self._comm.set_result(comm)

    def stop(self) -> None:
        """End the replica: stop serving, or stop waiting for the runtime."""
        if self._stopped:
            return
        self._stopped = True
        if self.server is not None:
            self.server.stop()
        elif not self._comm.done():
            self._comm.set_result(None)

    def _check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            self.stop()
        else:
            asyncio.get_running_loop().call_later(_PARENT_CHECK_S, self._check_parent)

    def _on_pipe(self) -> None:
        try:
            message = self.pipe.recv()
        except (EOFError, OSError):  # the task's process is gone
            self.stop()
            return
        if message[0] == "drain":
            self._drain(scheduler_lost=message[1])
        else:  # "stop": the task was cancelled or its worker closed
            self.stop()

    def _drain(self, *, scheduler_lost: bool) -> None:
        if self._draining is not None:
            return
        self._draining = {"draining": True, "scheduler_lost": scheduler_lost}
        if self.server is not None:
            self.server.notify(self._draining)
        elif not self._comm.done():
            # No runtime has connected yet: nothing to drain, so stop waiting for one.
            self.stop()


async def _run(pipe: Connection, parent_pid: int, settings: dict[str, Any]) -> None:
    await _Replica(pipe, parent_pid, settings).main()


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
        loop.run_until_complete(_run(pipe, parent_pid, settings))
    except BaseException:
        code = 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
