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
import inspect
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from embserve.backends import Backend
from embserve.deployment import Application, Deployment
from embserve.errors import EmbserveError, HTTPError
from embserve.runtime import Runtime
from embserve_asgi.admin import EndpointMetrics, admin_response
from embserve_asgi.requests import BodyTooLarge, ClientGone, RequestSnapshot, read_body
from embserve_asgi.responses import (
    chunk_bytes,
    error_response,
    is_stream,
    logger,
    send_plain,
    stream_media_type,
    to_response,
)

__all__ = ["App"]

T = TypeVar("T")

DEFAULT_MAX_BODY_SIZE = 16 * 1024 * 1024
# A request answered within one or two of these never pays for a task that listens for the
# client leaving; slower ones are cancelled at most about twice this long after it left.
DISCONNECT_WATCH_DELAY_S = 0.01
ROUTE_REFRESH_S = 1.0
# Past the size limit, at most this much more of a refused body is read and dropped.
DISCARD_LIMIT = 8 * 1024 * 1024


class _Route:
    __slots__ = ("endpoint", "methods", "prefix", "slashed", "streaming")

    def __init__(self, prefix: str, endpoint: str, deployment: Deployment | None) -> None:
        self.prefix = prefix
        self.slashed = prefix.rstrip("/") + "/"
        self.endpoint = endpoint
        target = deployment.target if deployment is not None else None
        self.streaming = _is_generator(target)
        methods = getattr(target, "http_methods", None)
        self.methods: frozenset[str] | None = None
        if methods:
            allowed = {str(m).upper() for m in methods}
            if "GET" in allowed:
                allowed.add("HEAD")
            self.methods = frozenset(allowed)

    def matches(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.slashed)


def _is_generator(target: Any) -> bool:
    if target is None:
        return False
    fn = target.__call__ if inspect.isclass(target) else target
    return inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)


