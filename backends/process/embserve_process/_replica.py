"""The runtime's side of one replica in a worker process: spawning it, its death, stopping it.

Everything said over the connection is the core's remote-replica protocol
(:class:`~embserve._remote.RemoteReplica` over a :class:`~embserve._remote.SocketTransport`);
what is the process backend's own is here. Workers are started with the ``spawn`` method (a
fresh interpreter: no fork of a threaded process) and talk to the runtime over one socket pair
each. A worker that dies is noticed when its connection closes or its process sentinel becomes
readable, both watched by the runtime's event loop, so nothing polls on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from embserve.context import ReplicaContext
from embserve.replica import ReplicaSpec, ReplicaState
from embserve.resources import Allocation
from embserve.spi import RemoteReplica, SocketTransport, encode_start
from embserve_process._worker import run_worker

if TYPE_CHECKING:
    from embserve_process._backend import ProcessBackend

__all__ = ["ProcessReplica"]

logger = logging.getLogger("embserve.process")

# How long a stopping worker may take to exit before it is killed.
_STOP_TIMEOUT_S = 5.0
# After the connection closes, how long to wait for the process to exit (for its exit code in
# the reason) before it is declared dead anyway and killed.
_EXIT_GRACE_S = 0.25


def _exit_reason(pid: int, code: int | None) -> str:
    if code is None:
        return f"its worker process (pid {pid}) closed its connection"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"its worker process (pid {pid}) was killed by {name}"
    return f"its worker process (pid {pid}) exited with code {code}"


class ProcessReplica(RemoteReplica):
    """The runtime's view of a replica in a worker process."""

    def __init__(
        self,
        spec: ReplicaSpec,
        backend: ProcessBackend,
        allocation: Allocation | None,
    ) -> None:
        super().__init__(spec)
        self._backend = backend
        self._allocation = allocation
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._process: Any = None  # multiprocessing's SpawnProcess
        self._grace: asyncio.TimerHandle | None = None
        self.pid = 0

    @property
    def gpu_ids(self) -> tuple[str, ...]:
        """The GPUs this replica holds."""
        return self._allocation.gpu_ids if self._allocation else ()

    @property
    def info(self) -> Mapping[str, Any]:
        info: dict[str, Any] = {"worker": f"pid {self.pid}", "pid": self.pid}
        if self._allocation is not None:
            info["resources"] = dict(self._allocation.demand)
            info["gpu_ids"] = list(self._allocation.gpu_ids)
        return info

    # -- starting -------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the worker, send it the spec, and wait until the user object is built."""
        loop = self._loop
        replica_context = ReplicaContext(
            self.deployment,
            self.replica_id,
            gpu_ids=self.gpu_ids,
            extra={"resources": dict(self.spec.config.resources)},
        )
        # Pickled before anything starts: a deployment that cannot be sent fails here, whole.
        start_frames = encode_start(self.spec, replica_context)
        parent_sock, child_sock = socket.socketpair()
        gpu_env = None
        if self._backend.pool is not None and self._backend.pool.gpu_ids:
            # A replica that holds no GPU sees none, so it cannot take memory on one by accident.
            gpu_env = ",".join(self.gpu_ids)
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=run_worker,
            args=(child_sock, gpu_env, os.getpid(), self._backend.busy_poll_s),
            name=f"embserve-{self.replica_id}",
        )
        try:
            # Spawning writes the preparation data to the child: off the loop.
            await loop.run_in_executor(None, process.start)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        # We reap our workers ourselves; left in multiprocessing's list, its exit handler would
        # join them before the runtime's exit handler stopped them, and wait forever.
        multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
        self._process = process
        self.pid = process.pid or 0
        loop.add_reader(process.sentinel, self._on_exit)
        self.connect(SocketTransport(parent_sock, loop))
        try:
            await self.begin(start_frames)
        except BaseException:  # the constructor failed, the worker died, or we were cancelled
            await self.stop()
            raise

    # -- death and stopping ---------------------------------------------------------------

    def connection_lost(self, reason: str) -> None:
        # The exit code makes a better reason; it is normally there within microseconds.
        code = None if self._process is None else self._process.exitcode
        if code is None:
            self._grace = self._loop.call_later(_EXIT_GRACE_S, self._lost, None)
        else:
            self._lost(code)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._process.sentinel)
        self._reap()

    def _reap(self) -> None:
        # The sentinel closes a moment before the process can be reaped: try again shortly.
        process = self._process
        process.join(0)
        if process.exitcode is None:
            self._loop.call_later(0.01, self._reap)
        else:
            self._exit_done()

    def _exit_done(self) -> None:
        self._lost(self._process.exitcode)
        self._backend.replica_exited(self)
        if not self._exited.done():
            self._exited.set_result(None)

    def _lost(self, code: int | None) -> None:
        if self.dead_reason is not None:
            return
        if self._grace is not None:
            self._grace.cancel()
        if self._process is not None and code is None and self._process.exitcode is None:
            self._process.kill()  # the connection is gone: the worker is of no use any more
        self.lose(_exit_reason(self.pid, code))

    def died(self, reason: str) -> None:
        logger.warning("replica %s died: %s", self.replica_id, reason)
        self._backend.on_replica_died(self, reason)

    async def stop(self) -> None:
        self.state = ReplicaState.STOPPED
        self.stopping = True
        process = self._process
        if process is None:
            self._backend.replica_exited(self)
            return
        self.send_stop()
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), _STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("worker of replica %s did not stop; killing it", self.replica_id)
            process.kill()
            await asyncio.shield(self._exited)
