"""The runtime's view of a replica that runs in a Dask task: one comm, straight to it.

Everything said over the comm is the core's remote-replica protocol
(:class:`~embserve.spi.RemoteReplica` over a :class:`~embserve_dask._transport.CommTransport`);
what is Dask's own is here: the Dask future of the replica's task, the worker it runs on, what
Dask says about that worker (gone, or closing), and the replica's own notice that its worker is
closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from embserve.spi import RemoteReplica, ReplicaSpec, ReplicaState

__all__ = ["DaskReplica"]

logger = logging.getLogger("embserve.dask")


class DaskReplica(RemoteReplica):
    """A replica hosted by a long-running task on a Dask worker.

    Calls are one message each way over a ``distributed.comm`` to the replica; the scheduler is
    not on the request path, so replicas keep serving while it is unreachable. The backend tells
    the replica when Dask reports its worker gone or closing (:meth:`lost`); the replica's own
    process says so too when its worker closes (a notice, :meth:`on_notice`).

    Args:
        spec: the replica's spec.
        worker: the address of the Dask worker it runs on.
        future: the Dask future of the replica's task.
        on_gone: told once when the replica is gone: why, and whether it died (False: it was
            stopped).
    """

    def __init__(
        self,
        spec: ReplicaSpec,
        worker: str,
        future: Any,
        on_gone: Callable[[DaskReplica, str, bool], None],
    ) -> None:
        super().__init__(spec)
        self.worker = worker
        self.future = future
        self._on_gone = on_gone
        self._info: dict[str, Any] = {"worker": worker}
        self._graceful = spec.config.graceful_shutdown_timeout_s
        self._stop: asyncio.Future[None] | None = None
        self.gone = False
        self.draining = False
        #: Whether this runtime owns the replica (a namespace's others only let go of it).
        self.owned = True
        #: The address of the replica's own process.
        self.address = ""

    @property
    def info(self) -> Mapping[str, Any]:
        return self._info

    def adopted_info(self, info: Mapping[str, Any]) -> None:
        """What the runtime that started the replica learnt about it, for status."""
        self._info = {**info, "worker": self.worker}

    def send_stop(self) -> bool:
        """``STOP`` for a replica this runtime owns; another's is only let go of."""
        return self.owned and super().send_stop()

    async def start(self, start: list[Any]) -> None:
        """Send ``START`` (the frames of :func:`~embserve.spi.encode_start`) over the transport
        :meth:`connect` was given, and wait until the user object is built."""
        started = await self.begin(start)
        self._info = {**started, "resources": dict(self.spec.config.resources)}

    # -- what Dask and the replica say ----------------------------------------------------

    def lost(self, reason: str, *, drain: bool = False) -> None:
        """Dask reported this replica's worker gone (or going, when ``drain``: it serves what
        it has until it is stopped)."""
        if not drain or self.state is ReplicaState.STARTING:
            # Gone (even while draining), or closing before the replica ran: what is in flight
            # fails at once, and a start fails (the backend tries another worker).
            self.draining = self.draining or drain
            self.lose(reason)
            return
        if self.gone or self.stopping:
            return
        self.gone = True
        self.draining = True
        self.message = reason
        self._on_gone(self, reason, True)

    def on_notice(self, value: Any) -> None:
        """The replica's process says its worker is closing (``{"draining": True,
        "scheduler_lost": bool}``)."""
        if not isinstance(value, dict) or not value.get("draining"):
            logger.warning("replica %s sent an unknown notice %r", self.replica_id, value)
            return
        if value.get("scheduler_lost"):
            # Nothing can be placed without a scheduler: serve while the worker lives.
            self.message = (
                f"its Dask worker {self.worker} lost the scheduler and is closing; "
                "serving until it exits"
            )
        else:
            self.lost(f"its Dask worker {self.worker} is closing", drain=True)

    def died(self, reason: str) -> None:
        if self.gone:
            return
        self.gone = True
        logger.warning("replica %s died: %s", self.replica_id, reason)
        self._on_gone(self, reason, True)

    # -- stopping -------------------------------------------------------------------------

    async def stop(self) -> None:
        """Let the requests of a draining replica finish (up to its graceful shutdown time),
        then stop it; the backend hears that it is gone once it closed its end."""
        if self._stop is None:
            self._stop = asyncio.ensure_future(self._stopping())
        await asyncio.shield(self._stop)

    async def _stopping(self) -> None:
        self.state = ReplicaState.STOPPED
        self.stopping = True
        if self.dead_reason is None and self.ongoing:
            # Died replicas are stopped by the controller without a drain; a replica whose
            # worker is closing is still alive, so its requests may finish first.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wait_idle(), self._graceful)
        await super().stop()
        self._on_gone(self, "stopped", False)
