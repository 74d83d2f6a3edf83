"""One deployment's control loop: its replicas, their health, updates, scaling and restarts.

Its requests take the path of :mod:`embserve._serve`. Everything here runs on the runtime's
event loop, and every wait is measured on the injected :class:`~embserve.clock.Clock`, so
health checks, restarts and autoscaling run on simulated time in tests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from embserve._rollout import roll_out
from embserve._serve import RequestPath, with_timeout
from embserve.autoscaling import Autoscaler, AutoscalingPolicy
from embserve.backends import Backend
from embserve.clock import Clock, LoopClock, Timer, sleep
from embserve.deployment import Deployment, DeploymentConfig
from embserve.errors import DeploymentUnavailableError, EmbserveError
from embserve.multiplex import max_models_of
from embserve.replica import Replica, ReplicaSpec, ReplicaState
from embserve.router import Router, make_router
from embserve.snapshot import DeploymentStatus, ReplicaStatus

logger = logging.getLogger("embserve.runtime")

# How often a replica that is still not running after its start began says why in the log.
_START_NOTICE_S = 10.0
# Starting a replica that failed is tried again after 0.1 s, then twice as long each time, up
# to this.
_MAX_RESTART_DELAY_S = 10.0


class DeploymentController(RequestPath):
    """Keeps the replicas of one deployment running (starts, health, updates, scaling,
    restarts); its requests take the path of :class:`~embserve._serve.RequestPath`."""

    def __init__(
        self,
        deployment: Deployment,
        init_args: tuple[Any, ...],
        init_kwargs: dict[str, Any],
        *,
        backend: Backend,
        runtime_id: str,
        router: Router | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(deployment)
        self.name = deployment.name
        self.clock = clock or LoopClock(asyncio.get_running_loop())
        self.deployment = deployment
        self.config: DeploymentConfig = deployment.config
        self.init_args = init_args
        self.init_kwargs = init_kwargs
        self.backend = backend
        self.runs_in_process = backend.in_process
        self.direct_calls = backend.direct_calls
        self.runtime_id = runtime_id
        self.router = router or make_router(
            self.config.router,
            max_ongoing_requests=self.config.ongoing_limit,
            max_queued_requests=self.config.max_queued_requests,
        )
        self.router.max_models_per_replica = max_models_of(deployment.target)
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
        self.update_lock = asyncio.Lock()
        self._stopping = False
        self.unavailable = None
        #: Why the last update failed, until one succeeds (status shows it).
        self.failed_update: str | None = None
        #: False while another runtime of a namespace owns the deployment: this one routes to
        #: the replicas it publishes and neither starts, replaces nor scales them.
        self.reconciling = True
        #: Told after every change of the replicas in routing (a namespace publishes them).
        self.on_routed: Callable[[], None] | None = None
        #: Put before each replica's number: a namespace makes replica ids unique across runtimes.
        self.id_prefix = ""

    # -- replicas -------------------------------------------------------------------------

    def _spec(self) -> ReplicaSpec:
        return ReplicaSpec(
            deployment=self.name,
            replica_id=f"{self.name}#{self.id_prefix}{next(self._ids)}",
            target=self.deployment.target,
            init_args=self.init_args,
            init_kwargs=self.init_kwargs,
            config=self.config,
            runtime_id=self.runtime_id,
        )

    async def start_one(self) -> Replica:
        spec = self._spec()
        self.starting[spec.replica_id] = "starting"
        began = self.clock.now()
        timer: list[Timer] = []

        def still_waiting() -> None:
            # Nothing waits silently: say every so often what the start waits for. The
            # backend's reason is the deployment's; it is this replica's only while it is
            # allocating. Past that the backend may be launching it or its constructor running.
            pending = self.backend.pending.get(self.name)
            if pending and spec.replica_id in self.backend.allocating:
                reason = pending
            else:
                reason = "still starting (its constructor may still be running)"
            logger.warning(
                "deployment %s: replica %s is not running after %.0f s: %s",
                self.name,
                spec.replica_id,
                self.clock.now() - began,
                reason,
            )
            timer[:] = [self.clock.call_later(_START_NOTICE_S, still_waiting)]

        timer.append(self.clock.call_later(_START_NOTICE_S, still_waiting))
        try:
            replica = await self.backend.start_replica(spec)
        finally:
            timer[0].cancel()
            self.starting.pop(spec.replica_id, None)
        if self._stopping:
            await replica.stop()
            raise EmbserveError(f"deployment {self.name!r} was stopped while a replica started")
        return replica

    def route_to(self, replicas: list[Replica]) -> None:
        self.running = replicas
        self.router.set_replicas(replicas)
        if self.on_routed is not None:
            self.on_routed()

    async def retire(self, replica: Replica, *, drain: bool = True) -> None:
        """Take ``replica`` out of routing, let its requests finish, and stop it."""
        if replica in self.running:
            self.route_to([r for r in self.running if r is not replica])
        if replica.state is ReplicaState.STOPPED:
            return
        replica.state = ReplicaState.DRAINING
        self.leaving.append(replica)
        try:
            if drain and replica.ongoing:
                try:
                    await with_timeout(
                        self.clock, replica.wait_idle(), self.config.graceful_shutdown_timeout_s
                    )
                except TimeoutError:
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

    def spawn(self, coro: Awaitable[Any]) -> None:
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

    async def deploy(self, *, keep_trying: bool = False) -> None:
        """Start the first replicas; raise DeploymentFailedError if any constructor fails.

        With ``keep_trying`` (a deploy nobody waits for) a failure is logged and the start
        retried with backoff instead, requests failing at once meanwhile.
        """
        async with self.update_lock:
            began = self.clock.now()
            target = self.target_replicas
            logger.info("starting %d replica(s) of %r", target, self.name)
            await self.scale_to(target, fail_fast=not keep_trying)
            if len(self.running) >= target:
                logger.info(
                    "%r ready: %d/%d in %.1f s",
                    self.name,
                    len(self.running),
                    target,
                    self.clock.now() - began,
                )
        self._health_task = asyncio.ensure_future(self._health_loop())
        self.configure_autoscaling()

    def wake(self) -> None:
        """A request arrived while no replica runs: an autoscaled deployment at zero starts one
        at once (instead of at the autoscaler's next tick), and the request waits for it."""
        if self._stopping or self._autoscaler is None or self.target_replicas > 0:
            return
        if not self.reconciling:
            return
        if self._autoscaler.policy.max_replicas < 1:
            return
        logger.info("deployment %s: a request arrived at zero replicas; starting one", self.name)
        self.target_replicas = 1
        self.spawn(self._wake_up())

    async def _wake_up(self) -> None:
        async with self.update_lock:
            if not self._stopping and len(self.running) < self.target_replicas:
                await self.scale_to(self.target_replicas)

    def configure_autoscaling(self) -> None:
        auto = self.config.autoscaling_config
        self._autoscaler = Autoscaler(AutoscalingPolicy.from_config(auto)) if auto else None
        if self._autoscaler is not None and self._autoscale_task is None:
            self._autoscale_task = asyncio.ensure_future(self._autoscale_loop())

    async def _autoscale_loop(self) -> None:
        while (autoscaler := self._autoscaler) is not None:
            await sleep(self.clock, autoscaler.policy.metrics_interval_s)
            if autoscaler is not self._autoscaler:
                continue  # the deployment was updated while we slept
            now = self.clock.now()
            autoscaler.observe(now, sum(r.ongoing for r in self.running) + self.router.queued)
            wanted = autoscaler.decide(now, self.target_replicas)
            if wanted != self.target_replicas and not self.update_lock.locked():
                async with self.update_lock:
                    logger.info(
                        "autoscaling %s from %d to %d replicas",
                        self.name,
                        self.target_replicas,
                        wanted,
                    )
                    self.target_replicas = wanted
                    await self.scale_to(wanted)
        self._autoscale_task = None

    async def update(
        self, deployment: Deployment, init_args: tuple[Any, ...], init_kwargs: dict[str, Any]
    ) -> None:
        """Apply a new version (see :func:`embserve._rollout.roll_out`)."""
        await roll_out(self, deployment, init_args, init_kwargs)

    def use(
        self, deployment: Deployment, init_args: tuple[Any, ...], init_kwargs: dict[str, Any]
    ) -> None:
        """Make ``deployment`` the template that new replicas (and replacements) start from."""
        self.deployment = deployment
        self.config = deployment.config
        self.init_args, self.init_kwargs = init_args, init_kwargs
        self.deployment_changed(deployment)
        self.router.max_ongoing_requests = self.config.ongoing_limit
        self.router.max_queued_requests = self.config.max_queued_requests
        self.router.max_models_per_replica = max_models_of(deployment.target)

    async def scale_to(self, count: int, *, fail_fast: bool = False) -> None:
        missing = count - len(self.running)
        if missing > 0:
            started: list[Replica] = []

            async def start_and_route() -> None:
                # Each replica serves as soon as it runs, not once all its siblings do (one
                # may wait long for resources).
                replica = await self.start_one()
                started.append(replica)
                self.unavailable = None
                self.route_to([*self.running, replica])

            results = await asyncio.gather(
                *(start_and_route() for _ in range(missing)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors and fail_fast:
                self.route_to([r for r in self.running if r not in started])
                await asyncio.gather(*(self.retire(r) for r in started))
                self.state, self.message = "UNHEALTHY", str(errors[0])
                raise errors[0]
            if errors:
                self._start_failed(errors[0], 1, 0.1)
                self.start_replacing(self.message)
                return
        elif missing < 0:
            leaving = self.running[count:]
            self.route_to(self.running[:count])  # out of routing now, drained in the background
            for replica in leaving:
                self.spawn(self.retire(replica))
        self.state, self.message = "HEALTHY", ""

    # -- failures -------------------------------------------------------------------------

    def replica_died(self, replica: Replica, reason: str) -> None:
        """A backend saw ``replica`` die: stop routing to it and start a replacement."""
        if replica not in self.running:
            return
        replica.message = reason
        self.route_to([r for r in self.running if r is not replica])
        replica.state = ReplicaState.STOPPED
        self.spawn(replica.stop())
        if self.reconciling:  # else its owner replaces it, and publishes the replacement
            self.start_replacing(reason)

    def take_over(self) -> None:
        """Reconcile the replicas routed now (another runtime started them, and left)."""
        self.reconciling = True
        if self._health_task is None and not self._stopping:
            self._health_task = asyncio.ensure_future(self._health_loop())
        self.configure_autoscaling()
        if len(self.running) < self.target_replicas:
            self.start_replacing("taking over a deployment another runtime owned")
        else:
            self.state, self.message = "HEALTHY", ""

    def step_down(self) -> None:
        """Stop reconciling (another runtime owns the deployment now); keep routing."""
        self.reconciling = False
        self._autoscaler = None
        for task in (self._health_task, self._replacing):
            if task is not None:
                task.cancel()
        self._health_task = self._replacing = None

    def start_replacing(self, reason: str) -> None:
        self.state, self.message = "UPDATING", f"replacing a replica: {reason}"
        if self._replacing is None or self._replacing.done():
            self._replacing = asyncio.ensure_future(self._replace())
            self._tasks.add(self._replacing)
            self._replacing.add_done_callback(self._task_done)

    async def _replace(self) -> None:
        delay = 0.1
        attempt = 0
        while self.reconciling and not self._stopping and len(self.running) < self.target_replicas:
            try:
                replica = await self.start_one()
            except Exception as exc:
                attempt += 1
                self._start_failed(exc, attempt, delay)
                await sleep(self.clock, delay)
                delay = min(delay * 2, _MAX_RESTART_DELAY_S)
                continue
            attempt, delay = 0, 0.1
            self.unavailable = None
            self.metrics.restarts += 1
            self.route_to([*self.running, replica])
        if not self._stopping:
            self.state, self.message = "HEALTHY", ""

    def _start_failed(self, exc: BaseException, attempt: int, delay: float) -> None:
        # Logged once per failed start, the user's traceback with it; status and callers get
        # the first line only.
        summary = (str(exc).splitlines() or [type(exc).__name__])[0]
        self.state, self.message = "UNHEALTHY", f"cannot start a replica: {summary}"
        logger.warning(
            "deployment %s: starting a replica failed (attempt %d; next try in %.1f s): %s",
            self.name,
            attempt,
            delay,
            exc,
        )
        if not self.running:
            self.unavailable = (
                f"deployment {self.name!r} has no running replica and its last start failed "
                f"({summary}); the runtime keeps retrying"
            )
            self.router.fail_waiters(self._unavailable_error)

    def _unavailable_error(self) -> BaseException:
        return DeploymentUnavailableError(self.unavailable or f"{self.name!r} is unavailable")

    async def _health_loop(self) -> None:
        while True:
            await sleep(self.clock, self.config.health_check_period_s)
            for replica in list(self.running):
                try:
                    await with_timeout(
                        self.clock,
                        replica.check_health(),
                        self.config.health_check_timeout_s,
                        self._health_timed_out,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    reason = f"health check failed: {type(exc).__name__}: {exc}"
                    logger.warning("replica %s %s", replica.replica_id, reason)
                    if replica in self.running:
                        replica.message = reason
                        self.route_to([r for r in self.running if r is not replica])
                        self.spawn(self.retire(replica))
                        self.start_replacing(reason)

    def _health_timed_out(self) -> BaseException:
        return TimeoutError(
            f"no answer within health_check_timeout_s={self.config.health_check_timeout_s}"
        )

    async def stop(self, reason: str) -> None:
        """Drain and stop every replica; fail the requests still queued with ``reason``."""
        self._stopping = True
        self._autoscaler = None
        for task in (self._health_task, self._autoscale_task):
            if task is not None:
                task.cancel()
        self.state = "DELETING"
        self.router.fail_waiters(lambda: EmbserveError(reason))
        await asyncio.gather(*(self.retire(r) for r in list(self.running)))
        for task in list(self._tasks):
            task.cancel()
        loops = [t for t in (self._health_task, self._autoscale_task) if t is not None]
        await asyncio.gather(*self._tasks, *loops, return_exceptions=True)

    # -- status ---------------------------------------------------------------------------

    def status(self) -> DeploymentStatus:
        """A snapshot of this deployment."""
        allocating = self.backend.allocating
        pending = self.backend.pending.get(self.name, "")
        replicas = [
            ReplicaStatus(rid, ReplicaState.PENDING_ALLOCATION, pending or message)
            if rid in allocating
            else ReplicaStatus(rid, ReplicaState.STARTING, message)
            for rid, message in self.starting.items()
        ]
        replicas += [
            ReplicaStatus(r.replica_id, r.state, r.message, r.ongoing, dict(r.info))
            for r in (*self.running, *self.leaving)
        ]
        state, message = self.state, self.message
        if pending and self.starting:
            message = pending
        if self.failed_update is not None and state != "DELETING":
            # Until an update succeeds, the deployment says its last one failed.
            state = "UNHEALTHY"
            message = self.failed_update if not message else f"{self.failed_update}; {message}"
        return DeploymentStatus(
            name=self.name,
            state=state,
            message=message,
            target_replicas=self.target_replicas,
            replicas=tuple(replicas),
            queued_requests=self.router.queued,
            version=self.config.version,
        )
