"""DaskBackend: replicas placed on a Dask cluster by Dask, one long-running task each.

Placement: the backend keeps one :class:`~embserve.resources.ResourcePool` per worker, built from
the resources the worker declares, so fractional GPUs are shared per device by the same rules as
on the process backend (two ``{"GPU": 0.5}`` replicas share a device, a 0.6 and a 0.5 do not). It
picks a worker whose pool fits the deployment (spreading the replicas of a deployment over
workers, then packing shares tightly), takes the devices the pool chose there, and submits the
replica's task restricted to that worker with the resources it asks for; Dask then holds those
resources for the task's life, so its accounting and the pools agree.

Admission: each replica's process accepts only its own runtime. The backend makes a random token
per replica; the replica's task (and so the scheduler) carries only its SHA-256 digest, and the
token itself goes to the replica's process over the comm the runtime opens, as the spec does,
with the cluster's security (TLS). The process checks it before it reads anything else from the
comm, and closes a comm that does not present it (see :mod:`embserve_dask._child`).

Watching: the scheduler's own events (``add-worker``, ``remove-worker``) say when workers come
and go; a removal that was expected (a retirement) drains, one that was not fails the requests
in flight at once. Requests never touch the scheduler: see :mod:`embserve_dask._worker`.

Sharing (``Runtime(namespace=...)``): the namespace's registry lives in the scheduler
(:mod:`embserve_dask._registry`); replicas are started shared (they serve every runtime that
presents their token, and outlive their owner's comm), and each runtime that routes to a replica
holds a Dask future of its task, so the task lives while any runtime uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from distributed.comm import core as comm_core

from embserve.errors import DeploymentFailedError
from embserve.spi import (
    Allocation,
    Backend,
    Replica,
    ReplicaContext,
    ReplicaSpec,
    ReplicaState,
    ResourcePool,
    default_poll_s,
    encode_start,
)
from embserve_dask._child import TOKEN_KEY
from embserve_dask._transport import CommTransport
from embserve_dask._worker import serve_replica
from embserve_dask.replica import DaskReplica

if TYPE_CHECKING:
    from embserve_dask._registry import DaskRegistry

__all__ = ["DaskBackend"]

# distributed's functions are untyped; they are used through this name.
connect: Any = comm_core.connect

logger = logging.getLogger("embserve.dask")

_EPSILON = 1e-9


def _worker_pool(declared: Mapping[str, float]) -> ResourcePool:
    """The pool of a worker declaring ``declared``; its GPUs are named by their position.

    The backend cannot see a worker's ``CUDA_VISIBLE_DEVICES``: the replica's task turns the
    positions into the worker's own device ids.
    """
    capacity = dict(declared)
    if "GPU" in capacity:
        # A device count: a fractional declaration (GPU=1.5) offers its whole devices only.
        capacity["GPU"] = float(int(capacity["GPU"]))
    count = int(capacity.get("GPU", 0))
    return ResourcePool(capacity, gpu_ids=[str(i) for i in range(count)])


class _WorkerGone(Exception):
    """The worker chosen for a starting replica left before the replica ran."""


class DaskBackend(Backend):
    """Runs replicas on the workers of a Dask cluster.

    Args:
        client_or_address: a ``distributed.Client``, a cluster object (``LocalCluster``, any
            ``SpecCluster``), or a scheduler address (``tcp://host:8786``, ``tls://host:8786``).
            A client running on another event loop is not used directly: the backend opens a
            client of its own to the same scheduler with the same security.
        security: a ``distributed.Security`` for addresses given as strings (TLS clusters);
            clients and clusters bring their own.
        connect_timeout_s: how long to wait for the scheduler, and for a replica's listener.
        busy_poll_s: how long a replica's process polls for the next request before it sleeps,
            and the runtime's event loop for an answer that is due (default: 100 µs where the
            process may use two CPUs or more, each machine deciding for itself, else 0:
            never). Waking a sleeping thread costs about as much as a call between two
            processes on one machine; this costs at most that much CPU per wake-up.
        **client_options: passed on to ``distributed.Client`` when the backend opens one.

    Replicas need ``embserve-dask`` (and the deployments' code) importable on the workers.
    """

    name: ClassVar[str] = "dask"

    def __init__(
        self,
        client_or_address: Any,
        *,
        security: Any = None,
        connect_timeout_s: float = 30.0,
        busy_poll_s: float | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__()
        if busy_poll_s is not None and not 0 <= busy_poll_s <= 0.1:
            raise ValueError(f"busy_poll_s must be between 0 and 0.1 seconds, got {busy_poll_s!r}")
        self._poll_s = busy_poll_s
        self._target = client_or_address
        self._security = security
        self._connect_timeout_s = connect_timeout_s
        self._client_options = client_options
        self.client: Any = None
        self._owns_client = False
        self._topic = f"embserve-{uuid.uuid4().hex}"
        self._workers: dict[str, dict[str, float]] = {}  # address -> resources it declares
        self._pools: dict[str, ResourcePool] = {}  # address -> what its replicas hold
        self._deployment_of: dict[str, str] = {}  # replica id -> deployment, for spreading
        self._replicas: dict[str, DaskReplica] = {}
        self._hellos: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._starting_on: dict[str, str] = {}
        self._changed: asyncio.Event | None = None
        self._closing: set[str] = set()  # workers that told their replicas to drain
        self._removed: set[str] = set()  # so that a refresh begun before a removal forgets it
        self._tasks: set[asyncio.Future[Any]] = set()
        # replica id -> its admission token: kept after a replica died, so that a re-run of its
        # task (its worker died as it ran) can still be dismissed.
        self._tokens: dict[str, bytes] = {}
        self._namespace: str | None = None
        self._registry: DaskRegistry | None = None

    @property
    def caller_poll_s(self) -> float:
        """How long the runtime's loop polls for a due answer from a replica before it sleeps
        (``busy_poll_s``, or its default on this machine)."""
        return default_poll_s() if self._poll_s is None else self._poll_s

    @classmethod
    def from_address(cls, address: str) -> DaskBackend:
        """``dask://host:port`` (plain TCP), ``tcp://host:port`` or ``tls://host:port``.

        TLS takes its certificates from Dask's configuration (``distributed.comm.tls``).
        """
        scheme, sep, rest = address.partition("://")
        if not sep or scheme not in ("dask", "tcp", "tls"):
            raise ValueError(f"a Dask address looks like dask://host:8786, got {address!r}")
        return cls(f"tcp://{rest}" if scheme == "dask" else address)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, on_replica_died: Any) -> None:
        """Connect to the scheduler and listen to its events."""
        await super().start(on_replica_died)
        self._changed = asyncio.Event()
        self.client = await self._connect()
        self.client.subscribe_topic(self._topic, self._on_hello)
        self.client.subscribe_topic("all", self._on_cluster_event)
        await self._refresh_workers()

    async def _connect(self) -> Any:
        import distributed

        Client: Any = distributed.Client
        target, security = self._target, self._security
        if isinstance(target, Client):
            client: Any = target
            loop = getattr(client.loop, "asyncio_loop", None)
            if client.asynchronous and loop is asyncio.get_running_loop():
                return client
            target, security = client.scheduler.address, client.security
        elif hasattr(target, "scheduler_address"):
            target, security = target.scheduler_address, getattr(target, "security", security)
        if not isinstance(target, str):
            raise TypeError(
                "DaskBackend needs a distributed.Client, a cluster or a scheduler address, "
                f"got {target!r}"
            )
        self._owns_client = True
        opened = Client(
            target,
            security=security,
            asynchronous=True,
            set_as_default=False,
            timeout=self._connect_timeout_s,
            **self._client_options,
        )
        return await opened

    # -- sharing --------------------------------------------------------------------------

    @property
    def shares_replicas(self) -> bool:
        """True once a namespace is set: runtimes in other processes share the replicas."""
        return self._namespace is not None

    def use_namespace(self, namespace: str) -> None:
        """Share replicas with the other runtimes of ``namespace`` on this cluster."""
        self._namespace = namespace

    async def open_registry(self, runtime_id: str) -> DaskRegistry:
        """The namespace's registry in the scheduler (installed there on first use)."""
        from embserve_dask._registry import DaskRegistry

        if self._namespace is None:
            raise ValueError("the Dask backend has no namespace")
        registry = DaskRegistry(self.client, self._namespace, runtime_id)
        await registry.open()
        self._registry = registry
        return registry

    def contact(self, replica: Replica) -> Mapping[str, Any]:
        """The replica's address, admission token, worker and task key, for other runtimes."""
        assert isinstance(replica, DaskReplica)
        return {
            "address": replica.address,
            "token": self._tokens.get(replica.replica_id, b""),
            "worker": replica.worker,
            "key": replica.future.key,
            "info": dict(replica.info),
        }

    async def adopt(self, spec: ReplicaSpec, contact: Mapping[str, Any]) -> Replica:
        """Connect to a replica another runtime of the namespace started."""
        import distributed

        worker = contact["worker"]
        if worker in self._removed:
            raise OSError(f"its Dask worker {worker} is gone")
        token = bytes(contact["token"])
        comm = await self._open(contact["address"], token)
        # Holding a future of its task keeps the task (and the replica) alive for this
        # runtime too, should the runtime that started it go.
        future: Any = distributed.Future(contact["key"], self.client)
        # A Future made from a key tells the scheduler nothing; this is the message the client
        # itself sends for its futures when it reconnects (no public call does it).
        self.client._send_to_scheduler({"op": "client-desires-keys", "keys": [future.key]})
        replica = DaskReplica(spec, worker, future, self._replica_gone)
        replica.owned = False
        replica.address = contact["address"]
        replica.adopted_info(contact.get("info") or {})
        self._tokens[spec.replica_id] = token
        self._replicas[spec.replica_id] = replica
        pool = self._pools.get(worker)
        if pool is not None and pool.try_acquire(spec.replica_id, _demand(spec)) is not None:
            self._deployment_of[spec.replica_id] = spec.deployment  # placed here too
        replica.connect(CommTransport(comm), poll_s=self.caller_poll_s)
        replica.state = ReplicaState.RUNNING
        return replica

    def set_owner(self, replica: Replica, owned: bool) -> None:
        """Stopping an owned replica stops it for every runtime; else it is only let go of."""
        if isinstance(replica, DaskReplica):
            replica.owned = owned

    async def close(self) -> None:
        """Stop listening to the cluster; close the client if the backend opened it."""
        client = self.client
        if client is None:
            return
        if self._registry is not None:
            await self._registry.close()
        for topic in (self._topic, "all"):
            with contextlib.suppress(Exception):  # the client may already be closed
                client.unsubscribe_topic(topic)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_client:
            await client.close()

    def describe(self) -> str:
        """``dask <scheduler address>``, and what is wrong when the scheduler is unreachable."""
        client = self.client
        if client is None:
            return "dask (not connected)"
        address = client.scheduler.address
        status = getattr(client, "status", "running")
        if status != "running":
            return (
                f"dask {address} (scheduler unreachable, client {status}: replicas already "
                "connected keep serving; no replica can be placed until it is back)"
            )
        return f"dask {address} ({len(self._workers)} workers)"

    # -- cluster events -------------------------------------------------------------------

    async def _refresh_workers(self) -> None:
        identity = await self.client.scheduler.identity(n_workers=-1)
        workers: dict[str, dict[str, float]] = {}
        for address, worker in identity.get("workers", {}).items():
            if address in self._removed:
                continue
            resources = {k: float(v) for k, v in (worker.get("resources") or {}).items()}
            # Dask workers rarely declare CPU; their thread count is the CPU they offer.
            resources.setdefault("CPU", float(worker.get("nthreads", 1)))
            workers[address] = resources
        self._set_workers(workers)

    def _set_workers(self, workers: dict[str, dict[str, float]]) -> None:
        self._workers = workers
        for address in list(self._pools):
            if address not in workers:
                del self._pools[address]
        # A worker keeps the pool it joined with: it holds what replicas hold there, and Dask
        # workers do not change what they declare while they run.
        for address, declared in workers.items():
            if address not in self._pools:
                self._pools[address] = _worker_pool(declared)
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("dask backend task failed", exc_info=task.exception())

    def _on_cluster_event(self, event: tuple[float, Any]) -> None:
        msg = event[1]
        if not isinstance(msg, dict):
            return
        action = msg.get("action")
        if action == "add-worker":
            self._removed.discard(msg.get("worker", ""))
            self._spawn(self._refresh_workers())
        elif action == "remove-worker" and "worker" in msg:
            self._worker_gone(msg["worker"], expected=bool(msg.get("expected")))

    def _worker_gone(self, address: str, *, expected: bool) -> None:
        self._removed.add(address)
        self._workers.pop(address, None)
        self._closing.discard(address)
        for replica_id, where in list(self._starting_on.items()):
            hello = self._hellos.get(replica_id)
            if where == address and hello is not None and not hello.done():
                hello.set_exception(_WorkerGone(address))
        how = "was retired" if expected else "died"
        for replica in [r for r in self._replicas.values() if r.worker == address]:
            replica.lost(f"its Dask worker {address} {how}", drain=expected)
        pool = self._pools.pop(address, None)
        for owner in pool.allocations if pool is not None else ():
            self._deployment_of.pop(owner, None)
        self._notify()

    def _on_hello(self, event: tuple[float, Any]) -> None:
        msg = event[1]
        hello = self._hellos.get(msg["replica"])
        if hello is not None and not hello.done():
            hello.set_result(msg)
        else:
            # Dask re-ran the task of a replica the runtime has already replaced (its worker
            # died while it ran): tell it to end instead of holding resources twice.
            token = self._tokens.get(msg["replica"])
            if token is not None:  # else it gives up waiting for its runtime on its own
                self._spawn(self._dismiss(msg["address"], token))

    async def _dismiss(self, address: str, token: bytes) -> None:
        # A replica's process serves the first runtime that connects, and ends with its comm.
        comm = await self._open(address, token)
        comm.abort()

    async def _open(self, address: str, token: bytes) -> Any:
        """A comm to the replica's process at ``address``, admitted with ``token``."""
        comm = await connect(address, timeout=self._connect_timeout_s, **self._connection_args())
        try:
            await comm.write({TOKEN_KEY: token})
        except BaseException:
            comm.abort()
            raise
        return comm

    def _connection_args(self) -> dict[str, Any]:
        args: dict[str, Any] = self.client.security.get_connection_args("client")
        return args

    # -- placement ------------------------------------------------------------------------

    def _place(self, spec: ReplicaSpec) -> tuple[str | None, str]:
        need = _demand(spec)
        best: tuple[Any, ...] | None = None
        choice: str | None = None
        most_free: dict[str, float] = {k: 0.0 for k in need}
        detail = ""
        for address, pool in self._pools.items():
            if address in self._closing:
                continue
            free = pool.free()
            for k in need:
                most_free[k] = max(most_free[k], free.get(k, 0.0))
            shortage = pool.shortage(need)
            if shortage is not None:
                detail = detail or f"{address}: {shortage}"
                continue
            held = pool.allocations
            same = sum(1 for owner in held if self._deployment_of.get(owner) == spec.deployment)
            # Spread a deployment first, then pack shares tightly (least left over).
            leftover = sum(free.get(k, 0.0) - v for k, v in need.items()) if need else len(held)
            key = (same, leftover, address)
            if best is None or key < best:
                best, choice = key, address
        if choice is not None:
            return choice, ""
        if not self._pools:
            return None, "waiting for a Dask worker to join the cluster"
        short = [
            f"{k}={v:g} (the most free on any worker is {most_free[k]:g})"
            for k, v in need.items()
            if most_free[k] + _EPSILON < v
        ]
        if not short:  # enough in total, but not on one device (or not whole devices)
            short = [f"{k}={v:g}" for k, v in need.items()]
            short[-1] += f" ({detail})" if detail else ""
        return None, (
            f"waiting for a Dask worker with {', '.join(short)} free; "
            f"{len(self._pools)} worker(s) connected"
        )

    async def start_replica(self, spec: ReplicaSpec) -> Replica:
        """Place the replica on a worker that fits it and return it RUNNING.

        Waits, with the reason in ``pending`` (and the replica in ``allocating``), while no
        worker has the free resources; tries another worker when the chosen one leaves before
        the replica runs.
        """
        try:
            return await self._place_and_launch(spec)
        finally:
            self.allocating.discard(spec.replica_id)

    async def _place_and_launch(self, spec: ReplicaSpec) -> Replica:
        while True:
            client_status = getattr(self.client, "status", "running")
            if client_status != "running":
                address, reason = (
                    None,
                    f"the Dask scheduler is unreachable (client {client_status})",
                )
            else:
                address, reason = self._place(spec)
            if address is None:
                self.pending[spec.deployment] = reason
                self.allocating.add(spec.replica_id)
                assert self._changed is not None
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), 5.0)
                except asyncio.TimeoutError:
                    # Worker resources can also change without an event we hear of.
                    await self._refresh_workers()
                continue
            self.pending.pop(spec.deployment, None)
            self.allocating.discard(spec.replica_id)
            try:
                replica: DaskReplica = await self._launch(spec, address)
            except _WorkerGone:
                continue
            return replica

    def _hold(self, address: str, spec: ReplicaSpec) -> Allocation:
        allocation = self._pools[address].try_acquire(spec.replica_id, _demand(spec))
        assert allocation is not None, "held only where _place found room"
        self._deployment_of[spec.replica_id] = spec.deployment
        return allocation

    def _release(self, address: str, replica_id: str) -> None:
        self._deployment_of.pop(replica_id, None)
        pool = self._pools.get(address)
        if pool is not None and pool.release(replica_id) is not None:
            self._notify()

    async def _launch(self, spec: ReplicaSpec, address: str) -> DaskReplica:
        declared = self._workers.get(address, {})
        resources = {
            k: float(v)
            for k, v in spec.config.resources.items()
            if v > 0 and (k != "CPU" or "CPU" in declared)
        }
        # Pickled here, before anything starts (a deployment that cannot be sent fails whole),
        # and sent straight to the replica's process: the worker never imports user code, and
        # only the replica's process, started with its devices chosen, unpickles it.
        context = ReplicaContext(
            spec.deployment, spec.replica_id, extra={"resources": dict(spec.config.resources)}
        )
        start = encode_start(spec, context)
        token = self._tokens[spec.replica_id] = secrets.token_bytes(32)
        allocation = self._hold(address, spec)
        hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._hellos[spec.replica_id] = hello
        self._starting_on[spec.replica_id] = address
        future = self.client.submit(
            serve_replica,
            spec.replica_id,
            self._topic,
            allocation.gpu_ids,
            hashlib.sha256(token).hexdigest(),
            shared=self._namespace is not None,
            busy_poll_s=self._poll_s,
            key=f"embserve-{spec.replica_id}-{uuid.uuid4().hex[:8]}",
            workers=[address],
            allow_other_workers=False,
            resources=resources or None,
            pure=False,
        )
        ended = asyncio.ensure_future(_outcome(future))
        replica: DaskReplica | None = None
        try:
            await asyncio.wait([hello, ended], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
            if not hello.done():
                raise DeploymentFailedError(
                    f"the Dask task of replica {spec.replica_id} ended before it served: "
                    f"{ended.result()}"
                )
            msg = hello.result()  # raises _WorkerGone
            try:
                comm = await self._open(msg["address"], token)
            except OSError as exc:
                raise _WorkerGone(f"cannot reach replica {spec.replica_id}: {exc}") from None
            replica = DaskReplica(spec, address, future, self._replica_gone)
            replica.address = msg["address"]
            # Known before it runs, so that Dask's news of its worker reaches it while starting.
            self._replicas[spec.replica_id] = replica
            replica.connect(CommTransport(comm), poll_s=self.caller_poll_s)
            try:
                await replica.start(start)
            except DeploymentFailedError:
                if replica.draining or address in self._removed:
                    # Its worker left or began closing meanwhile: another one is tried.
                    if replica.draining and address in self._workers:
                        self._closing.add(address)
                    raise _WorkerGone(address) from None
                raise
            if replica.dead_reason is not None:  # lost as its start was answered
                raise DeploymentFailedError(
                    f"replica {spec.replica_id} was lost as it started: {replica.dead_reason}"
                )
        except BaseException:
            if replica is not None:
                self._replicas.pop(spec.replica_id, None)
                replica.stopping = True  # nobody is told of the death of what never ran
                replica.lose("it failed to start")
            self._release(address, spec.replica_id)
            self._tokens.pop(spec.replica_id, None)
            self._spawn(self._cancel(future))
            raise
        finally:
            ended.cancel()
            self._hellos.pop(spec.replica_id, None)
            self._starting_on.pop(spec.replica_id, None)
        return replica

    async def _cancel(self, future: Any) -> None:
        # The client may be gone; the task ends without its runtime anyway.
        with contextlib.suppress(Exception):
            await self.client.cancel([future])

    def _replica_gone(self, replica: DaskReplica, reason: str, died: bool) -> None:
        if self._replicas.pop(replica.replica_id, None) is None:
            return
        if replica.draining and replica.worker in self._workers:
            self._closing.add(replica.worker)
        self._release(replica.worker, replica.replica_id)
        if died:
            self._spawn(self._cancel(replica.future))
            self.on_replica_died(replica, reason)
        else:
            self._tokens.pop(replica.replica_id, None)
            replica.future.release()


def _demand(spec: ReplicaSpec) -> dict[str, float]:
    return {k: float(v) for k, v in spec.config.resources.items() if v > 0}


async def _outcome(future: Any) -> str:
    try:
        await future
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "the task returned"
