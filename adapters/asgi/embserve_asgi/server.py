"""Serving an ASGI app with granian, uvicorn or hypercorn, on a socket bound beforehand.

Binding first lets the caller learn the port (``port=0`` picks a free one) and print it before
the server starts, and lets connections queue from that moment on: no waiting for readiness.
Each server gives the same behaviour here (graceful shutdown that drains an embserve App,
keep-alive and header timeouts, the access log's format). granian is the fastest, then uvicorn
with httptools and uvloop; hypercorn has a read timeout besides.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["SERVERS", "bind", "choose_server", "loop_factory", "run_on", "serve"]

#: The names ``server=`` takes: ``auto`` is the fastest installed (granian, then uvicorn).
SERVERS = ("auto", "granian", "uvicorn", "hypercorn")

T = TypeVar("T")

LISTEN_BACKLOG = 1024
# How much longer than the App's graceful timeout the server waits, for the App's answers to
# the requests it cut to go out.
_LAST_ANSWERS_S = 1.0


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free port, see ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def choose_server(name: str = "auto", *, read_timeout: bool = False) -> str:
    """The server to use for ``name`` (one of :data:`SERVERS`): ``granian``, ``uvicorn`` or
    ``hypercorn``.

    ``auto`` is the fastest installed that can do what is asked: granian (``pip install
    'embserve-asgi[granian]'``), then uvicorn with httptools (``pip install
    'embserve-asgi[uvicorn]'``), then hypercorn, the only one with a read timeout. Raises
    ValueError, with a message that says what to do, for a server that cannot do what is asked.
    """
    from embserve_asgi import _granian, _uvicorn

    if name not in SERVERS:
        raise ValueError(f"server must be one of {', '.join(SERVERS)}, got {name!r}")
    if name == "auto":
        if read_timeout:
            return "hypercorn"
        if _granian.available():
            return "granian"
        return "uvicorn" if _uvicorn.available() else "hypercorn"
    if name == "granian":
        if not _granian.available():
            raise ValueError("granian is not installed (pip install 'embserve-asgi[granian]')")
        if read_timeout:
            raise ValueError("granian has no read timeout; use hypercorn for one")
    if name == "uvicorn":
        if not _uvicorn.available():
            raise ValueError(
                "uvicorn and httptools are not installed (pip install 'embserve-asgi[uvicorn]')"
            )
        if read_timeout:
            raise ValueError("uvicorn has no read timeout; use hypercorn for one")
    return name


def loop_factory(server: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run ``server`` on: uvloop's for granian and uvicorn where installed,
    else None (asyncio's own)."""
    if server not in ("granian", "uvicorn"):
        return None
    from embserve_asgi import _uvicorn

    return _uvicorn.loop_factory()


def run_on(factory: Callable[[], asyncio.AbstractEventLoop] | None, main: Awaitable[T]) -> T:
    """``asyncio.run(main)``, on a loop that ``factory`` makes (None: asyncio's)."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_awaited(main))
    if factory is not None:  # Python 3.10: no Runner; a policy makes the loop
        asyncio.set_event_loop_policy(_FactoryPolicy(factory))
    return asyncio.run(_awaited(main))


async def _awaited(main: Awaitable[T]) -> T:
    return await main


class _FactoryPolicy(asyncio.DefaultEventLoopPolicy):
    def __init__(self, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        super().__init__()
        self._factory = factory

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return self._factory()


async def serve(
    app: Any,
    sock: socket.socket,
    *,
    server: str = "hypercorn",
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    graceful_timeout_s: float = 30.0,
    keep_alive_timeout_s: float = 5.0,
    read_timeout_s: float | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``app`` on ``sock`` (which the server takes over) until ``shutdown_trigger`` returns.

    ``server`` is ``hypercorn`` (the default), ``granian``, ``uvicorn`` or ``auto`` (see
    :func:`choose_server`); granian and uvicorn serve faster, on whatever event loop runs this
    (give them uvloop's, see :func:`loop_factory`).

    On shutdown the server stops accepting, lets in-flight requests finish for up to
    ``graceful_timeout_s``, then runs the app's lifespan shutdown (an embserve App drains its
    runtime there); an embserve App answers the requests still in flight then with 503. Without a
    trigger, SIGINT and SIGTERM stop it (main thread only).

    ``keep_alive_timeout_s`` closes a connection that sits idle that long between requests, or
    before its request's headers are whole (the App's ``body_timeout_s`` bounds the body).
    ``read_timeout_s`` closes a connection that sends nothing for that long at any time, also
    while its request is being served (a client waiting for a slow answer sends nothing), so it
    must exceed the longest request; None (the default) leaves it to the other two.
    """
    server = choose_server(server, read_timeout=read_timeout_s is not None)
    access = logging.getLogger("embserve.http.access") if access_log else None
    errors = logging.getLogger("embserve.http.server")
    drain = getattr(app, "drain", None)
    if server in ("granian", "uvicorn"):
        from embserve_asgi._granian import serve_granian
        from embserve_asgi._uvicorn import serve_uvicorn

        # As below: the App cuts what still runs at graceful_timeout_s and answers it 503;
        # the server waits a little longer before it cancels what is left.
        extra = _LAST_ANSWERS_S if callable(drain) else 0.0
        serving = serve_granian if server == "granian" else serve_uvicorn
        await serving(
            app,
            sock,
            shutdown_trigger=shutdown_trigger,
            on_shutdown=(lambda: drain(graceful_timeout_s)) if callable(drain) else None,
            graceful_timeout_s=graceful_timeout_s + extra,
            keep_alive_timeout_s=keep_alive_timeout_s,
            access_log=access,
            error_log=errors,
            backlog=LISTEN_BACKLOG,
        )
        return
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.backlog = LISTEN_BACKLOG  # hypercorn listens again on the socket, with its own backlog
    config.graceful_timeout = graceful_timeout_s
    config.keep_alive_timeout = keep_alive_timeout_s
    # Annotated int by hypercorn, which hands it to asyncio.wait_for: any number of seconds.
    config.read_timeout = read_timeout_s  # type: ignore[assignment]
    config.accesslog = access
    config.errorlog = errors
    if shutdown_trigger is None:
        await hypercorn_serve(app, config)
        return
    if callable(drain):
        # The App cuts what still runs at graceful_timeout_s and answers it 503; the server
        # waits a little longer, so that those answers go out before it closes connections.
        config.graceful_timeout = graceful_timeout_s + _LAST_ANSWERS_S
        trigger = shutdown_trigger

        async def draining() -> None:
            await trigger()
            drain(graceful_timeout_s)

        shutdown_trigger = draining
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)
