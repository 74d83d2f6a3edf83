"""The Runtime: the in-process control plane that runs applications and routes their calls."""

from __future__ import annotations

import asyncio
import atexit
import functools
import importlib
import logging
import random
import threading
import uuid
import weakref
from collections.abc import Awaitable, Coroutine, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from embserve._controller import DeploymentController
from embserve._deploy import Deployer
from embserve._dispatch import Dispatcher
from embserve._endpoint import Endpoint
from embserve._http import HTTPServer, start_http
from embserve._loop import (
    ASYNCIO_NAMES,
    NESTING,
    LoopThread,
    check_loop,
    loop_factory,
    running_loop,
    start_from_loop,
    stop_runners,
    thread_ident,
)
from embserve.backends import Backend, resolve_backend
from embserve.clock import Clock
from embserve.deployment import Application, Deployment
from embserve.errors import EmbserveError
from embserve.handle import Handle, register_submitter, unregister_submitter
from embserve.metrics import scrape
from embserve.replica import Replica
from embserve.request import Request
from embserve.response import (
    Response,
    ResponseStream,
    deferred,
    start_threadsafe,
    start_unstarted,
)
from embserve.snapshot import EndpointStatus, RuntimeStatus

__all__ = ["Runtime"]

logger = logging.getLogger("embserve.runtime")

if TYPE_CHECKING:
    from embserve._shared import Namespace

T = TypeVar("T")


