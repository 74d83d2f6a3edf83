"""``@embserve.ingress(fastapi_app)``: a FastAPI app whose routes are methods of a deployment.

As in Ray Serve::

    app = FastAPI()

    @embserve.deployment
    @embserve.ingress(app)
    class Greeter:
        @app.get("/hello")
        def hello(self, name: str) -> str:
            return f"Hello {name}"

The routes defined on the class become class-based views: FastAPI resolves their other
parameters, and ``self`` is the replica's object serving the request. The replica receives the
request snapshot like any HTTP deployment, runs the FastAPI app on it there (under the route
prefix, as its ``root_path``), and returns the app's answer as one Starlette ``Response``, on
every backend. The FastAPI app travels to other processes by reference (its module and name)
when its module can be imported there, else by value.

Not offered: the app's lifespan (startup and shutdown events) does not run, WebSocket routes
are not served, and a streamed response is sent once it is whole.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

__all__ = ["ingress"]

C = TypeVar("C", bound=type)

# The scope keys the ingress adds: the replica's object, which the views' `self` resolves to,
# and the route prefix the App matched, which becomes the FastAPI app's root path.
INSTANCE_KEY = "embserve.instance"
ROUTE_PREFIX_KEY = "embserve.route_prefix"


def ingress(app: Any) -> Callable[[C], C]:
    """Serve a deployment class's HTTP requests with ``app`` (a FastAPI or Starlette app).

    Apply it under ``@embserve.deployment``. Routes of ``app`` whose endpoints are functions of
    the class are called with the replica's object as ``self``; the app's other routes work as
    they do in FastAPI. Raises ``TypeError`` for something other than a class, and for a class
    that defines ``__call__`` (HTTP requests are the app's to answer).
    """
    if not callable(app):
        raise TypeError(f"ingress() takes an ASGI app such as FastAPI(), got {app!r}")
    reference = _FastAPIApp(app, *_importable_as(app, sys._getframe(1).f_globals))

    def wrap(cls: C) -> C:
        if not inspect.isclass(cls):
            raise TypeError(f"@ingress decorates a class, got {cls!r}")
        if "__call__" in vars(cls):
            raise TypeError(
                f"{cls.__name__} defines __call__, but an ingress class answers HTTP with its "
                "app's routes; rename the method"
            )
        _make_views(app, cls)
        cls.__call__ = _serve  # type: ignore[method-assign]
        cls.__embserve_asgi_app__ = reference  # type: ignore[attr-defined]
        return cls

    return wrap


class _FastAPIApp:
    """Holds the app for the class; pickles as its module and name when it can be imported."""

    __slots__ = ("app", "module", "name")

    def __init__(self, app: Any, module: str | None, name: str | None) -> None:
        self.app = app
        self.module = module
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        if self.module is not None:
            return (_import_app, (self.module, self.name))
        return (_FastAPIApp, (self.app, None, None))


def _import_app(module: str, name: str) -> _FastAPIApp:
    # Importing the module there applies @ingress there too: the views are made in that process.
    return _FastAPIApp(getattr(importlib.import_module(module), name), module, name)


def _importable_as(app: Any, module_globals: dict[str, Any]) -> tuple[str | None, str | None]:
    module = module_globals.get("__name__")
    if not isinstance(module, str) or module == "__main__":
        return None, None  # a script's objects cannot be imported elsewhere
    for name, value in module_globals.items():
        if value is app:
            return module, name
    return None, None


def _replica_object(request: Request) -> Any:
    """What a view's ``self`` resolves to (a FastAPI dependency)."""
    return request.scope[INSTANCE_KEY]


def _make_views(app: Any, cls: type) -> None:
    """Remake the routes of ``app`` whose endpoints are functions of ``cls``, as views."""
    try:
        from fastapi import Depends
        from fastapi.routing import APIRoute
    except ImportError:  # a plain Starlette app: no route of it can take `self`
        return
    methods = {id(value) for klass in cls.__mro__ for value in vars(klass).values()}
    routes = getattr(getattr(app, "router", None), "routes", [])
    for index, route in enumerate(routes):
        if isinstance(route, APIRoute) and id(route.endpoint) in methods:
            view = _view(route.endpoint, Depends(_replica_object))
            routes[index] = _rebuilt(route, view)


def _view(method: Callable[..., Any], instance: Any) -> Callable[..., Any]:
    """``method`` without ``self`` in its signature: FastAPI passes the replica's object."""
    signature = inspect.signature(method)
    parameters = list(signature.parameters.values())
    first = parameters[0]
    # Keyword-only throughout, so that `self` may have its default (the dependency) first.
    parameters = [
        first.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=instance, annotation=Any),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters[1:]),
    ]
    name = first.name
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_view(**kwargs: Any) -> Any:
            return await method(kwargs.pop(name), **kwargs)

        view: Callable[..., Any] = async_view
    else:

        @functools.wraps(method)
        def sync_view(**kwargs: Any) -> Any:
            return method(kwargs.pop(name), **kwargs)

        view = sync_view
    view.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return view


def _rebuilt(route: Any, endpoint: Callable[..., Any]) -> Any:
    # A route made anew with the same options: FastAPI works its parameters out from the
    # endpoint when a route is made, so changing the endpoint alone would not be enough.
    accepted = inspect.signature(type(route).__init__).parameters
    options = {
        name: getattr(route, name)
        for name in accepted
        if name not in ("self", "path", "endpoint") and hasattr(route, name)
    }
    return type(route)(route.path, endpoint, **options)


async def _serve(self: Any, request: Request) -> Response:
    """The ingress class's ``__call__``: run its app on the request, in the replica."""
    app = type(self).__embserve_asgi_app__.app
    scope = dict(request.scope)
    prefix = scope.get(ROUTE_PREFIX_KEY) or "/"
    if prefix != "/":
        root = scope["root_path"] = scope.get("root_path", "") + prefix.rstrip("/")
        if scope["path"] == root:
            # The prefix itself is the app's "/", not a path to redirect to "/prefix/".
            scope["path"] = root + "/"
            scope["raw_path"] = scope["path"].encode()
    scope[INSTANCE_KEY] = self
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    received = False
    finished = asyncio.Event()

    async def receive() -> Message:
        nonlocal received
        if not received:
            received = True
            return await request.receive()
        # The client is still there while the app answers (a streaming response listens).
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        finished.set()
    body = b"".join(chunks)
    # A streamed answer is sent whole: its length is known now, and it is no longer chunked.
    headers = [
        (k, v) for k, v in headers if k.lower() not in (b"content-length", b"transfer-encoding")
    ]
    headers.append((b"content-length", str(len(body)).encode("latin-1")))
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response
