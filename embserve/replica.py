"""The Replica seam: the caller's view of one running replica, wherever it runs.

A :class:`Replica` is what the router hands requests to. The in-thread implementation calls the
user object directly on the runtime's event loop; process and Dask implementations send one
message each way. Nothing above this seam knows which one it holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from embserve.deployment import DeploymentConfig
from embserve.metrics import ReplicaStats
from embserve.request import Request

__all__ = ["Replica", "ReplicaSpec", "ReplicaState", "Request"]


class ReplicaState(str, enum.Enum):
    """Where a replica is in its life (Ray Serve's names): PENDING_ALLOCATION (waiting for
    resources) → STARTING (its constructor runs) → RUNNING → DRAINING → STOPPED."""

    PENDING_ALLOCATION = "PENDING_ALLOCATION"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """Everything a backend needs to start one replica; picklable with cloudpickle.

    ``init_args`` and ``init_kwargs`` already hold handles where the application bound other
    deployments.
    """

    deployment: str
    replica_id: str
    target: Callable[..., Any]
    init_args: tuple[Any, ...]
    init_kwargs: Mapping[str, Any]
    config: DeploymentConfig
    runtime_id: str = ""


class Replica(ABC):
    """The caller's view of one running replica.

    Contract:

    - Every method is called on the runtime's event loop and must not block it.
    - :meth:`call` returns the user method's result or raises the user's exception (same type);
      it raises :class:`~embserve.ReplicaDiedError` when the replica is gone, with
      ``started=False`` when the request never reached user code (the router retries those).
    - ``ongoing`` is kept by the router that owns the replica, not by the replica: it counts the
      leases given out and not yet released. A replica whose user code goes on after its caller
      gave up (sync code in a thread) holds the request's lease (:meth:`Lease.hold
      <embserve.router.Lease.hold>`) until that code really ended.
    """

    def __init__(self, replica_id: str, deployment: str) -> None:
        self.replica_id = replica_id
        self.deployment = deployment
        self.state = ReplicaState.STARTING
        self.message = ""
        self.ongoing = 0
        #: Set by the router when ``ongoing`` drops to 0; None until :meth:`wait_idle` waits.
        self.idle: asyncio.Event | None = None

    @property
    def info(self) -> Mapping[str, Any]:
        """Where the replica runs (worker address, process id, GPU ids), for status."""
        return {}

    @abstractmethod
    async def call(self, request: Request) -> Any:
        """Run ``request`` on the replica and return its result."""

    def send(self, request: Request, future: asyncio.Future[Any]) -> Callable[[], None] | None:
        """Start ``request`` now and settle ``future`` with its outcome, as :meth:`call` would.

        Optional, for replicas whose calls are messages to somewhere else: the request path
        then awaits ``future`` alone, with no coroutine between the caller and the answer.
        Returns the function that withdraws the call when the caller cancels ``future``; None,
        having sent nothing, when the replica does not do this (the default) or cannot send
        now, and the caller uses :meth:`call`, which reports why.
        """
        return None

    def run_here(self, request: Request) -> Callable[[], Any] | None:
        """What serves ``request`` in the calling thread (any thread but the loop's), to be
        run at once: the method itself, for replicas whose user code runs in this process and
        whose method is sync; a blocking round trip on a line of its own, for replicas
        elsewhere whose backend has ``direct_calls``. None (the default) when the request must
        go through :meth:`call`.

        The caller holds the request's lease while the function runs. The function may return
        :data:`~embserve.response.NOT_HERE` to say the request was not sent after all (a broken
        line), so that the caller serves it through :meth:`call` instead.
        """
        return None

    @abstractmethod
    def stream(self, request: Request) -> AsyncIterator[Any]:
        """Run a generator method and yield its items as they come."""

    async def stats(self) -> ReplicaStats | None:
        """What the replica measured itself (execution times, batch sizes, model loads), or
        None when it cannot say (the default)."""
        return None

    @abstractmethod
    async def check_health(self) -> None:
        """Return when the replica is healthy; raise when it is not."""

    @abstractmethod
    async def reconfigure(self, user_config: Any) -> None:
        """Pass a new ``user_config`` to the user object's ``reconfigure``."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the replica and release what it holds. Draining is done by the caller first."""

    async def wait_idle(self) -> None:
        """Wait until no request is in flight on this replica."""
        if self.ongoing == 0:
            return
        if self.idle is None:
            self.idle = asyncio.Event()
        self.idle.clear()
        while self.ongoing:
            await self.idle.wait()
            self.idle.clear()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.replica_id} {self.state.value}>"
