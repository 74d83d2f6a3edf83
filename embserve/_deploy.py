"""Deploying an application: its graph of bound deployments, their controllers, its endpoint.

:meth:`Runtime.run <embserve.Runtime.run>` hands an :class:`~embserve.Application` to
:meth:`Deployer.run`, which walks the graph (the deployments it binds first, so that each
arrives in its caller's constructor as a handle), starts or updates a controller for each, and
routes the ingress endpoint from the start, so that replicas serve as soon as they run.
Everything here runs on the runtime's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from embserve._controller import DeploymentController
from embserve._dispatch import Dispatcher
from embserve._endpoint import Endpoint
from embserve._serve import with_timeout
from embserve.backends import Backend
from embserve.clock import Clock, LoopClock
from embserve.deployment import Application, Deployment
from embserve.errors import DeploymentTimeoutError
from embserve.handle import Handle

if TYPE_CHECKING:
    from embserve._shared import Namespace

__all__ = ["Deployer"]


class Deployer:
    """Deploys applications into one runtime's deployments and endpoints."""

    def __init__(
        self,
        runtime_id: str,
        controllers: dict[str, DeploymentController],
        endpoints: dict[str, Endpoint],
        dispatch: Dispatcher,
        backend: Callable[[], Backend],
        *,
        rng: random.Random,
        clock: Clock | None,
    ) -> None:
        self.runtime_id = runtime_id
        self.controllers = controllers
        self.endpoints = endpoints
        self.dispatch = dispatch
        self.backend = backend
        self.rng = rng
        self.clock = clock
        #: The namespace this runtime shares deployments in, once started (None: unshared).
        self.namespace: Namespace | None = None

    async def run(
        self,
        app: Application,
        ingress: str,
        route_prefix: str | None,
        *,
        wait: bool,
        timeout_s: float | None,
    ) -> Handle:
        """Deploy ``app`` behind the endpoint ``ingress``; see :meth:`Runtime.run`."""
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if route_prefix is not None:
            if not isinstance(route_prefix, str) or not route_prefix.startswith("/"):
                raise ValueError(f"route_prefix must start with '/', got {route_prefix!r}")
            for other in self.endpoints.values():
                if other.route_prefix == route_prefix and other.name != ingress:
                    raise ValueError(f"route prefix {route_prefix!r} is used by {other.name!r}")
        work = self._run(app, ingress, route_prefix, wait)
        if timeout_s is None:
            return await work
        task = asyncio.ensure_future(work)
        clock = self.clock or LoopClock(asyncio.get_running_loop())
        try:
            handle: Handle = await with_timeout(clock, asyncio.shield(task), timeout_s)
        except TimeoutError:
            if task.done():  # the deploy itself raised it
                raise
            self.dispatch.in_background(task, f"deploying {ingress!r}", logging.ERROR)
            raise self._timed_out(app, ingress, timeout_s) from None
        return handle

    async def _run(
        self, app: Application, ingress: str, route_prefix: str | None, wait: bool
    ) -> Handle:
        endpoint = self.endpoints.get(ingress)
        if endpoint is None:
            # Routed from the start, so that replicas serve as soon as they run.
            endpoint = Endpoint(ingress, route_prefix, {ingress: 1.0}, rng=self.rng)
            self.endpoints[ingress] = endpoint
        elif route_prefix is not None:
            endpoint.route_prefix = route_prefix
        handles: dict[int, Handle] = {}
        try:
            for node in app.walk():
                if id(node) in handles:
                    continue
                name = ingress if node is app else node.deployment.name
                args = tuple(_bound(a, handles) for a in node.args)
                kwargs = {k: _bound(v, handles) for k, v in node.kwargs.items()}
                deployment = node.deployment
                if deployment.name != name or deployment.config.app_name != ingress:
                    config = dataclasses.replace(deployment.config, app_name=ingress)
                    deployment = Deployment(deployment.target, name, config)
                await self._deploy(deployment, args, kwargs, wait=wait)
                handles[id(node)] = Handle(self.runtime_id, name)
        except BaseException:
            if ingress not in self.controllers and self.endpoints.get(ingress) is endpoint:
                del self.endpoints[ingress]
            raise
        if self.namespace is not None:
            await self.namespace.endpoint(ingress, endpoint.route_prefix)
        return Handle(self.runtime_id, ingress)

    def _timed_out(self, app: Application, ingress: str, timeout_s: float) -> BaseException:
        names = {ingress if node is app else node.deployment.name for node in app.walk()}
        short = []
        for name in sorted(names):
            controller = self.controllers.get(name)
            if controller is None:
                short.append(f"{name}: not started")
                continue
            status = controller.status()
            if status.running_replicas < status.target_replicas:
                why = f": {status.message}" if status.message else ""
                short.append(
                    f"{name}: {status.running_replicas}/{status.target_replicas} "
                    f"replicas running{why}"
                )
        return DeploymentTimeoutError(
            f"{ingress!r} was not running within timeout_s={timeout_s} "
            f"({'; '.join(short) or 'still starting'}); it goes on starting in the background"
        )

    async def _deploy(
        self,
        deployment: Deployment,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        wait: bool,
    ) -> None:
        if self.namespace is not None:
            owned = await self.namespace.deploy(deployment, args, kwargs)
            if owned is None:  # another runtime owns it: this one follows its replicas
                if wait:
                    await self.namespace.wait_ready(deployment.name)
                return
            controller, created = owned
        else:
            found = self.controllers.get(deployment.name)
            created = found is None
            controller = found or self.new_controller(deployment, args, kwargs)
        if created:
            work = controller.deploy(keep_trying=not wait)
        else:
            work = controller.update(deployment, args, kwargs)
        if not wait:
            self.dispatch.in_background(work, f"deploying {deployment.name!r}", logging.ERROR)
            return
        try:
            await work
        except BaseException:
            if created and not controller.running:
                # A first deploy that failed leaves nothing behind; a failed update keeps
                # the deployment, replaced from its last good version.
                self.controllers.pop(deployment.name, None)
                await controller.stop(f"deployment {deployment.name!r} failed to start")
            raise

    def new_controller(
        self, deployment: Deployment, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> DeploymentController:
        """A controller for ``deployment``, known to the runtime from now on."""
        controller = DeploymentController(
            deployment,
            args,
            kwargs,
            backend=self.backend(),
            runtime_id=self.runtime_id,
            clock=self.clock,
        )
        controller.router.rng = self.rng
        self.controllers[deployment.name] = controller
        return controller


def _bound(value: Any, handles: dict[int, Handle]) -> Any:
    # A bound deployment among the constructor arguments arrives as a handle to it.
    if isinstance(value, Application):
        return handles[id(value)]
    return value
