"""The runtime's side of one replica in a worker process: spawning it, talking to it, its death.

Workers are started with the ``spawn`` method (a fresh interpreter: no fork of a threaded
process), receive their deployment pickled with cloudpickle, and talk to the runtime over one
socket pair each (see :mod:`embserve_process._channel`). A worker that dies is noticed when its
channel closes or its process sentinel becomes readable, both watched by the runtime's event loop,
so nothing polls on the request path.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from embserve.context import ReplicaContext
from embserve.errors import DeploymentFailedError, EmbserveError, ReplicaDiedError
from embserve.handle import find_submitter
from embserve.replica import Replica, ReplicaSpec, ReplicaState
from embserve.request import Request
from embserve.resources import Allocation
from embserve_process._channel import STREAM_WINDOW, Channel, Frame, decode, encode
from embserve_process._worker import Pending, error_payload, load_error, run_worker

if TYPE_CHECKING:
    from embserve_process._backend import ProcessBackend

__all__ = ["ProcessReplica"]

logger = logging.getLogger("embserve.process")

# How long a stopping worker may take to exit before it is killed.
_STOP_TIMEOUT_S = 5.0
# After the channel closes, how long to wait for the process to exit (for its exit code in the
# reason) before it is declared dead anyway and killed.
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


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class ProcessReplica(Replica):
    """The runtime's view of a replica in a worker process."""

    def __init__(
        self,
        spec: ReplicaSpec,
        backend: ProcessBackend,
        allocation: Allocation | None,
    ) -> None:
        super().__init__(spec.replica_id, spec.deployment)
        self._spec = spec
        self._backend = backend
        self._allocation = allocation
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._pending = Pending()
        self._forwards: dict[int, asyncio.Task[Any]] = {}
        self._started: asyncio.Future[int] = self._loop.create_future()
        # A start abandoned (its deployment deleted meanwhile) leaves no one to read its error.
        self._started.add_done_callback(_retrieve)
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._process: Any = None  # multiprocessing's SpawnProcess
        self._channel: Channel | None = None
        self._dead_reason: str | None = None
        self._stopping = False
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
            extra={"resources": dict(self._spec.config.resources)},
        )
        # Pickled before anything starts: a deployment that cannot be sent fails here, whole.
        try:
            spec_frames = encode((self._spec, replica_context), by_value=True)
        except Exception as exc:
            raise DeploymentFailedError(
                f"deployment {self.deployment!r} cannot be sent to a worker process: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
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
        self._channel = Channel(loop, parent_sock, self._on_message, self._on_channel_closed)
        self._channel.send_frames("start", 0, spec_frames)
        try:
            await asyncio.shield(self._started)
        except BaseException:  # the constructor failed, the worker died, or we were cancelled
            await self.stop()
            raise
        self.state = ReplicaState.RUNNING

    # -- requests -------------------------------------------------------------------------

    def _check_alive(self) -> Channel:
        channel = self._channel
        if self._dead_reason is not None or channel is None or channel.closed:
            reason = self._dead_reason or "it is stopped"
            raise ReplicaDiedError(f"replica {self.replica_id} is gone: {reason}", started=False)
        return channel

    async def _request(self, kind: str, payload: Any) -> Any:
        channel = self._check_alive()
        ident = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.calls[ident] = future
        try:
            channel.send(kind, ident, payload)
            if channel.closed:  # this send found the worker gone: the request never left
                if future.done():
                    future.exception()  # retrieved here: the caller gets the error below
                reason = self._dead_reason or "its channel broke"
                raise ReplicaDiedError(
                    f"replica {self.replica_id} is gone: {reason}", started=False
                )
            return await future
        except asyncio.CancelledError:
            # Our own await cancelled the future: only an answer would have made it done.
            if future.cancelled() and not channel.closed:
                channel.send("cancel", ident)
            raise
        finally:
            self._pending.calls.pop(ident, None)

    async def call(self, request: Request) -> Any:
        return await self._request("call", request.to_wire())

    def send(self, request: Request, future: asyncio.Future[Any]) -> Callable[[], None] | None:
        ident = next(self._ids)
        try:
            channel = self._check_alive()
            channel.send("call", ident, request.to_wire())
        except Exception:  # gone, or arguments that cannot be pickled: call() says which
            return None
        if channel.closed:  # this send found the worker gone: the request never left
            return None
        self._pending.calls[ident] = future
        return functools.partial(self._withdraw, ident)

    def _withdraw(self, ident: int) -> None:
        channel = self._channel
        pending = self._pending.calls.pop(ident, None)
        if pending is not None and channel is not None and not channel.closed:
            channel.send("cancel", ident)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        channel = self._check_alive()
        ident = next(self._ids)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._pending.streams[ident] = queue
        finished = False
        taken = 0
        try:
            channel.send("stream", ident, request.to_wire())
            while True:
                kind, value = await queue.get()
                if kind == "item":
                    yield value
                    taken += 1
                    if taken == STREAM_WINDOW // 2 and not channel.closed:
                        channel.send("more", ident, taken)
                        taken = 0
                    continue
                finished = True
                if kind == "end":
                    return
                raise value
        finally:
            del self._pending.streams[ident]
            if not finished and not channel.closed:
                channel.send("cancel", ident)

    async def check_health(self) -> None:
        await self._request("health", None)

    async def reconfigure(self, user_config: Any) -> None:
        await self._request("reconfigure", user_config)

    # -- messages from the worker ---------------------------------------------------------

    def _on_message(self, kind: str, ident: int, frames: list[Frame]) -> None:
        if kind in ("ok", "err", "item", "end"):
            self._pending.answer(kind, ident, frames)
        elif kind in ("submit", "submit_stream"):
            task = self._loop.create_task(self._forward(kind, ident, frames))
            self._forwards[ident] = task
            task.add_done_callback(lambda _: self._forwards.pop(ident, None))
        elif kind == "sub_cancel":
            forward = self._forwards.get(ident)
            if forward is not None:
                forward.cancel()
        elif kind == "started":
            if not self._started.done():
                self._started.set_result(decode(frames))
        elif kind == "start_failed":
            error = load_error(decode(frames))
            if not self._started.done():
                if isinstance(error, DeploymentFailedError):
                    failure = DeploymentFailedError(str(error))
                else:
                    failure = DeploymentFailedError(
                        f"deployment {self.deployment!r} failed to start in its worker: "
                        f"{type(error).__name__}: {error}"
                    )
                self._started.set_exception(failure)

    async def _forward(self, kind: str, ident: int, frames: list[Frame]) -> None:
        # A handle call made inside the worker, run by this runtime like any other call.
        channel = self._channel
        assert channel is not None
        try:
            target, wire = decode(frames)
            request = Request.from_wire(target, wire)
            request.stream = kind == "submit_stream"
            runtime = find_submitter(self._spec.runtime_id)
            if runtime is None:
                raise EmbserveError(f"runtime {self._spec.runtime_id} is not running")
            if kind == "submit":
                result = await runtime.submit(request)
                channel.send("sub_ok", ident, result)
                return
            async for item in runtime.submit(request):
                channel.send("sub_item", ident, item)
            channel.send("sub_end", ident)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            channel.send("sub_err", ident, error_payload(exc))

    # -- death and stopping ---------------------------------------------------------------

    def _on_channel_closed(self, reason: str) -> None:
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
        if self._dead_reason is not None:
            return
        if self._grace is not None:
            self._grace.cancel()
        reason = _exit_reason(self.pid, code)
        self._dead_reason = reason
        if self._channel is not None:
            self._channel.close()
        if self._process is not None and code is None and self._process.exitcode is None:
            self._process.kill()  # the channel is gone: the worker is of no use any more
        died = ReplicaDiedError(f"replica {self.replica_id} died: {reason}", started=True)
        self._pending.fail_all(died)
        for task in self._forwards.values():
            task.cancel()
        if not self._started.done():
            self._started.set_exception(
                DeploymentFailedError(
                    f"deployment {self.deployment!r}: the worker of replica {self.replica_id} "
                    f"died while starting: {reason}"
                )
            )
        elif not self._stopping and self.state is not ReplicaState.STOPPED:
            logger.warning("replica %s died: %s", self.replica_id, reason)
            self._backend.on_replica_died(self, reason)

    async def stop(self) -> None:
        self.state = ReplicaState.STOPPED
        self._stopping = True
        process = self._process
        if process is None:
            self._backend.replica_exited(self)
            return
        channel = self._channel
        if channel is not None and not channel.closed:
            channel.send("stop", 0)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), _STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("worker of replica %s did not stop; killing it", self.replica_id)
            process.kill()
            await asyncio.shield(self._exited)
