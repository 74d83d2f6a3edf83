"""A runtime's part in a namespace: it follows the registry, and publishes what it owns.

Built by the runtime when ``Runtime(namespace=...)`` is given, over the backend's
:class:`~embserve.sharing.Registry`. Every deployment of the namespace has a controller in every
runtime of it. The owner's controller reconciles as in an unshared runtime, and each change of
its replicas in routing is published (:meth:`Namespace.routed`). The others' controllers only
route: on every change the registry reports, :meth:`Namespace.sync` reads the state and adopts
the replicas published since (connecting to them directly), retires those withdrawn, applies
the endpoints' traffic, claims deployments that lost their owner and takes them over, and
steps down from those another runtime owns now. Everything here runs on the runtime's loop.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Callable, Mapping
from typing import Any

from embserve._controller import DeploymentController
from embserve._endpoint import Endpoint
from embserve.backends import Backend
from embserve.deployment import Deployment
from embserve.replica import Replica, ReplicaSpec
from embserve.sharing import Registry, SharedDeployment, SharedEndpoint

__all__ = ["Namespace"]

logger = logging.getLogger("embserve.runtime")

# How long after a failed publish it is tried again.
_REPUBLISH_S = 0.5

NewController = Callable[[Deployment, tuple[Any, ...], dict[str, Any]], DeploymentController]
_Spec = tuple[Deployment, tuple[Any, ...], dict[str, Any]]


class Namespace:
    """Keeps one runtime's deployments and endpoints in step with its namespace's registry."""

    def __init__(
        self,
        runtime_id: str,
        registry: Registry,
        backend: Backend,
        controllers: dict[str, DeploymentController],
        endpoints: dict[str, Endpoint],
        new_controller: NewController,
        make_endpoint: Callable[[str, str | None], Endpoint],
    ) -> None:
        self.runtime_id = runtime_id
        self.registry = registry
        self.backend = backend
        self.controllers = controllers
        self.endpoints = endpoints
        self._new_controller = new_controller
        self._make_endpoint = make_endpoint
        self._serial: dict[str, int] = {}  # deployment -> the serial of the spec it runs here
        self._stamps: dict[str, int] = {}  # replica id -> the serial it started from
        self._joining: set[str] = set()  # deployments this runtime is creating now
        self._publishing: dict[str, asyncio.Task[None]] = {}
        self._republish: set[str] = set()
        self._sync: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()  # one sync at a time: each adopts what it finds new
        self._joins = 0  # joins answered, so that a state read before one forgets nothing of it
        self._joined: dict[str, int] = {}
        self._again = False
        self._synced = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    async def start(self) -> None:
        """Watch the registry and take in what the namespace already runs."""
        self.registry.watch(self._changed)
        await self.sync()

    # -- what this runtime does -----------------------------------------------------------

    async def deploy(
        self, deployment: Deployment, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[DeploymentController, bool] | None:
        """Run ``deployment`` in the namespace. When this runtime owns it, the controller to
        deploy (True: new) or update, as an unshared runtime would; else None, once the
        runtime follows the owner's replicas (see :meth:`wait_ready`)."""
        import cloudpickle

        name = deployment.name
        spec = cloudpickle.dumps((deployment, args, kwargs))
        self._joining.add(name)
        try:
            entry = await self.registry.join(
                name, self.runtime_id, version=deployment.config.version, spec=spec
            )
            self._joins += 1  # a state read from now on has it
            self._joined[name] = self._joins
            controller = self.controllers.get(name)
            if entry.owner == self.runtime_id and (controller is None or controller.reconciling):
                self._serial[name] = entry.serial
                if controller is None:
                    return self._controller(deployment, args, kwargs, reconciling=True), True
                return controller, False
        finally:
            self._joining.discard(name)
        await self.sync()
        return None

    async def wait_ready(self, name: str) -> None:
        """Wait until this runtime routes to as many replicas of ``name``'s current spec as it
        should run (the caller bounds the wait)."""
        while True:
            controller = self.controllers.get(name)
            serial = self._serial.get(name)
            if controller is not None and serial is not None:
                current = [
                    r for r in controller.running if self._stamps.get(r.replica_id) == serial
                ]
                if len(current) >= controller.target_replicas:
                    return
            self._synced.clear()
            await self._synced.wait()

    async def endpoint(self, name: str, route_prefix: str | None) -> None:
        """Publish endpoint ``name`` (its traffic stays as the namespace has it)."""
        await self.registry.set_endpoint(name, route_prefix, None, None)

    async def set_traffic(
        self, name: str, traffic: Mapping[str, float], shadow: Mapping[str, float]
    ) -> None:
        """Publish ``name``'s traffic policy, for every runtime of the namespace."""
        endpoint = self.endpoints.get(name)
        route_prefix = endpoint.route_prefix if endpoint is not None else None
        await self.registry.set_endpoint(name, route_prefix, dict(traffic), dict(shadow))

    async def delete(self, name: str) -> None:
        """Remove ``name`` from the namespace (its owner stops its replicas)."""
        await self.registry.delete(name)

    async def leave(self) -> None:
        """Hand this runtime's deployments over: replicas it owns are let go of, not stopped,
        and the registry gives them to another runtime."""
        self.closed = True
        for controller in self.controllers.values():
            controller.step_down()
            for replica in controller.running:
                self.backend.set_owner(replica, False)
        for task in [*self._tasks, *self._publishing.values()]:
            task.cancel()
        if self._sync is not None:
            self._sync.cancel()
        try:
            await self.registry.leave(self.runtime_id)
        except Exception as exc:  # the registry expires this runtime's leases anyway
            logger.warning("leaving the namespace failed: %s", exc)

    # -- publishing what this runtime owns -------------------------------------------------

    def routed(self, name: str) -> None:
        """The owner's replicas of ``name`` in routing changed: publish them (coalesced)."""
        controller = self.controllers.get(name)
        if self.closed or controller is None or not controller.reconciling:
            return
        if name in self._publishing:
            self._republish.add(name)
            return
        self._publishing[name] = asyncio.ensure_future(self._publish(name))

    async def _publish(self, name: str) -> None:
        try:
            await self._publish_until_current(name)
        finally:
            # Here, not in a done callback: one runs a loop turn later, and a change routed
            # in between would be taken as seen by this publish, and never published.
            self._publishing.pop(name, None)

    async def _publish_until_current(self, name: str) -> None:
        while True:
            self._republish.discard(name)
            controller = self.controllers.get(name)
            if controller is None or not controller.reconciling:
                return
            serial = self._serial.get(name, 0)
            replicas: dict[str, Mapping[str, Any]] = {}
            for replica in controller.running:
                stamp = self._stamps.setdefault(replica.replica_id, serial)
                replicas[replica.replica_id] = {**self.backend.contact(replica), "serial": stamp}
            try:
                accepted = await self.registry.set_replicas(name, self.runtime_id, replicas)
            except Exception as exc:  # the scheduler is unreachable: try again while it is
                logger.warning("publishing the replicas of %r failed (retrying): %s", name, exc)
                await asyncio.sleep(_REPUBLISH_S)
                self._republish.add(name)
                accepted = True
            if not accepted:
                logger.warning("%r: another runtime owns it now; stepping down", name)
                self._changed()
            if name not in self._republish:
                return

    # -- following the registry -----------------------------------------------------------

    def _changed(self) -> None:
        if self.closed:
            return
        if self._sync is not None and not self._sync.done():
            self._again = True
            return
        self._sync = asyncio.ensure_future(self._sync_loop())

    async def _sync_loop(self) -> None:
        while True:
            self._again = False
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("following the namespace failed")
            if not self._again or self.closed:
                return

    async def sync(self) -> None:
        """Bring this runtime in step with the registry's state now."""
        async with self._sync_lock:
            joins = self._joins
            state = await self.registry.state()
            if self.closed:
                return
            for entry in state.deployments.values():
                if entry.name not in self._joining:
                    await self._follow(entry)
            for name in list(self._serial):
                # A deployment joined after the state was read is not in it, yet not deleted.
                if name not in state.deployments and self._joined.get(name, 0) <= joins:
                    await self._forget(name)
            for shared in state.endpoints.values():
                self._apply(shared)
        self._synced.set()

    async def _follow(self, entry: SharedDeployment) -> None:
        name = entry.name
        controller = self.controllers.get(name)
        if controller is None:
            deployment, args, kwargs = await self._spec(name)
            controller = self._controller(deployment, args, kwargs, reconciling=False)
            controller.state = "HEALTHY"
            self._serial[name] = entry.serial
        mine = entry.owner == self.runtime_id
        if entry.owner is None and not self.closed:
            mine = await self.registry.claim(name, self.runtime_id)
            if mine:
                logger.info("taking over %r in its namespace", name)
        if not mine and controller.reconciling:
            logger.info("%r is owned by %s now; following it", name, entry.owner)
            controller.step_down()
            for replica in controller.running:
                self.backend.set_owner(replica, False)
        if not (mine and controller.reconciling):
            # Following, or about to take over: route to what the registry lists, no more.
            await self._adopt(controller, entry)
        if entry.serial != self._serial.get(name):
            deployment, args, kwargs = await self._spec(name)
            self._serial[name] = entry.serial
            if mine:
                self._spawn(controller.update(deployment, args, kwargs), f"updating {name!r}")
            else:
                controller.use(deployment, args, kwargs)
                controller.target_replicas = controller.config.initial_replicas
        if mine and not controller.reconciling:
            for replica in controller.running:
                self.backend.set_owner(replica, True)
            controller.take_over()
            self.routed(name)

    async def _adopt(self, controller: DeploymentController, entry: SharedDeployment) -> None:
        known = {r.replica_id: r for r in controller.running}
        new = [(rid, c) for rid, c in entry.replicas.items() if rid not in known]
        adopted = await asyncio.gather(*(self._connect(controller, rid, c) for rid, c in new))
        found = [r for r in adopted if r is not None]
        if found:
            controller.route_to([*controller.running, *found])
        for rid, replica in known.items():
            if rid not in entry.replicas:
                controller.spawn(controller.retire(replica))

    async def _connect(
        self, controller: DeploymentController, replica_id: str, contact: Mapping[str, Any]
    ) -> Replica | None:
        spec = ReplicaSpec(
            deployment=controller.name,
            replica_id=replica_id,
            target=controller.deployment.target,
            init_args=(),
            init_kwargs={},
            config=controller.config,
            runtime_id=self.runtime_id,
        )
        try:
            replica = await self.backend.adopt(spec, contact)
        except Exception as exc:  # gone already: its owner publishes its replacement
            logger.info("cannot reach replica %s: %s", replica_id, exc)
            return None
        self._stamps[replica_id] = int(contact.get("serial", 0))
        return replica

    async def _forget(self, name: str) -> None:
        self._serial.pop(name, None)
        self.endpoints.pop(name, None)
        controller = self.controllers.pop(name, None)
        if controller is not None:
            self._spawn(controller.stop(f"deployment {name!r} was deleted"), f"deleting {name!r}")

    def _apply(self, shared: SharedEndpoint) -> None:
        endpoint = self.endpoints.get(shared.name)
        if endpoint is None:
            if shared.name not in self.controllers:
                return
            endpoint = self.endpoints[shared.name] = self._make_endpoint(
                shared.name, shared.route_prefix
            )
        endpoint.route_prefix = shared.route_prefix
        names = set(shared.traffic) | set(shared.shadow)
        if names <= set(self.controllers) and (
            dict(shared.traffic) != endpoint.traffic or dict(shared.shadow) != endpoint.shadow
        ):
            endpoint.set_traffic(shared.traffic, shared.shadow)

    async def _spec(self, name: str) -> _Spec:
        # From the registry (the scheduler), never from a client: see the Registry's contract.
        spec: _Spec = pickle.loads(await self.registry.spec(name))
        return spec

    def _controller(
        self,
        deployment: Deployment,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        reconciling: bool,
    ) -> DeploymentController:
        controller = self._new_controller(deployment, args, kwargs)
        controller.reconciling = reconciling
        controller.id_prefix = f"{self.runtime_id}-"
        name = deployment.name
        controller.on_routed = lambda: self.routed(name)
        return controller

    def _spawn(self, work: Any, what: str) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                logger.error("%s failed", what, exc_info=task.exception())

        task.add_done_callback(done)
