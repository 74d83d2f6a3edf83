"""The in-thread backend: replicas are user objects in this process, on the runtime's loop.

This is the production request path with the cheapest possible backend underneath, which makes it
the test mode too: a call reaches async user code with no thread hop and no copy.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, ClassVar

from embserve._host import ReplicaHost
from embserve.backends import Backend
from embserve.context import ReplicaContext
from embserve.errors import ReplicaDiedError
from embserve.metrics import ReplicaStats
from embserve.replica import Replica, ReplicaSpec, ReplicaState
from embserve.request import Request
from embserve.resources import ResourcePool, acquire, build_pool

__all__ = ["LocalBackend", "LocalReplica"]

# Read on every call: a member looked up on its Enum class costs seven times a global's.
_STOPPED = ReplicaState.STOPPED


class LocalReplica(Replica):
    """A replica whose user object lives in this process."""

    def __init__(self, host: ReplicaHost) -> None:
        super().__init__(host.spec.replica_id, host.spec.deployment)
        self.host = host
        self._stopped = False

    @property
    def info(self) -> Mapping[str, Any]:
        return {"worker": "local"}

    def _check_alive(self) -> None:
        if self.state is _STOPPED:
            raise ReplicaDiedError(f"replica {self.replica_id} is stopped", started=False)

    def call(self, request: Request) -> Coroutine[Any, Any, Any]:
        # Not a coroutine of its own: the caller awaits the host's, one frame less per call.
        if self.state is _STOPPED:
            self._check_alive()
        return self.host.call(request)

    def run_here(self, request: Request) -> Callable[[], Any] | None:
        if self.state is _STOPPED:
            return None
        return self.host.run_here(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        self._check_alive()
        async for item in self.host.stream(request):
            yield item

    async def stats(self) -> ReplicaStats | None:
        return self.host.stats()

    async def check_health(self) -> None:
        self._check_alive()
        await self.host.check_health()

    async def reconfigure(self, user_config: Any) -> None:
        self._check_alive()
        await self.host.reconfigure(user_config)

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.state = ReplicaState.STOPPED
            self.host.end_calls()
            self.host.close()


class _HoldingReplica(LocalReplica):
    # A local replica that holds resources, given back when it stops.

    def __init__(self, host: ReplicaHost, release: Callable[[], object]) -> None:
        super().__init__(host)
        self._release = release

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            self._release()


class _Batching(LocalReplica):
    # A replica of a deployment with batched methods: their requests go straight into the
    # batcher (Replica.send), whose finished batch settles the callers' futures itself. Only
    # these replicas have send(), so that others pay nothing for it.

    def send(self, request: Request, future: asyncio.Future[Any]) -> Callable[[], None] | None:
        if self.state is _STOPPED:
            return None  # call() says so
        return self.host.send(request, future)

    async def stop(self) -> None:
        if not self._stopped:
            self.host.abandon_batches(
                ReplicaDiedError(
                    f"replica {self.replica_id} stopped before the request finished "
                    "(graceful_shutdown_timeout_s ran out)"
                )
            )
        await super().stop()


class _BatchingReplica(_Batching):
    pass


class _BatchingHoldingReplica(_Batching, _HoldingReplica):
    pass


class LocalBackend(Backend):
    """Runs each replica as an object in this process (the default backend).

    Args:
        resources: the capacity replicas are placed in (default: this machine's CPUs and visible
            GPUs), as in :class:`~embserve.resources.ResourcePool`. Deployments that ask for
            nothing take nothing; one that does not fit waits until a replica stops.
        gpu_ids: the ids of the GPUs of ``resources`` (default: the visible ones).
    """

    name: ClassVar[str] = "local"
    in_process: ClassVar[bool] = True

    def __init__(
        self,
        resources: Mapping[str, float] | None = None,
        *,
        gpu_ids: list[str] | None = None,
    ) -> None:
        super().__init__()
        self._capacity = resources
        self._gpu_ids = gpu_ids
        self.pool: ResourcePool | None = None

    async def start_replica(self, spec: ReplicaSpec) -> Replica:
        demand = spec.config.resources
        if not demand:
            host = ReplicaHost(spec, ReplicaContext(spec.deployment, spec.replica_id))
            replica = _BatchingReplica(host) if spec.config.batch_capacity else LocalReplica(host)
            await host.start()
            replica.state = ReplicaState.RUNNING
            return replica
        # Built on first demand: most local runtimes ask for nothing and never probe for GPUs.
        if self.pool is None:
            built = await build_pool(self._capacity, self._gpu_ids)
            if self.pool is None:  # replicas starting together: the first pool built is kept
                self.pool = built
        pool = self.pool
        owner = spec.replica_id
        allocation = await acquire(
            pool,
            owner,
            demand,
            group=spec.deployment,
            pending=self.pending,
            allocating=self.allocating,
        )
        context = ReplicaContext(
            spec.deployment,
            spec.replica_id,
            gpu_ids=allocation.gpu_ids,
            extra={"resources": dict(demand)},
        )
        host = ReplicaHost(spec, context)
        holding = _BatchingHoldingReplica if spec.config.batch_capacity else _HoldingReplica
        replica = holding(host, functools.partial(pool.release, owner))
        try:
            await host.start()
        except BaseException:
            pool.release(owner)
            raise
        replica.state = ReplicaState.RUNNING
        return replica
