"""A runtime's request path: endpoint, traffic policy, deployment, then its router and replica.

Everything here runs on the runtime's event loop; the runtime hands calls over to it from other
threads and loops.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from embserve._controller import DeploymentController
from embserve._endpoint import Endpoint
from embserve._loop import start_task
from embserve.errors import EmbserveError
from embserve.handle import has_responses, resolve_responses
from embserve.replica import Call

logger = logging.getLogger("embserve.runtime")


class Dispatcher:
    """Sends each call to the deployment its endpoint's policy picks, copies it to shadows, and
    keeps the work nobody awaits (shadow requests, deploys with ``wait=False``) alive."""

    def __init__(
        self, endpoints: dict[str, Endpoint], controllers: dict[str, DeploymentController]
    ) -> None:
        self.endpoints = endpoints
        self.controllers = controllers
        self.closed = False
        self.background: set[asyncio.Task[Any]] = set()

    def controller(self, target: str) -> tuple[DeploymentController, list[str]]:
        """The deployment serving the next request to ``target``, and its shadows."""
        endpoint = self.endpoints.get(target)
        shadows: list[str] = []
        if endpoint is not None:
            name = endpoint.pick()
            if endpoint.shadow:
                shadows = endpoint.shadow_targets()
        else:
            name = target
        controller = self.controllers.get(name)
        if controller is None:
            if self.closed:
                raise EmbserveError("this runtime was shut down")
            raise EmbserveError(f"no endpoint or deployment named {target!r} is running")
        return controller, shadows

    def start(
        self,
        target: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str | None = None,
    ) -> asyncio.Future[Any]:
        """Start one call to ``target`` on the running loop; the future of its result.

        Mostly it is sent before this returns (see :meth:`DeploymentController.start`).
        """
        loop = asyncio.get_running_loop()
        if has_responses(args, kwargs):
            return start_task(loop, self.request(target, method, args, kwargs, key))
        try:
            controller, shadows = self.controller(target)
        except EmbserveError as exc:
            failed: asyncio.Future[Any] = loop.create_future()
            failed.set_exception(exc)
            return failed
        call = Call(method, args, kwargs, key=key)
        if shadows:
            self._shadow(call, shadows)
        return controller.start(call)

    async def request(
        self,
        target: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str | None = None,
    ) -> Any:
        """Serve one call to ``target`` and return its result."""
        controller, shadows = self.controller(target)
        if has_responses(args, kwargs):
            args, kwargs = await resolve_responses(args, kwargs)
        call = Call(method, args, kwargs, key=key)
        if shadows:
            self._shadow(call, shadows)
        return await controller.handle(call)

    def _shadow(self, call: Call, shadows: list[str]) -> None:
        for name in shadows:
            shadow = self.controllers.get(name)
            if shadow is not None:
                self.in_background(shadow.handle(call), f"a shadow request to {name!r}")

    async def stream(
        self,
        target: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str | None = None,
    ) -> AsyncIterator[Any]:
        """Serve one streaming call to ``target`` (shadows get no copy of streams)."""
        controller, _ = self.controller(target)
        if has_responses(args, kwargs):
            args, kwargs = await resolve_responses(args, kwargs)
        async for item in controller.stream(Call(method, args, kwargs, key=key)):
            yield item

    def in_background(self, work: Awaitable[Any], what: str, level: int = logging.DEBUG) -> None:
        """Run ``work`` that nobody awaits; log at ``level`` if it fails."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(functools.partial(self._done, what, level))

    def _done(self, what: str, level: int, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.log(level, "%s failed", what, exc_info=task.exception())

    async def end_background(self) -> None:
        """Cancel the background work and wait for it to end."""
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
