"""The process backend: each replica in a worker process of its own on this machine.

Workers are started with the ``spawn`` method (a fresh interpreter: no fork of a threaded
process), receive their deployment pickled with cloudpickle, and talk to the runtime over one
socket pair each, in the core's remote-replica protocol (:mod:`embserve._remote`). Placement
in the machine's CPUs, GPUs and custom resources is :class:`~embserve.resources.ResourcePool`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import ClassVar

from embserve.backends import Backend, ReplicaDied
from embserve.errors import EmbserveError
from embserve.replica import Replica, ReplicaSpec
from embserve.resources import ResourcePool, acquire, build_pool
from embserve.spi import default_poll_s
from embserve_process._replica import ProcessReplica

__all__ = ["ProcessBackend"]


class ProcessBackend(Backend):
    """Runs each replica in a worker process of its own, spawned on this machine.

    Args:
        resources: the capacity replicas are placed in, e.g. ``{"CPU": 8, "GPU": 2,
            "memory_gb": 64}`` (default: this machine's CPUs and visible GPUs). Deployments ask
            for parts of it with ``resources=...``; one that does not fit waits, with the short
            resource named in the deployment's status, until a replica stops.
        gpu_ids: the ids of the GPUs of ``resources`` (default: the visible ones).
        busy_poll_s: how long a worker polls for the next request before it sleeps, and the
            runtime's event loop for an answer that is due (default 100 µs where this process
            may use two CPUs or more, else 0: never). Waking a sleeping thread costs about as
            much as a whole call; a request or an answer that comes within this time saves
            that. It costs at most this much CPU per wake-up, and nothing while idle.

    A replica holding GPUs sees only those (``CUDA_VISIBLE_DEVICES``); one holding none sees no
    GPU when the capacity has any.
    """

    name: ClassVar[str] = "process"
    direct_calls: ClassVar[bool] = True

    def __init__(
        self,
        resources: Mapping[str, float] | None = None,
        *,
        gpu_ids: list[str] | None = None,
        busy_poll_s: float | None = None,
    ) -> None:
        super().__init__()
        if busy_poll_s is not None and not 0 <= busy_poll_s <= 0.1:
            raise ValueError(f"busy_poll_s must be between 0 and 0.1 seconds, got {busy_poll_s!r}")
        self._capacity = resources
        self._gpu_ids = gpu_ids
        self.busy_poll_s = default_poll_s() if busy_poll_s is None else busy_poll_s
        self.pool: ResourcePool | None = None
        self._replicas: set[ProcessReplica] = set()

    async def start(self, on_replica_died: ReplicaDied) -> None:
        await super().start(on_replica_died)
        self.pool = await build_pool(self._capacity, self._gpu_ids)

    async def start_replica(self, spec: ReplicaSpec) -> Replica:
        if self.pool is None:
            raise EmbserveError("the process backend has not started")
        allocation = await acquire(
            self.pool,
            spec.replica_id,
            spec.config.resources,
            group=spec.deployment,
            pending=self.pending,
            allocating=self.allocating,
        )
        replica = ProcessReplica(spec, self, allocation)
        self._replicas.add(replica)
        try:
            await replica.start()
        except BaseException:
            self._replicas.discard(replica)
            self.replica_exited(replica)
            raise
        return replica

    def replica_exited(self, replica: ProcessReplica) -> None:
        """Give back what ``replica`` held, once its process is gone (or never started)."""
        self._replicas.discard(replica)
        if self.pool is not None:
            self.pool.release(replica.replica_id)

    async def close(self) -> None:
        await asyncio.gather(*(r.stop() for r in list(self._replicas)), return_exceptions=True)

    def describe(self) -> str:
        return "process"
