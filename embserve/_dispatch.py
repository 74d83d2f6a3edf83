"""A runtime's request path: endpoint, traffic policy, deployment, then its router and replica.

Every way in (handles from any thread or loop, HTTP, shadow copies, calls made inside replicas)
hands a :class:`~embserve.request.Request` to :meth:`Dispatcher.start` or
:meth:`Dispatcher.stream`. Everything here runs on the runtime's event loop; the runtime hands
requests over to it from other threads and loops.
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
from embserve.request import Request
from embserve.response import (
    NOT_HERE,
    Response,
    ResponseStream,
    has_responses,
    resolve_responses,
)

logger = logging.getLogger("embserve.runtime")
_NO_SHADOWS: list[str] = []  # shared, never changed: most requests have no shadow


class Dispatcher:
    """Sends each request to the deployment its endpoint's policy picks, copies it to shadows,
    and keeps the work nobody awaits (shadow requests, deploys with ``wait=False``) alive."""

    def __init__(
        self, endpoints: dict[str, Endpoint], controllers: dict[str, DeploymentController]
    ) -> None:
        self.endpoints = endpoints
        self.controllers = controllers
        self.closed = False
        self.background: set[asyncio.Future[Any]] = set()

    def controller(
        self, target: str, routing_key: str | None = None
    ) -> tuple[DeploymentController, list[str]]:
        """The deployment serving the next request to ``target``, and its shadows."""
        endpoint = self.endpoints.get(target)
        shadows = _NO_SHADOWS
        if endpoint is not None:
            name = endpoint.pick(routing_key)
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
        self, request: Request, loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Future[Any]:
        """Start ``request`` on the running loop (``loop``, when the caller has it at hand);
        the future of its result.

        With ``request.stream`` None, the deployment the policy chose decides: when its method
        is a generator the future's result is a :class:`~embserve.ResponseStream` of the items.
        Mostly the request is sent before this returns (see :meth:`RequestPath.start`).
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        for value in request.args:  # has_responses(), without its call for the usual request
            if isinstance(value, Response):
                return start_task(loop, self._resolve_and_serve(request))
        if request.kwargs and has_responses((), request.kwargs):
            return start_task(loop, self._resolve_and_serve(request))
        try:
            only = self._only(request)
            if only is not None:
                return only.start(request, loop)
            controller, shadows = self.controller(request.target, request.routing_key)
            if request.http_method is None and request.stream is not None and not shadows:
                return controller.start(request, loop)  # the usual handle call: nothing to decide
            route = self._decide(request, controller, shadows, loop)
        except EmbserveError as exc:
            failed: asyncio.Future[Any] = loop.create_future()
            failed.set_exception(exc)
            return failed
        if isinstance(route, ResponseStream):
            done: asyncio.Future[Any] = loop.create_future()
            done.set_result(route)
            return done
        return route.start(request, loop)

    def may_run_here(self, request: Request) -> bool:
        """Whether ``request``, from a plain thread, may run in that thread: its endpoint sends
        everything to one deployment, with no shadow, and that deployment
        :meth:`~RequestPath.runs_here` its method (a hint: :meth:`call_here` decides)."""
        endpoint = self.endpoints.get(request.target)
        if endpoint is None:
            name = request.target
        elif endpoint.shadow or endpoint.single is None:
            return False
        else:
            name = endpoint.single
        controller = self.controllers.get(name)
        return controller is not None and controller.runs_here(request.method)

    def call_here(self, request: Request, loop: asyncio.AbstractEventLoop) -> Any:
        """From a plain thread: serve ``request`` in it (see :meth:`RequestPath.call_here`), or
        return :data:`~embserve.response.NOT_HERE`. Requests with shadows, or with responses
        among their arguments, go through the loop."""
        if self.closed or has_responses(request.args, request.kwargs):
            return NOT_HERE
        try:
            controller, shadows = self.controller(request.target, request.routing_key)
        except EmbserveError:
            return NOT_HERE  # the loop's path raises it
        if shadows or controller.streams(request.method):
            return NOT_HERE
        return controller.call_here(request, loop)

    def serve(
        self, request: Request, loop: asyncio.AbstractEventLoop | None = None
    ) -> Awaitable[Any]:
        """What serves ``request`` in the calling task (on the running loop: ``loop``, when
        the caller has it at hand), to await at once there (see :meth:`RequestPath.serve`);
        raises at once what the traffic policy raises."""
        if has_responses(request.args, request.kwargs):
            return self._resolve_and_serve(request)
        if loop is None:
            loop = asyncio.get_running_loop()
        only = self._only(request)
        if only is not None:
            return only.serve(request, loop)
        route = self._route(request, loop)
        if isinstance(route, ResponseStream):
            done: asyncio.Future[Any] = loop.create_future()
            done.set_result(route)
            return done
        return route.serve(request, loop)

    async def _resolve_and_serve(self, request: Request) -> Any:
        request.args, request.kwargs = await resolve_responses(request.args, request.kwargs)
        return await self.serve(request)

    def _only(self, request: Request) -> DeploymentController | None:
        # The usual request: its endpoint sends everything to one deployment, with no shadow.
        # That deployment, with what depends on it decided as _decide would (the HTTP methods
        # it answers, whether the request streams), or None for the general path (which also
        # takes the requests that turn out to stream). Raises MethodNotAllowedError.
        endpoint = self.endpoints.get(request.target)
        if endpoint is None or endpoint.single is None or endpoint.shadow:
            return None
        controller = self.controllers.get(endpoint.single)
        if controller is None:
            return None
        if request.http_method is not None:
            controller.check_http_method(request.http_method)
        if request.stream is None:
            if controller.streams(request.method):
                return None
            request.stream = False
        return controller

    def _route(
        self, request: Request, loop: asyncio.AbstractEventLoop
    ) -> DeploymentController | ResponseStream:
        # The traffic policy's choice, and what depends on the deployment it chose.
        controller, shadows = self.controller(request.target, request.routing_key)
        return self._decide(request, controller, shadows, loop)

    def _decide(
        self,
        request: Request,
        controller: DeploymentController,
        shadows: list[str],
        loop: asyncio.AbstractEventLoop,
    ) -> DeploymentController | ResponseStream:
        # What depends on the deployment chosen: the HTTP methods it answers, whether the
        # request streams. Shadows get their copies here.
        if request.http_method is not None:
            controller.check_http_method(request.http_method)
        if request.stream is None:
            request.stream = controller.streams(request.method)
            if request.stream:
                return ResponseStream(functools.partial(controller.stream, request), loop)
        if shadows:
            self._shadow(request, shadows)
        return controller

    def _shadow(self, request: Request, shadows: list[str]) -> None:
        for name in shadows:
            shadow = self.controllers.get(name)
            if shadow is None:
                continue
            shadow.metrics.shadow_requests += 1
            copy = shadow.start(request.copy())
            self.background.add(copy)
            copy.add_done_callback(functools.partial(self._done, f"a shadow request to {name!r}"))

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        """Serve one streaming request (shadows get no copy of streams)."""
        if has_responses(request.args, request.kwargs):
            request.args, request.kwargs = await resolve_responses(request.args, request.kwargs)
        controller, _ = self.controller(request.target, request.routing_key)
        async for item in controller.stream(request):
            yield item

    def in_background(self, work: Awaitable[Any], what: str, level: int = logging.DEBUG) -> None:
        """Run ``work`` that nobody awaits; log at ``level`` if it fails."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(functools.partial(self._done, what, level=level))

    def _done(self, what: str, future: asyncio.Future[Any], level: int = logging.DEBUG) -> None:
        self.background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            logger.log(level, "%s failed", what, exc_info=future.exception())

    async def end_background(self) -> None:
        """Cancel the background work and wait for it to end."""
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
