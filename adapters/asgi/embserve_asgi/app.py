"""The ASGI 3 app that serves a runtime's endpoints over HTTP.

``App({"/clf": Classifier.bind()})`` owns a runtime: the server's lifespan starts it on the
server's event loop (so requests reach in-thread replicas with no thread hop) and drains it at
shutdown. Mounted under Starlette or FastAPI, whose mounts run no lifespan, it starts on the first
request instead (or pass :meth:`App.lifespan` to the host app). ``rt.asgi_app()`` serves the
endpoints of a runtime that the caller runs, found by their ``route_prefix``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from embserve.backends import Backend
from embserve.deployment import Application
from embserve.errors import EmbserveError, HTTPError
from embserve.handle import ResponseStream
from embserve.request import Request, new_request_id
from embserve.runtime import Runtime
from embserve_asgi.admin import (
    UNGUARDED,
    EndpointMetrics,
    admin_response,
    authorized,
    metrics_response,
    prometheus_text,
    resolve_admin_token,
    unauthorized,
)
from embserve_asgi.connection import (
    DisconnectWatch,
    DisconnectWatchers,
    abandon,
    discard_body,
    iterate,
)
from embserve_asgi.requests import (
    ROUTING_HEADERS,
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    RequestSnapshot,
    apply_routing_headers,
    read_body,
)
from embserve_asgi.responses import (
    Cancelled,
    chunk_bytes,
    error_response,
    is_stream,
    logger,
    send_plain,
    stream_media_type,
    to_response,
)
from embserve_asgi.routing import Route, check_routes, route_path

__all__ = ["App"]

T = TypeVar("T")
# How long the answer to a request cut at shutdown may take to go out.
_LAST_ANSWER_S = 1.0

DEFAULT_MAX_BODY_SIZE = 16 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
ROUTE_REFRESH_S = 1.0


class App:
    """An ASGI 3 application serving embserve endpoints over HTTP.

    Args:
        routes: route prefix → :class:`~embserve.Application` to deploy under it. Each is run as
            an endpoint named after its deployment (``.options(name=...)`` to rename).
        runtime: serve this runtime instead of one the App owns; its endpoints that have a
            ``route_prefix`` are served too. The caller starts and stops it.
        backend: the backend of the runtime the App owns (``"local"``, ``"process"``, ...).
        max_body_size: larger request bodies are refused with 413 before they are read whole.
        body_timeout_s: a request body must arrive whole within this many seconds of the
            request's start, else 408 and the connection closes (None: no limit).
        admin: serve ``/-/healthz`` (alive), ``/-/ready`` (every route has a running replica),
            ``/-/routes``, ``/-/status`` and ``/-/metrics``.
        admin_token: when set, every admin page but ``/-/healthz`` needs the header
            ``Authorization: Bearer <admin_token>`` (else 401). None (the default) takes the
            environment variable ``EMBSERVE_ADMIN_TOKEN``; ``""`` means no token, whatever the
            environment says.

    A deployment limits the HTTP methods it answers with an ``http_methods`` attribute on its
    class or function (``http_methods = ("POST",)``); others get 405.
    """

    def __init__(
        self,
        routes: Mapping[str, Application] | None = None,
        *,
        runtime: Runtime | None = None,
        backend: str | Backend | None = "local",
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S,
        admin: bool = True,
        admin_token: str | None = None,
        namespace: str | None = None,
    ) -> None:
        if isinstance(max_body_size, bool) or not isinstance(max_body_size, int):
            raise TypeError(f"max_body_size must be an int, got {max_body_size!r}")
        if max_body_size < 0:
            raise ValueError(f"max_body_size must be >= 0, got {max_body_size}")
        self._deploy = check_routes(routes or {}, admin=admin)
        self._owns = runtime is None
        self._backend = backend
        if runtime is not None and namespace is not None:
            raise EmbserveError("an App given a runtime takes no namespace: give it that runtime")
        self._namespace = namespace
        self.runtime: Runtime = (
            runtime if runtime is not None else Runtime(backend, namespace=namespace)
        )
        self.max_body_size = max_body_size
        self.admin = admin
        self.admin_token = resolve_admin_token(admin_token)
        self._ready = not self._deploy and not self._owns
        self._closed = False
        self._lock: asyncio.Lock | None = None
        self._routes: list[Route] = []
        self._route_table: dict[str, str] = {}
        self._routes_at = -ROUTE_REFRESH_S
        self._metrics: dict[str, EndpointMetrics] = {}
        self._watchers = DisconnectWatchers()
        # The tasks serving requests now, for drain(); and whether a drain is cutting them.
        self._serving: set[asyncio.Task[Any]] = set()
        self._cutting = False
        self.body_timeout_s = body_timeout_s

    @property
    def body_timeout_s(self) -> float | None:
        """Seconds a request body may take to arrive whole (None: no limit)."""
        return self._watchers.body_timeout_s

    @body_timeout_s.setter
    def body_timeout_s(self, value: float | None) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"body_timeout_s must be a number or None, got {value!r}")
            if not value > 0:  # NaN too
                raise ValueError(f"body_timeout_s must be > 0, got {value}")
        self._watchers.body_timeout_s = value

    # -- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start the owned runtime on this event loop and deploy the routes (once)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._ready:
                return
            if self._owns and self._closed:
                self.runtime = Runtime(self._backend)
                self._closed = False
            runtime = self.runtime
            if runtime.loop is None:
                if self._owns:
                    await runtime.start_async()
                else:
                    await asyncio.to_thread(runtime.start)
            for prefix, application in self._deploy:

                def deploy(app: Application = application, prefix: str = prefix) -> Any:
                    return runtime.run_async(app, name=app.name, route_prefix=prefix)

                await _on_loop_of(runtime, deploy)
            self._refresh_routes()
            self._ready = True

    async def shutdown(self) -> None:
        """Drain and stop the runtime the App owns (a runtime passed in is left running)."""
        if not self._owns:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed:
                return
            self._ready = False
            self._closed = True
            runtime = self.runtime
            if runtime.loop is None:
                runtime.shutdown()
            elif runtime.loop is asyncio.get_running_loop():
                await runtime.shutdown_async()
            else:
                await asyncio.to_thread(runtime.shutdown)

    @contextlib.asynccontextmanager
    async def lifespan(self, _host: Any = None) -> AsyncIterator[None]:
        """A lifespan for a host app that mounts this one: ``FastAPI(lifespan=app.lifespan)``."""
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("embserve App failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- routing --------------------------------------------------------------------------

    def set_backend(
        self, backend: str | Backend | None = None, *, namespace: str | None = None
    ) -> None:
        """Choose the backend (None: keep it) and the namespace (None: keep it) of the runtime
        the App owns, before it starts."""
        if not self._owns:
            raise EmbserveError("this App serves a runtime it was given; choose its backend there")
        if self.runtime.loop is not None:
            raise EmbserveError("the App's runtime already started")
        if backend is not None:
            self._backend = backend
        if namespace is not None:
            self._namespace = namespace
        self.runtime = Runtime(self._backend, namespace=self._namespace)

    def planned_routes(self) -> dict[str, str]:
        """Route prefix → endpoint name: the routes given plus the runtime's, before start-up."""
        table = self.runtime.routes()
        table.update((prefix, application.name) for prefix, application in self._deploy)
        return table

    def applications(self) -> dict[str, Application]:
        """Route prefix → the application the App deploys there (not the runtime's own routes)."""
        return dict(self._deploy)

    def routes(self) -> dict[str, str]:
        """Route prefix → endpoint name, as served now."""
        self._refresh_routes()
        return dict(self._route_table)

    def _refresh_routes(self) -> None:
        table = self.runtime.routes()
        self._routes_at = time.monotonic()
        if table == self._route_table:
            return
        self._route_table = table
        routes = [Route(prefix, name) for prefix, name in table.items()]
        routes.sort(key=lambda r: len(r.prefix), reverse=True)
        self._routes = routes
        for route in routes:
            self._metrics.setdefault(route.endpoint, EndpointMetrics())

    def _still_routed(self, route: Route) -> bool:
        # The endpoint may have been deleted since the route table was last read.
        self._refresh_routes()
        return route.prefix in self._route_table

    def _match(self, path: str) -> Route | None:
        if time.monotonic() - self._routes_at > ROUTE_REFRESH_S:
            self._refresh_routes()
        for route in self._routes:
            if route.matches(path):
                return route
        self._refresh_routes()  # a route added since the last look
        for route in self._routes:
            if route.matches(path):
                return route
        return None

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = ""
        declared: int | None = None
        options: dict[bytes, bytes] | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
            elif name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
            elif name in ROUTING_HEADERS:
                options = options or {}
                options[name] = value
        if not request_id:
            request_id = new_request_id()  # a counter: a system call per request cost ~1.5 us
        if not self._ready:
            try:
                await self.startup()
            except Exception as exc:  # logged by error_response, with the request id
                await error_response(exc, request_id)(scope, receive, send)
                return
        path = route_path(scope) if scope.get("root_path") else scope["path"]
        if self.admin and path.startswith("/-/"):
            await self._admin(path[3:], request_id, scope, receive, send)
            return
        route = self._match(path)
        if route is None:
            response = error_response(HTTPError(404, f"no route for {path}"), request_id)
            await response(scope, receive, send)
            return
        metrics = self._metrics[route.endpoint]
        metrics.in_flight += 1
        started = time.perf_counter()
        status = 500
        # The loop, looked up once: before Python 3.12 each look-up is a system call (getpid),
        # and uvloop's cannot be remembered as asyncio's are.
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is not None:
            self._serving.add(task)
        try:
            status = await self._serve(
                route, request_id, declared, options, scope, receive, send, task, loop
            )
        finally:
            self._serving.discard(task)
            metrics.in_flight -= 1
            metrics.finished(status, time.perf_counter() - started)

    def drain(self, timeout_s: float) -> None:
        """The server stops: requests still running after ``timeout_s`` are cancelled and
        answered 503 with their request id (async user code sees ``CancelledError``).

        ``embserve run`` and :func:`embserve_asgi.server.serve` call it when shutdown begins,
        and give the server a little longer, so that the answers go out before it closes
        connections (hypercorn on Python 3.12+ stops writing to them at its own timeout).
        """
        loop = asyncio.get_running_loop()
        loop.call_later(timeout_s, self._cut)

    def _cut(self) -> None:
        self._cutting = True
        for task in list(self._serving):
            task.cancel()

    async def _serve(
        self,
        route: Route,
        request_id: str,
        declared: int | None,
        options: dict[bytes, bytes] | None,
        scope: Scope,
        receive: Receive,
        send: Send,
        task: asyncio.Task[Any] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> int:
        """Serve one request to ``route`` (on ``loop``, the running loop); returns the status
        code sent (499: client gone)."""
        watch: DisconnectWatch | None = None
        responding = False
        try:
            if declared == -1:
                raise HTTPError(400, "Content-Length is not a number")
            if declared is not None and declared > self.max_body_size:
                raise BodyTooLarge(self.max_body_size)
            # Watched from here on: the shared timer enforces the body deadline, then listens
            # for the client leaving. Neither costs a request that is answered quickly.
            watch = self._watchers.watch(receive, task)
            try:
                body = await read_body(receive, self.max_body_size)
            except asyncio.CancelledError:
                if not watch.expired:
                    raise
                _uncancel()
                raise BodyTimeout(self._watchers.body_timeout_s or 0.0) from None
            watch.reading = False
            snapshot = RequestSnapshot.from_scope(scope, body, request_id, route.prefix)
            request = Request(
                route.endpoint,
                args=(snapshot,),
                request_id=request_id,
                stream=None,  # as the deployment the traffic policy chooses
                http_method=scope["method"],
            )
            if options is not None:
                apply_routing_headers(request, options)
            # Cancelling this task (the client left) cancels the request. On the runtime's own
            # loop the request is served in this task: no task or future per request.
            runtime = self.runtime
            if runtime.loop is loop:
                result = await runtime.call_async(request)
            else:
                result = await runtime.submit(request)
            responding = True
            kind = type(result)
            if kind is dict or kind is list or kind is str or kind is bytes:  # the usual
                watch.close()
                return await send_plain(send, result, request_id)
            if isinstance(result, ResponseStream):
                return await self._stream(result, request_id, watch, send)
            if is_stream(result):
                return await self._stream(iterate(result), request_id, watch, send)
            watch.close()
            if not isinstance(result, Response):
                return await send_plain(send, result, request_id)
            response = to_response(result, request_id)
        except asyncio.CancelledError:
            if watch is not None and watch.gone and not self._cutting:
                _uncancel()
                return 499
            if watch is not None:
                watch.close()
            # Cancelled by the server (its graceful timeout ran out at shutdown) or by a host
            # app: answer, if nothing is sent yet, then let the cancellation go on.
            if not responding:
                await _send_quietly(
                    error_response(Cancelled(), request_id, route.endpoint), scope, receive, send
                )
            raise
        except ClientGone:
            if watch is not None:
                watch.close()
            return 499
        except Exception as exc:
            if watch is not None:
                watch.close()
            if type(exc) is EmbserveError and not self._still_routed(route):
                exc = HTTPError(404, f"no route for {scope['path']}")
            response = error_response(exc, request_id, route.endpoint)
            if isinstance(exc, BodyTooLarge):
                await response(scope, receive, send)
                # Bounded in time as well as size: a client may stop sending at any point.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(discard_body(receive), self.body_timeout_s)
                return 413
        await response(scope, receive, send)
        status: int = response.status_code
        return status

    async def _stream(self, items: Any, request_id: str, watch: DisconnectWatch, send: Send) -> int:
        iterator = items.__aiter__()
        finished = False
        try:
            try:
                first = await iterator.__anext__()
            except StopAsyncIteration:
                first = b""
            except Exception:
                finished = True  # the generator is over; its error gets the usual answer
                raise
            headers = [
                (b"content-type", stream_media_type(first).encode("latin-1")),
                (b"x-request-id", request_id.encode("latin-1")),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            chunk = chunk_bytes(first)
            while True:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                try:
                    item = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                except Exception:
                    # The status line is gone already. Returning without ending the body makes
                    # the server cut the connection, so the client cannot take a truncated
                    # stream for a whole one.
                    finished = True
                    logger.exception(
                        "the stream of request %s failed",
                        request_id,
                        extra={"request_id": request_id},
                    )
                    return 500
                chunk = chunk_bytes(item)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
            return 200
        finally:
            watch.close()
            if not finished:
                await abandon(items)

    async def _admin(
        self, page: str, request_id: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        token = self.admin_token
        if token is not None and page not in UNGUARDED and not authorized(scope["headers"], token):
            await unauthorized(request_id)(scope, receive, send)
            return
        self._refresh_routes()
        response: Response | None
        if page == "metrics":
            runtime = self.runtime
            text = await _on_loop_of(runtime, runtime.metrics_async) if self._ready else ""
            response = metrics_response(prometheus_text(self._metrics), text)
        else:
            response = admin_response(
                page, self.runtime, self._route_table, self._metrics, started=self._ready
            )
        if response is None:
            response = error_response(HTTPError(404, f"no admin page {page!r}"), request_id)
        response.headers["x-request-id"] = request_id
        await response(scope, receive, send)

    def __repr__(self) -> str:
        return f"<embserve App runtime={self.runtime.id} routes={sorted(self._route_table)}>"


async def _send_quietly(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    # The connection may be going away with the server; the answer is then lost, and that
    # must not hide why the request ended.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(response(scope, receive, send), _LAST_ANSWER_S)


def _uncancel() -> None:
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()


async def _on_loop_of(runtime: Runtime, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop = runtime.loop
    if loop is None or loop is asyncio.get_running_loop():
        return await make()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), loop))
