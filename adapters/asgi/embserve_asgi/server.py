"""Serving an ASGI app with hypercorn's Python API, on a socket bound beforehand.

Binding first lets the caller learn the port (``port=0`` picks a free one) and print it before
the server starts, and lets connections queue from that moment on: no waiting for readiness.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["bind", "serve"]

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


async def serve(
    app: Any,
    sock: socket.socket,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    graceful_timeout_s: float = 30.0,
    keep_alive_timeout_s: float = 5.0,
    read_timeout_s: float | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``app`` on ``sock`` (which hypercorn takes over) until ``shutdown_trigger`` returns.

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
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.backlog = LISTEN_BACKLOG  # hypercorn listens again on the socket, with its own backlog
    config.graceful_timeout = graceful_timeout_s
    config.keep_alive_timeout = keep_alive_timeout_s
    # Annotated int by hypercorn, which hands it to asyncio.wait_for: any number of seconds.
    config.read_timeout = read_timeout_s  # type: ignore[assignment]
    config.accesslog = logging.getLogger("embserve.http.access") if access_log else None
    config.errorlog = logging.getLogger("embserve.http.server")
    if shutdown_trigger is None:
        await hypercorn_serve(app, config)
        return
    drain = getattr(app, "drain", None)
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