class App:
    """An ASGI 3 application serving embserve endpoints over HTTP.

    Args:
        routes: route prefix → :class:`~embserve.Application` to deploy under it. Each is run as
            an endpoint named after its deployment (``.options(name=...)`` to rename).
        runtime: serve this runtime instead of one the App owns; its endpoints that have a
            ``route_prefix`` are served too. The caller starts and stops it.
        backend: the backend of the runtime the App owns (``"local"``, ``"process"``, ...).
        max_body_size: larger request bodies are refused with 413 before they are read whole.
        admin: serve ``/-/healthz``, ``/-/routes``, ``/-/status`` and ``/-/metrics``.

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
        admin: bool = True,
    ) -> None:
        if isinstance(max_body_size, bool) or not isinstance(max_body_size, int):
            raise TypeError(f"max_body_size must be an int, got {max_body_size!r}")
        if max_body_size < 0:
            raise ValueError(f"max_body_size must be >= 0, got {max_body_size}")
        self._deploy = _check_routes(routes or {}, admin=admin)
        self._owns = runtime is None
        self._backend = backend
        self.runtime: Runtime = runtime if runtime is not None else Runtime(backend)
        self.max_body_size = max_body_size
        self.admin = admin
        self._ready = not self._deploy and not self._owns
        self._closed = False
        self._lock: asyncio.Lock | None = None
        self._routes: list[_Route] = []
        self._route_table: dict[str, tuple[str, Deployment | None]] = {}
        self._routes_at = -ROUTE_REFRESH_S
        self._metrics: dict[str, EndpointMetrics] = {}
        self._watchers = _Watchers()

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

    def set_backend(self, backend: str | Backend) -> None:
        """Choose the backend of the runtime the App owns, before it starts."""
        if not self._owns:
            raise EmbserveError("this App serves a runtime it was given; choose its backend there")
        if self.runtime.loop is not None:
            raise EmbserveError("the App's runtime already started")
        self._backend = backend
        self.runtime = Runtime(backend)

    def planned_routes(self) -> dict[str, str]:
        """Route prefix → endpoint name: the routes given plus the runtime's, before start-up."""
        table = {prefix: name for prefix, (name, _) in self.runtime.routes().items()}
        table.update((prefix, application.name) for prefix, application in self._deploy)
        return table

    def routes(self) -> dict[str, tuple[str, Deployment | None]]:
        """Route prefix → (endpoint name, its main deployment), as served now."""
        self._refresh_routes()
        return dict(self._route_table)

    def _refresh_routes(self) -> None:
        table = self.runtime.routes()
        self._routes_at = time.monotonic()
        if table == self._route_table:
            return
        self._route_table = table
        routes = [_Route(prefix, name, dep) for prefix, (name, dep) in table.items()]
        routes.sort(key=lambda r: len(r.prefix), reverse=True)
        self._routes = routes
        for route in routes:
            self._metrics.setdefault(route.endpoint, EndpointMetrics())

    def _still_routed(self, route: _Route) -> bool:
        # The endpoint may have been deleted since the route table was last read.
        self._refresh_routes()
        return route.prefix in self._route_table

    def _match(self, path: str) -> _Route | None:
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
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
            elif name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
        if not request_id:
            request_id = os.urandom(8).hex()
        if not self._ready:
            try:
                await self.startup()
            except Exception as exc:
                logger.exception("embserve App failed to start")
                await error_response(exc, request_id)(scope, receive, send)
                return
        path = _route_path(scope)
        if self.admin and path.startswith("/-/"):
            await self._admin(path[3:], request_id, scope, receive, send)
            return
        route = self._match(path)
        if route is None:
            response = error_response(HTTPError(404, f"no route for {path}"), request_id)
            await response(scope, receive, send)
            return
        if route.methods is not None and scope["method"] not in route.methods:
            response = error_response(
                HTTPError(405, f"{scope['method']} is not allowed here"), request_id
            )
            response.headers["allow"] = ", ".join(sorted(route.methods))
            await response(scope, receive, send)
            return
        metrics = self._metrics[route.endpoint]
        metrics.in_flight += 1
        started = time.perf_counter()
        status = 500
        try:
            status = await self._serve(route, request_id, declared, scope, receive, send)
        finally:
            metrics.in_flight -= 1
            metrics.finished(status, time.perf_counter() - started)

    async def _serve(
        self,
        route: _Route,
        request_id: str,
        declared: int | None,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> int:
        """Serve one request to ``route``; returns the status code sent (499: client gone)."""
        watch: _DisconnectWatch | None = None
        try:
            if declared == -1:
                raise HTTPError(400, "Content-Length is not a number")
            if declared is not None and declared > self.max_body_size:
                raise BodyTooLarge(self.max_body_size)
            body = await read_body(receive, self.max_body_size)
            snapshot = RequestSnapshot.from_scope(scope, body, request_id)
            watch = self._watchers.watch(receive)
            if route.streaming:
                stream = self.runtime.submit_stream(route.endpoint, "__call__", (snapshot,), {})
                return await self._stream(stream, request_id, watch, send)
            runtime = self.runtime
            if runtime.loop is asyncio.get_running_loop():
                # On the runtime's own loop the call runs in this task: no task per request,
                # and cancelling this task (the client left) cancels the call.
                result = await runtime.call_async(route.endpoint, "__call__", (snapshot,), {})
            else:
                result = await runtime.submit(route.endpoint, "__call__", (snapshot,), {})
            if is_stream(result):
                return await self._stream(_iterate(result), request_id, watch, send)
            watch.close()
            if not isinstance(result, Response):
                return await send_plain(send, result, request_id)
            response = to_response(result, request_id)
        except asyncio.CancelledError:
            if watch is None or not watch.gone:
                raise
            _uncancel()
            return 499
        except ClientGone:
            return 499
        except Exception as exc:
            if watch is not None:
                watch.close()
            if type(exc) is EmbserveError and not self._still_routed(route):
                exc = HTTPError(404, f"no route for {scope['path']}")
            response = error_response(exc, request_id, route.endpoint)
            if isinstance(exc, BodyTooLarge):
                await response(scope, receive, send)
                await _discard_body(receive)
                return 413
        await response(scope, receive, send)
        status: int = response.status_code
        return status

    async def _stream(
        self, items: Any, request_id: str, watch: _DisconnectWatch, send: Send
    ) -> int:
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
                    logger.exception("the stream of request %s failed", request_id)
                    return 500
                chunk = chunk_bytes(item)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
            return 200
        finally:
            watch.close()
            if not finished:
                await _abandon(items)

    async def _admin(
        self, page: str, request_id: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self._refresh_routes()
        response = admin_response(
            page, self.runtime, self._route_table, self._metrics, started=self._ready
        )
        if response is None:
            response = error_response(HTTPError(404, f"no admin page {page!r}"), request_id)
        response.headers["x-request-id"] = request_id
        await response(scope, receive, send)

    def __repr__(self) -> str:
        return f"<embserve App runtime={self.runtime.id} routes={sorted(self._route_table)}>"


class _DisconnectWatch:
    """Cancels the task serving one request when its client disconnects."""

    __slots__ = ("_owner", "_reader", "_receive", "_task", "closed", "gone", "seen")

    def __init__(self, owner: _Watchers, receive: Receive) -> None:
        self._owner = owner
        self._receive = receive
        self._task = asyncio.current_task()
        self._reader: asyncio.Future[Message] | None = None
        self.closed = False
        self.gone = False
        self.seen = False

    def listen(self) -> None:
        if self._reader is None and not self.closed:
            self._reader = asyncio.ensure_future(self._receive())
            self._reader.add_done_callback(self._heard)

    def _heard(self, reader: asyncio.Future[Message]) -> None:
        if self.closed or reader.cancelled() or reader.exception() is not None:
            return
        if reader.result()["type"] == "http.disconnect" and self._task is not None:
            self.gone = True
            self.close()
            self._task.cancel()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._owner.active.discard(self)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()


class _Watchers:
    """Starts listening for disconnects only on requests that have run a little while.

    Listening costs a task per request, and most requests are answered before it could matter.
    One timer for all requests in flight (not one each) finds those seen by two of its ticks.
    """

    __slots__ = ("active", "timer")

    def __init__(self) -> None:
        self.active: set[_DisconnectWatch] = set()
        self.timer: asyncio.TimerHandle | None = None

    def watch(self, receive: Receive) -> _DisconnectWatch:
        watch = _DisconnectWatch(self, receive)
        self.active.add(watch)
        if self.timer is None:
            # An App is served by one event loop; its requests share this timer.
            self.timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_DELAY_S, self._tick)
        return watch

    def _tick(self) -> None:
        self.timer = None
        for watch in list(self.active):
            if watch.seen:
                watch.listen()
            else:
                watch.seen = True
        if self.active:
            self.timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_DELAY_S, self._tick)


