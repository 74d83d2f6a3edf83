"""One deployment's control loop: its replicas, their health, updates, and its request path.

Everything here runs on the runtime's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from embserve._loop import start_task
from embserve.autoscaling import Autoscaler, AutoscalingPolicy
from embserve.backends import Backend
from embserve.deployment import Deployment, DeploymentConfig
from embserve.errors import (
    DeploymentFailedError,
    EmbserveError,
    ReplicaDiedError,
    RequestTimeoutError,
)
from embserve.replica import Call, Replica, ReplicaSpec, ReplicaState
from embserve.router import Router, make_router
from embserve.status import DeploymentStatus, ReplicaStatus

logger = logging.getLogger("embserve.runtime")

# A request whose replica vanished before it started is sent again; this bounds how often, so a
# deployment whose replicas keep dying fails its callers instead of looping.
_MAX_UNSTARTED_RETRIES = 8


class DeploymentController:
    """Keeps the replicas of one deployment running and routes its requests."""

    def __init__(
        self,
        deployment: Deployment,
        init_args: tuple[Any, ...],
        init_kwargs: dict[str, Any],
        *,
        backend: Backend,
        runtime_id: str,
        router: Router | None = None,
    ) -> None:
        self.name = deployment.name
        self.deployment = deployment
        self.config: DeploymentConfig = deployment.config
        self.init_args = init_args
        self.init_kwargs = init_kwargs
        self.backend = backend
        self.runtime_id = runtime_id
        self.router = router or make_router(
            self.config.router,
            max_ongoing_requests=self.config.ongoing_limit,
            max_queued_requests=self.config.max_queued_requests,
        )
        self.target_replicas = self.config.initial_replicas
        self.running: list[Replica] = []  # in routing
        self.leaving: list[Replica] = []  # draining, out of routing
        self.starting: dict[str, str] = {}  # replica id -> message
        self.state = "UPDATING"
        self.message = ""
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._replacing: asyncio.Task[None] | None = None
        self._autoscaler: Autoscaler | None = None
        self._autoscale_task: asyncio.Task[None] | None = None
        self._update_lock = asyncio.Lock()
        self._stopping = False

    # -- replicas -------------------------------------------------------------------------

    def _spec(self) -> ReplicaSpec:
        return ReplicaSpec(
            deployment=self.name,
            replica_id=f"{self.name}#{next(self._ids)}",
            target=self.deployment.target,
            init_args=self.init_args,
            init_kwargs=self.init_kwargs,
            config=self.config,
            runtime_id=self.runtime_id,
        )

    async def _start_one(self) -> Replica:
        spec = self._spec()
        self.starting[spec.replica_id] = "starting"
        try:
            replica = await self.backend.start_replica(spec)
        finally:
            self.starting.pop(spec.replica_id, None)
        if self._stopping:
            await replica.stop()
            raise EmbserveError(f"deployment {self.name!r} was stopped while a replica started")
        return replica

    def _route_to(self, replicas: list[Replica]) -> None:
        self.running = replicas
        self.router.set_replicas(replicas)

    async def _retire(self, replica: Replica, *, drain: bool = True) -> None:
        """Take ``replica`` out of routing, let its requests finish, and stop it."""
        if replica in self.running:
            self._route_to([r for r in self.running if r is not replica])
        if replica.state is ReplicaState.STOPPED:
            return
        replica.state = ReplicaState.DRAINING
        self.leaving.append(replica)
        try:
            if drain and replica.ongoing:
                try:
                    await asyncio.wait_for(
                        replica.wait_idle(), self.config.graceful_shutdown_timeout_s
                    )
                except asyncio.TimeoutError:
                    logger.warning(
                        "replica %s still had %d request(s) after graceful_shutdown_timeout_s=%s",
                        replica.replica_id,
                        replica.ongoing,
                        self.config.graceful_shutdown_timeout_s,
                    )
            await replica.stop()
        finally:
            replica.state = ReplicaState.STOPPED
            self.leaving.remove(replica)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "deployment %s: background task failed", self.name, exc_info=task.exception()
            )

    # -- deploy, update, scale ------------------------------------------------------------

    async def deploy(self) -> None:
        """Start the first replicas; raise DeploymentFailedError if any constructor fails."""
        async with self._update_lock:
            await self._scale_to(self.target_replicas, fail_fast=True)
        self._health_task = asyncio.ensure_future(self._health_loop())
        self._configure_autoscaling()

    def _configure_autoscaling(self) -> None:
        auto = self.config.autoscaling_config
        self._autoscaler = Autoscaler(AutoscalingPolicy.from_config(auto)) if auto else None
        if self._autoscaler is not None and self._autoscale_task is None:
            self._autoscale_task = asyncio.ensure_future(self._autoscale_loop())

    async def _autoscale_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while (autoscaler := self._autoscaler) is not None:
            await asyncio.sleep(autoscaler.policy.metrics_interval_s)
            if autoscaler is not self._autoscaler:
                continue  # the deployment was updated while we slept
            now = loop.time()
            autoscaler.observe(now, sum(r.ongoing for r in self.running) + self.router.queued)
            wanted = autoscaler.decide(now, self.target_replicas)
            if wanted != self.target_replicas and not self._update_lock.locked():
                async with self._update_lock:
                    logger.info(
                        "autoscaling %s from %d to %d replicas",
                        self.name,
                        self.target_replicas,
                        wanted,
                    )
                    self.target_replicas = wanted
                    await self._scale_to(wanted)
        self._autoscale_task = None

    async def update(
        self, deployment: Deployment, init_args: tuple[Any, ...], init_kwargs: dict[str, Any]
    ) -> None:
        """Apply a new version: reconfigure in place when ``version`` is unchanged (and set),
        else a rolling update in which each new replica runs before an old one drains."""
        async with self._update_lock:
            old_config = self.config
            in_place = (
                deployment.config.version is not None
                and deployment.config.version == old_config.version
            )
            self.deployment = deployment
            self.config = deployment.config
            self.init_args, self.init_kwargs = init_args, init_kwargs
            auto = self.config.autoscaling_config
            if auto and old_config.autoscaling_config:
                # Keep the size the autoscaler reached, within the new bounds.
                policy = AutoscalingPolicy.from_config(auto)
                self.target_replicas = min(
                    max(self.target_replicas, policy.min_replicas), policy.max_replicas
                )
            else:
                self.target_replicas = self.config.initial_replicas
            self.router.max_ongoing_requests = self.config.ongoing_limit
            self.router.max_queued_requests = self.config.max_queued_requests
            self.state = "UPDATING"
            if in_place:
                if self.config.user_config != old_config.user_config:
                    await asyncio.gather(
                        *(r.reconfigure(self.config.user_config) for r in self.running)
                    )
                await self._scale_to(self.target_replicas, fail_fast=True)
                self._configure_autoscaling()
                return
            old = list(self.running)
            for index in range(max(len(old), self.target_replicas)):
                if index < self.target_replicas:
                    try:
                        replica = await self._start_one()
                    except DeploymentFailedError as exc:
                        self.state, self.message = "UNHEALTHY", str(exc)
                        raise
                    self._route_to([*self.running, replica])
                if index < len(old):
                    self._spawn(self._retire(old[index]))
            self.state, self.message = "HEALTHY", ""
            self._configure_autoscaling()

    async def _scale_to(self, count: int, *, fail_fast: bool = False) -> None:
        missing = count - len(self.running)
        if missing > 0:
            results = await asyncio.gather(
                *(self._start_one() for _ in range(missing)), return_exceptions=True
            )
            started = [r for r in results if isinstance(r, Replica)]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors and fail_fast:
                await asyncio.gather(*(r.stop() for r in started))
                self.state, self.message = "UNHEALTHY", str(errors[0])
                raise errors[0]
            self._route_to([*self.running, *started])
        elif missing < 0:
            leaving = self.running[count:]
            self._route_to(self.running[:count])  # out of routing now, drained in the background
            for replica in leaving:
                self._spawn(self._retire(replica))
        self.state, self.message = "HEALTHY", ""

    # -- failures -------------------------------------------------------------------------

    def replica_died(self, replica: Replica, reason: str) -> None:
        """A backend saw ``replica`` die: stop routing to it and start a replacement."""
        if replica not in self.running:
            return
        replica.message = reason
        self._route_to([r for r in self.running if r is not replica])
        replica.state = ReplicaState.STOPPED
        self._spawn(replica.stop())
        self._start_replacing(reason)

    def _start_replacing(self, reason: str) -> None:
        self.state, self.message = "UPDATING", f"replacing a replica: {reason}"
        if self._replacing is None or self._replacing.done():
            self._replacing = asyncio.ensure_future(self._replace())
            self._tasks.add(self._replacing)
            self._replacing.add_done_callback(self._task_done)

    async def _replace(self) -> None:
        delay = 0.1
        while not self._stopping and len(self.running) < self.target_replicas:
            try:
                replica = await self._start_one()
            except Exception as exc:
                self.state, self.message = "UNHEALTHY", f"cannot start a replacement: {exc}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._route_to([*self.running, replica])
        if not self._stopping:
            self.state, self.message = "HEALTHY", ""

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_period_s)
            for replica in list(self.running):
                try:
                    await asyncio.wait_for(
                        replica.check_health(), self.config.health_check_timeout_s
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    reason = f"health check failed: {type(exc).__name__}: {exc}"
                    logger.warning("replica %s %s", replica.replica_id, reason)
                    if replica in self.running:
                        replica.message = reason
                        self._route_to([r for r in self.running if r is not replica])
                        self._spawn(self._retire(replica))
                        self._start_replacing(reason)

    async def stop(self, reason: str) -> None:
        """Drain and stop every replica; fail the requests still queued with ``reason``."""
        self._stopping = True
        self._autoscaler = None
        for task in (self._health_task, self._autoscale_task):
            if task is not None:
                task.cancel()
        self.state = "DELETING"
        self.router.fail_waiters(lambda: EmbserveError(reason))
        await asyncio.gather(*(self._retire(r) for r in list(self.running)))
        for task in list(self._tasks):
            task.cancel()
        loops = [t for t in (self._health_task, self._autoscale_task) if t is not None]
        await asyncio.gather(*self._tasks, *loops, return_exceptions=True)

    # -- requests -------------------------------------------------------------------------

    async def handle(self, call: Call) -> Any:
        """Serve one call: pick a replica, run it, retry where that is safe, bound the time."""
        timeout = self.config.request_timeout_s
        if timeout is None:
            return await self._attempts(call)
        return await _with_timeout(self._attempts(call), timeout, self.name)

    def start(self, call: Call) -> asyncio.Future[Any]:
        """Start serving ``call`` on the running loop; the future of its outcome.

        A free replica that takes calls as messages (see :meth:`Replica.send`) gets it at once,
        and the future is settled by the replica's answer, with no coroutine in between, when
        nothing needs watching (no retries, no timeout). Otherwise a task serves it as
        :meth:`handle` does, its first step run at once.
        """
        loop = asyncio.get_running_loop()
        config = self.config
        if config.max_retries or config.request_timeout_s is not None:
            return start_task(loop, self.handle(call))
        router = self.router
        replica = router.try_assign(call.key)
        if replica is None:
            return start_task(loop, self._attempts(call))
        future = _Sent(loop=loop)
        withdraw = replica.send(call, future)
        if withdraw is None:
            return start_task(loop, self._attempts(call, replica))
        future.sent(router, replica, withdraw)
        return future

    async def _attempts(self, call: Call, replica: Replica | None = None) -> Any:
        # ``replica``: one already assigned to this call.
        router = self.router
        retries = unstarted = 0
        while True:
            if replica is None:
                # A free replica is found without a coroutine of its own on the usual path.
                replica = router.try_assign(call.key) or await router.assign(call.key)
            try:
                return await replica.call(call)
            except ReplicaDiedError as exc:
                if exc.started:
                    if retries >= self.config.max_retries:
                        raise
                    retries += 1
                else:
                    unstarted += 1
                    if unstarted > _MAX_UNSTARTED_RETRIES:
                        raise
                    self.replica_died(replica, str(exc))
            finally:
                router.release(replica)
                replica = None

    async def stream(self, call: Call) -> AsyncIterator[Any]:
        """Serve one streaming call; retried only until its first item."""
        router = self.router
        unstarted = 0
        while True:
            replica = await router.assign(call.key)
            first = True
            try:
                async for item in replica.stream(call):
                    first = False
                    yield item
                return
            except ReplicaDiedError as exc:
                if not first or exc.started or unstarted >= _MAX_UNSTARTED_RETRIES:
                    raise
                unstarted += 1
                self.replica_died(replica, str(exc))
            finally:
                router.release(replica)

    # -- status ---------------------------------------------------------------------------

    def status(self) -> DeploymentStatus:
        """A snapshot of this deployment."""
        replicas = [
            ReplicaStatus(rid, ReplicaState.STARTING, message)
            for rid, message in self.starting.items()
        ]
        replicas += [
            ReplicaStatus(r.replica_id, r.state, r.message, r.ongoing, dict(r.info))
            for r in (*self.running, *self.leaving)
        ]
        message = self.message
        pending = self.backend.pending.get(self.name)
        if pending and self.starting:
            message = pending
        return DeploymentStatus(
            name=self.name,
            state=self.state,
            message=message,
            target_replicas=self.target_replicas,
            replicas=tuple(replicas),
            queued_requests=self.router.queued,
            version=self.config.version,
        )


class _Sent(asyncio.Future):  # type: ignore[type-arg]
    # The outcome of a call sent to a replica as a message. The replica's answer settles it and
    # gives back the router's slot at once, with no callback left for a later loop turn;
    # cancelling it withdraws the call.

    __slots__ = ("_replica", "_router", "_withdraw")

    def sent(self, router: Router, replica: Replica, withdraw: Callable[[], None]) -> None:
        self._router = router
        self._replica = replica
        self._withdraw = withdraw

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._router.release(self._replica)

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        self._router.release(self._replica)

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self._router.release(self._replica)
        self._withdraw()
        return True


async def _with_timeout(work: Awaitable[Any], timeout: float, name: str) -> Any:
    # A timer that cancels this task is far cheaper than asyncio.wait_for's extra task.
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await work
    except asyncio.CancelledError:
        if not expired:
            raise
        if sys.version_info >= (3, 11):
            task.uncancel()
        raise RequestTimeoutError(
            f"request to {name!r} did not finish within request_timeout_s={timeout}"
        ) from None
    finally:
        timer.cancel()
