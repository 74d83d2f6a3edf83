"""The runtime's view of a replica that runs in a Dask task: one comm, straight to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from embserve import handle as handle_module
from embserve.errors import ReplicaDiedError
from embserve.replica import Replica, ReplicaSpec, ReplicaState
from embserve.request import Request
from embserve_dask._protocol import Peer

__all__ = ["DaskReplica"]

logger = logging.getLogger("embserve.dask")


class DaskReplica(Replica):
    """A replica hosted by a long-running task on a Dask worker.

    Calls are one message each way over a ``distributed.comm`` to the replica; the scheduler is
    not on the request path, so replicas keep serving while it is unreachable. The backend tells
    the replica when Dask reports its worker gone (:meth:`lost`).
    """

    def __init__(
        self,
        spec: ReplicaSpec,
        peer: Peer,
        info: Mapping[str, Any],
        future: Any,
        on_gone: Callable[[DaskReplica, str, bool], None],
        reader: asyncio.Task[None],
    ) -> None:
        super().__init__(spec.replica_id, spec.deployment)
        self.spec = spec
        self.peer = peer
        self.worker: str = info["worker"]
        self.future = future
        self._info = dict(info)
        self._on_gone = on_gone
        self._graceful = spec.config.graceful_shutdown_timeout_s
        self._reader = reader
        self._stopping = False
        self.gone = False
        self.draining = False
        peer.serve = self.answer
        peer.serve_stream = self.answer_stream
        self.state = ReplicaState.RUNNING
        reader.add_done_callback(self._reader_done)

    def _reader_done(self, _: asyncio.Task[None]) -> None:
        if not self._stopping:
            self.lost(f"lost the connection to replica {self.replica_id}: {self.peer.reason}")

    @property
    def info(self) -> Mapping[str, Any]:
        return self._info

    # -- the Replica seam -----------------------------------------------------------------

    async def call(self, request: Request) -> Any:
        return await self.peer.request("call", request.to_wire())

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        async for item in self.peer.stream("stream", request.to_wire()):
            yield item

    async def check_health(self) -> None:
        await self.peer.request("health")

    async def reconfigure(self, user_config: Any) -> None:
        await self.peer.request("reconfigure", user_config)

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.state = ReplicaState.STOPPED
        if not self.peer.closed.is_set():
            if self.ongoing:
                # Died replicas are stopped by the controller without a drain; a replica whose
                # worker is retiring is still alive, so its requests may finish first.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wait_idle(), self._graceful)
            with contextlib.suppress(ReplicaDiedError, asyncio.TimeoutError):
                await asyncio.wait_for(self.peer.request("stop"), 10)
            self.peer.abort("the replica was stopped")
        await asyncio.wait([self._reader], timeout=10)
        self._on_gone(self, "stopped", False)

    # -- what the backend tells it --------------------------------------------------------

    def lost(self, reason: str, *, drain: bool = False) -> None:
        """Dask reported this replica's worker gone (or going, when ``drain``)."""
        if self.gone or self._stopping:
            return
        self.gone = True
        self.draining = drain
        self.message = reason
        if not drain:
            self.peer.abort(reason)
        self._on_gone(self, reason, True)

    # -- what the replica asks of the runtime ---------------------------------------------

    async def answer(self, op: str, value: Any) -> Any:
        """Serve a request the replica sent: a handle call of user code, or a notice."""
        if op == "draining":
            if value and value.get("scheduler_lost"):
                # Nothing can be placed without a scheduler: serve while the worker lives.
                self.message = (
                    f"its Dask worker {self.worker} lost the scheduler and is closing; "
                    "serving until it exits"
                )
            else:
                self.lost(f"its Dask worker {self.worker} is closing", drain=True)
            return None
        submitter = handle_module.find_submitter(self.spec.runtime_id)
        if submitter is None:
            raise ReplicaDiedError(f"runtime {self.spec.runtime_id} is not running", started=False)
        if op == "submit":
            target, wire = value
            return await submitter.submit(Request.from_wire(target, wire))
        raise ValueError(f"unknown request {op!r}")

    def answer_stream(self, op: str, value: Any) -> AsyncIterator[Any]:
        """Serve a streaming handle call the replica's user code made."""
        submitter = handle_module.find_submitter(self.spec.runtime_id)
        if submitter is None:
            raise ReplicaDiedError(f"runtime {self.spec.runtime_id} is not running", started=False)
        target, wire = value
        request = Request.from_wire(target, wire)
        request.stream = True
        stream: AsyncIterator[Any] = submitter.submit(request).__aiter__()
        return stream