class Runtime:
    """Holds deployments and endpoints, keeps their replicas running, and routes calls.

    ``with Runtime() as rt:`` runs it on an event loop in a thread of its own (for sync code and
    foreign loops); ``async with Runtime() as rt:`` runs it on the caller's loop, so async callers
    on that loop reach in-thread replicas with no thread hop. A runtime used without either starts
    on first use in a thread of its own, and stops at interpreter exit. Every blocking method is
    safe from any thread but the runtime's loop, where its ``*_async`` twin is to be awaited.

    Args:
        backend: ``"local"`` (default: replicas in this process), ``"process"``,
            ``"dask://host:port"``, or a :class:`~embserve.backends.Backend` instance.
        name: the runtime's id, used in handles and logs (default: random).
        seed: seeds the random choices of routers and traffic policies (for tests).
        clock: where deadlines, health-check periods, restart backoff and autoscaling read
            the time (default: the runtime's event loop); tests pass a simulated
            :class:`~embserve.clock.Clock`.
        namespace: share deployments with the other runtimes of this namespace on the same
            cluster (a backend whose ``shares_replicas`` it makes true: the Dask backend): the
            first to run a deployment starts its replicas, the others attach and route to
            them directly; see docs/scaling.md. ValueError at start for other backends.
        loop: the event loop of a runtime in a thread of its own: ``"auto"`` (default: uvloop's
            where it is installed and the backend is the in-thread one, else asyncio's, whose
            selector the process and Dask backends poll for answers), ``"asyncio"`` or
            ``"uvloop"`` (ValueError at start where it is not installed). A runtime started on
            the caller's loop (``async with``) runs on that loop.
    """

    def __init__(
        self,
        backend: str | Backend | None = "local",
        *,
        name: str | None = None,
        seed: int | None = None,
        clock: Clock | None = None,
        namespace: str | None = None,
        loop: str = "auto",
    ) -> None:
        check_loop(loop)
        self._loop_kind = loop
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
        self.id = name or f"rt-{uuid.uuid4().hex[:8]}"
        self.namespace = namespace
        self._shared: Namespace | None = None
        self._clock = clock
        self._backend_spec = backend
        self._backend: Backend | None = None
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: LoopThread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._controllers: dict[str, DeploymentController] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._servers: list[HTTPServer] = []
        self._dispatch = Dispatcher(self._endpoints, self._controllers)
        self._deployer = Deployer(
            self.id,
            self._controllers,
            self._endpoints,
            self._dispatch,
            lambda: self.backend,
            rng=self._rng,
            clock=clock,
        )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def backend_spec(self) -> str | Backend | None:
        """The backend as given to the constructor (a name, an address or a Backend)."""
        return self._backend_spec

    @property
    def backend(self) -> Backend:
        """The backend replicas run on (available once the runtime started)."""
        if self._backend is None:
            raise EmbserveError("the runtime has not started")
        return self._backend

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the runtime runs on, once started."""
        return self._loop

    def start(self) -> Runtime:
        """Start on an event loop in a thread of its own (does nothing if already started)."""
        with self._start_lock:
            if self._closed:
                raise EmbserveError("this runtime was shut down; create a new one")
            if self._loop is not None:
                return self
            kind = self._loop_kind
            if kind == "auto" and not _in_thread(self._backend_spec):
                # Replicas in other processes answer over sockets, and the loop polls a moment
                # for their answers (busy_poll_s), which takes asyncio's selector: uvloop has
                # none, and without the polls their calls take longer than uvloop saves.
                kind = "asyncio"
            thread = LoopThread(f"embserve-{self.id}", loop_factory(kind))
            try:
                thread.run(self._start_on_loop())
            except BaseException:
                thread.stop()
                raise
            self._thread, self._loop = thread, thread.loop
            _running.add(self)
            return self

    async def start_async(self) -> Runtime:
        """Start on the running event loop (does nothing if already started)."""
        with self._start_lock:
            if self._closed:
                raise EmbserveError("this runtime was shut down; create a new one")
            if self._loop is not None:
                return self
            self._loop = asyncio.get_running_loop()
        try:
            await self._start_on_loop()
        except BaseException:
            self._loop = None
            raise
        return self

    async def _start_on_loop(self) -> None:
        backend = resolve_backend(self._backend_spec)
        if self.namespace is not None:
            backend.use_namespace(self.namespace)
        await backend.start(self._replica_died)
        self._backend = backend
        register_submitter(self.id, self)
        if self.namespace is not None:
            from embserve._shared import Namespace

            try:
                registry = await backend.open_registry(self.id)
                shared = Namespace(
                    self.id,
                    registry,
                    backend,
                    self._controllers,
                    self._endpoints,
                    self._deployer.new_controller,
                    lambda name, prefix: Endpoint(name, prefix, {name: 1.0}, rng=self._rng),
                )
                await shared.start()
            except BaseException:
                unregister_submitter(self.id)
                await backend.close()
                raise
            self._shared = self._deployer.namespace = shared

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    async def __aenter__(self) -> Runtime:
        return await self.start_async()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown_async()

    def shutdown(self) -> None:
        """Drain every deployment, stop every replica and the runtime's thread (if it has one)."""
        loop = self._loop
        if self._closed or loop is None:
            self._closed = True
            return
        if running_loop() is loop:
            raise RuntimeError("shutdown() would block the runtime's loop; await shutdown_async()")
        if loop.is_closed():
            self._closed = True
            return
        asyncio.run_coroutine_threadsafe(self.shutdown_async(), loop).result()
        if self._thread is not None:
            self._thread.stop()
        _running.discard(self)

    async def shutdown_async(self) -> None:
        """Drain every deployment and stop every replica."""
        if self._closed:
            return
        self._closed = True
        # Servers first, so that the requests they still hold finish before the drain.
        await asyncio.gather(*(server.stop_async() for server in self._servers))
        if self._shared is not None:
            await self._shared.leave()
        unregister_submitter(self.id)
        self._dispatch.closed = True
        self._endpoints.clear()
        controllers = list(self._controllers.values())
        self._controllers.clear()
        await asyncio.gather(*(c.stop("the runtime is shutting down") for c in controllers))
        await self._dispatch.end_background()
        if self._backend is not None:
            await self._backend.close()
        loop = asyncio.get_running_loop()
        start_unstarted(loop)  # calls from threads not started yet: they fail, shut down
        await stop_runners(loop)

    def _blocking(self, make: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            make.close()
            raise EmbserveError("this runtime was shut down; create a new one")
        if self._loop is None:
            try:
                self.start()
            except BaseException:
                make.close()
                raise
        loop = self._loop
        assert loop is not None
        if running_loop() is loop:
            make.close()
            raise RuntimeError(
                "this blocking call would deadlock the runtime's event loop; "
                "await its *_async twin instead"
            )
        return asyncio.run_coroutine_threadsafe(make, loop).result()

    async def _ensure_started_async(self) -> None:
        if self._loop is None:
            await self.start_async()
        elif running_loop() is not self._loop:
            raise RuntimeError(
                "this runtime runs on another event loop; use its blocking methods from here"
            )
        if self._closed:
            raise EmbserveError("this runtime was shut down; create a new one")

    # -- applications ---------------------------------------------------------------------

    def run(
        self,
        app: Application | Deployment,
        *,
        name: str | None = None,
        route_prefix: str | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> Handle:
        """Deploy ``app`` (and the deployments it binds) behind an endpoint; return its handle.

        ``name`` names the ingress deployment and its endpoint (default: the deployment's name);
        ``route_prefix`` defaults to the deployment's own (``@deployment(route_prefix=...)``).
        Running a name again updates it: in place when its ``version`` is unchanged, else as a
        rolling update that drops no request. Waits until the replicas run unless ``wait`` is
        False; replicas that run serve requests while their siblings still wait for resources.
        Raises :class:`~embserve.DeploymentFailedError` when a constructor fails, and
        :class:`~embserve.DeploymentTimeoutError` (a ``TimeoutError``) naming what is short when
        ``timeout_s`` passes first; the deployment then stays, and goes on starting.
        """
        return self._blocking(
            self.run_async(
                app, name=name, route_prefix=route_prefix, wait=wait, timeout_s=timeout_s
            )
        )

    async def run_async(
        self,
        app: Application | Deployment,
        *,
        name: str | None = None,
        route_prefix: str | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> Handle:
        """The awaitable twin of :meth:`run`."""
        await self._ensure_started_async()
        if isinstance(app, Deployment):
            app = app.bind()
        if not isinstance(app, Application):
            raise TypeError(f"run() takes an Application (Deployment.bind(...)), got {app!r}")
        if route_prefix is None:
            route_prefix = app.deployment.config.route_prefix
        return await self._deployer.run(
            app, name or app.deployment.name, route_prefix, wait=wait, timeout_s=timeout_s
        )

    def get_handle(self, name: str) -> Handle:
        """A handle to the endpoint or deployment called ``name`` (in a namespace: run by any
        of its runtimes)."""
        unknown = name not in self._endpoints and name not in self._controllers
        if unknown and self._shared is not None and running_loop() is not self._loop:
            self._blocking(self._shared.sync())  # started elsewhere a moment ago?
        if name not in self._endpoints and name not in self._controllers:
            known = sorted({*self._endpoints, *self._controllers})
            raise KeyError(f"no endpoint or deployment named {name!r}; known: {known}")
        return Handle(self.id, name)

    def delete(self, name: str) -> None:
        """Remove the endpoint and deployment called ``name``, draining its replicas.

        Refused (:class:`~embserve.EmbserveError`, naming them) while another endpoint's
        traffic or shadows still point at the deployment.
        """
        self._blocking(self.delete_async(name))

    async def delete_async(self, name: str) -> None:
        """The awaitable twin of :meth:`delete`."""
        await self._ensure_started_async()
        users = sorted(
            endpoint.name
            for endpoint in self._endpoints.values()
            if endpoint.name != name and name in endpoint.deployments
        )
        if users:
            raise EmbserveError(
                f"deployment {name!r} still gets traffic from endpoint(s) {users}: move it away "
                f"first (rt.set_traffic), or delete the endpoint(s)"
            )
        if self._shared is not None:
            await self._shared.delete(name)
        self._endpoints.pop(name, None)
        controller = self._controllers.pop(name, None)
        if controller is not None:
            await controller.stop(f"deployment {name!r} was deleted")

    def set_traffic(
        self,
        endpoint: str,
        traffic: Mapping[str, float],
        *,
        shadow: Mapping[str, float] | None = None,
    ) -> None:
        """Split ``endpoint``'s requests over deployments by weight, and copy shares to shadows.

        ``rt.set_traffic("clf", {"clf": 0.9, "clf-v2": 0.1}, shadow={"clf-v3": 0.05})``. The
        change is atomic: each request follows the old or the new policy, and none is dropped.
        """
        self._blocking(self.set_traffic_async(endpoint, traffic, shadow=shadow))

    async def set_traffic_async(
        self,
        endpoint: str,
        traffic: Mapping[str, float],
        *,
        shadow: Mapping[str, float] | None = None,
    ) -> None:
        """The awaitable twin of :meth:`set_traffic`."""
        await self._ensure_started_async()
        target = self._endpoints.get(endpoint)
        if target is None:
            raise KeyError(f"no endpoint named {endpoint!r}")
        missing = sorted((set(traffic) | set(shadow or {})) - set(self._controllers))
        if missing:
            raise KeyError(f"set_traffic names deployments that are not running: {missing}")
        target.set_traffic(traffic, shadow or {})
        if self._shared is not None:  # checked here first, then routed by every runtime
            await self._shared.set_traffic(endpoint, traffic, shadow or {})

    def status(self) -> RuntimeStatus:
        """A typed snapshot of deployments, replicas and endpoints (safe from any thread)."""
        backend = self._backend.describe() if self._backend is not None else "not started"
        return RuntimeStatus(
            backend=backend,
            deployments={name: c.status() for name, c in list(self._controllers.items())},
            endpoints={
                name: EndpointStatus(name, e.route_prefix, dict(e.traffic), dict(e.shadow))
                for name, e in list(self._endpoints.items())
            },
        )

    def metrics(self) -> str:
        """This runtime's metrics in the Prometheus text format (what ``/-/metrics`` serves).

        Families: ``embserve_requests`` (by outcome), ``embserve_request_duration_seconds``,
        ``embserve_queue_wait_seconds``, ``embserve_execution_seconds``,
        ``embserve_ongoing_requests``, ``embserve_queued_requests``, ``embserve_replicas`` (by
        state), ``embserve_batch_size``, ``embserve_shadow_requests``,
        ``embserve_replica_restarts``, ``embserve_model_loads``. Needs ``prometheus-client``.
        """
        return self._blocking(self.metrics_async())

    async def metrics_async(self) -> str:
        """The awaitable twin of :meth:`metrics`."""
        await self._ensure_started_async()
        return await scrape(self.status(), list(self._controllers.values()))

    def routes(self) -> dict[str, str]:
        """The HTTP routes: route prefix → endpoint name. Safe from any thread.

        What the ASGI adapter routes by. What depends on the deployment (streaming, allowed
        HTTP methods) is decided per request, for the deployment the traffic policy chose.
        """
        return {
            endpoint.route_prefix: name
            for name, endpoint in list(self._endpoints.items())
            if endpoint.route_prefix is not None
        }

    def asgi_app(self, **options: Any) -> Any:
        """An ASGI app serving this runtime's endpoints (needs ``embserve-asgi``)."""
        try:
            adapter = importlib.import_module("embserve_asgi")
        except ImportError:
            from embserve._install import install_command

            raise EmbserveError(
                f"serving over HTTP needs the ASGI adapter: {install_command('asgi')}"
            ) from None
        return adapter.App(runtime=self, **options)

    def serve_http(self, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> HTTPServer:
        """Serve this runtime's endpoints that have a route prefix over HTTP, until stopped.

        The server ``embserve run`` uses (needs ``embserve-asgi``), on the runtime's event loop:
        ``server = rt.serve_http(port=0)``; ``server.url``; ``server.stop()``. The port is bound
        before this returns (``port=0`` picks a free one); shutting the runtime down stops it.
        ``options`` go to :func:`embserve_asgi.server.serve` (``keep_alive_timeout_s``, ...). A
        runtime never serves HTTP unless asked to.
        """
        if self._closed:
            raise EmbserveError("this runtime was shut down; create a new one")
        if self._loop is None:
            self.start()
        assert self._loop is not None
        server = start_http(self.asgi_app(), self._loop, host, port, **options)
        self._servers = [s for s in self._servers if s.running] + [server]
        return server

    # -- the request path -----------------------------------------------------------------

    def submit(self, request: Request) -> Any:
        """Start ``request`` (what ``Handle.remote`` and the ASGI adapter do), from any thread.

        Returns a :class:`~embserve.ResponseStream` when ``request.stream`` is true, else a
        :class:`~embserve.Response`. With ``request.stream`` None the deployment the traffic
        policy chose decides, and the response's result is a ``ResponseStream`` when it
        streams.
        """
        loop = self._loop
        if loop is None or self._closed:
            if self._closed:
                raise EmbserveError("this runtime was shut down; create a new one")
            self.start()
            loop = self._loop
            assert loop is not None
        dispatch = self._dispatch
        if request.stream:
            return ResponseStream(functools.partial(dispatch.stream, request), loop)
        # On the runtime's loop, mostly told by its thread id without a call (see thread_ident).
        if (
            getattr(loop, "_thread_id", None) == thread_ident() and NESTING not in ASYNCIO_NAMES
        ) or (caller := running_loop()) is loop:
            return Response(dispatch.start(request, loop), loop)
        if caller is None and request.stream is False and dispatch.may_run_here(request):
            return deferred(loop, dispatch, request)  # sync code: may run in this thread
        start = functools.partial(dispatch.start, request, loop)
        if caller is not None:  # a coroutine on another loop: no thread-safe future between
            return Response(start_from_loop(loop, caller, start), caller)
        return Response(start_threadsafe(loop, start), loop)

    def call_async(self, request: Request) -> Awaitable[Any]:
        """Serve ``request`` in the calling task, which must run on the runtime's loop: await
        what this returns at once (``result = await rt.call_async(request)``).

        :meth:`submit`'s path without a task or future of its own: what an adapter serving
        requests on the runtime's loop uses; cancelling the caller cancels the request. The
        result is a :class:`~embserve.ResponseStream` when ``request.stream`` is None and the
        chosen deployment streams.
        """
        loop = running_loop()
        if self._closed or loop is not self._loop:
            if self._closed:
                raise EmbserveError("this runtime was shut down; create a new one")
            raise RuntimeError("call_async() runs on the runtime's loop only; use submit()")
        return self._dispatch.serve(request, loop)

    def _replica_died(self, replica: Replica, reason: str) -> None:
        controller = self._controllers.get(replica.deployment)
        if controller is not None:
            controller.replica_died(replica, reason)

    def __repr__(self) -> str:
        return f"Runtime(id={self.id!r}, backend={self._backend_spec!r})"


def _in_thread(backend: str | Backend | None) -> bool:
    # Whether the backend keeps replicas in this process, on the runtime's loop.
    from embserve.local import LocalBackend

    return backend is None or backend == "local" or isinstance(backend, LocalBackend)


# Runtimes with a thread of their own, stopped at exit so no replica outlives the interpreter.
_running: weakref.WeakSet[Runtime] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for runtime in list(_running):
        try:
            runtime.shutdown()
        except Exception:  # exiting: report and go on
            logger.exception("shutting down %r at exit failed", runtime)