async def _abandon(items: Any) -> None:
    # A stream left mid-way (the client went, or sending failed) stops its generator now,
    # rather than whenever the garbage collector finds it.
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    cancel = getattr(items, "cancel", None)
    if cancel is not None:  # a ResponseStream: its cancel() may block when called off its loop
        await asyncio.to_thread(cancel)


async def _discard_body(receive: Receive) -> None:
    # Servers hold back a body's later chunks until the app takes them, and may keep the
    # connection open until then; take (and drop) a bounded amount so it can close.
    budget = DISCARD_LIMIT
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b"")) or 1


def _uncancel() -> None:
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()


def _route_path(scope: Scope) -> str:
    # Starlette's mounts keep the full path and set root_path; the part under it is ours.
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        rest = path[len(root) :]
        if not rest:
            return "/"
        if rest[0] == "/":
            return rest
    return path


async def _iterate(values: Any) -> AsyncIterator[Any]:
    """Items of a returned sync or async generator; sync steps run in a worker thread."""
    if inspect.isasyncgen(values):
        async for item in values:
            yield item
        return
    done = object()
    try:
        while True:
            item = await asyncio.to_thread(next, values, done)
            if item is done:
                return
            yield item
    finally:
        values.close()


def _check_routes(routes: Mapping[str, Application], *, admin: bool) -> list[tuple[str, Any]]:
    if not isinstance(routes, Mapping):
        raise TypeError(f"routes must map route prefixes to applications, got {routes!r}")
    checked: list[tuple[str, Application]] = []
    names: dict[str, str] = {}
    for prefix, application in routes.items():
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ValueError(f"a route prefix must start with '/', got {prefix!r}")
        if admin and (prefix == "/-" or prefix.startswith("/-/")):
            raise ValueError(f"route prefix {prefix!r} is taken by the admin routes (admin=True)")
        if isinstance(application, Deployment):
            application = application.bind()
        if not isinstance(application, Application):
            raise TypeError(
                f"routes[{prefix!r}] must be an Application (Deployment.bind(...)), "
                f"got {application!r}"
            )
        other = names.get(application.name)
        if other is not None:
            raise ValueError(
                f"routes {other!r} and {prefix!r} both deploy {application.name!r}; give one "
                "another name with .options(name=...)"
            )
        names[application.name] = prefix
        checked.append((prefix, application))
    return checked


async def _on_loop_of(runtime: Runtime, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop = runtime.loop
    if loop is None or loop is asyncio.get_running_loop():
        return await make()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), loop))
