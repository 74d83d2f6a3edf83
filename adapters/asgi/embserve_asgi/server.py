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


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free port, see ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
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
    access_log: bool = False,
) -> None:
    """Serve ``app`` on ``sock`` (which hypercorn takes over) until ``shutdown_trigger`` returns.

    On shutdown the server stops accepting, lets in-flight requests finish for up to
    ``graceful_timeout_s``, then runs the app's lifespan shutdown (an embserve App drains its
    runtime there). Without a trigger, SIGINT and SIGTERM stop it (main thread only).
    """
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = graceful_timeout_s
    config.accesslog = logging.getLogger("embserve.http.access") if access_log else None
    config.errorlog = logging.getLogger("embserve.http.server")
    if shutdown_trigger is None:
        await hypercorn_serve(app, config)
    else:
        await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)
