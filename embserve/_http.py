"""An HTTP server for a runtime's routes, on the runtime's own event loop.

:meth:`Runtime.serve_http <embserve.Runtime.serve_http>` (and so :func:`embserve.run`) serves
with the server ``embserve run`` uses: hypercorn, through the ASGI adapter, both reached by name
at call time so that the core imports neither. Served on the runtime's loop, requests reach
in-thread replicas with no thread hop, and no thread is added.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
from typing import Any

from embserve._loop import running_loop
from embserve.errors import EmbserveError

__all__ = ["HTTPServer", "start_http"]

logger = logging.getLogger("embserve.http")


class HTTPServer:
    """A running HTTP server; :meth:`stop` ends it.

    Attributes:
        app: the ASGI app it serves.
        host: the address it listens on.
        port: the port it listens on (the one picked when asked for port 0).
    """

    def __init__(self, app: Any, host: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._loop = loop
        self._stopping = asyncio.Event()
        self._done: concurrent.futures.Future[None] | None = None

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether it still serves."""
        return self._done is not None and not self._done.done()

    def reroute(self) -> None:
        """Serve the runtime's routes as they are now (the app rereads them within a second).

        For one who just ran an application and calls it at once: a new route under an
        existing one (``/calc`` under ``/``) is otherwise seen only when the app next looks.
        """
        routes = getattr(self.app, "routes", None)
        if routes is None or self._loop.is_closed():
            return
        if running_loop() is self._loop:
            routes()
            return

        async def reread() -> None:
            routes()

        asyncio.run_coroutine_threadsafe(reread(), self._loop).result()

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, and return once it stopped.

        From the runtime's own loop, ``await server.stop_async()`` instead.
        """
        if running_loop() is self._loop:
            raise RuntimeError("stop() would block the runtime's loop; await stop_async()")
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.stop_async(), self._loop).result()

    async def stop_async(self) -> None:
        """The awaitable twin of :meth:`stop` (on the runtime's loop)."""
        self._stopping.set()
        if self._done is not None:
            await asyncio.wrap_future(self._done)

    def __repr__(self) -> str:
        return f"<HTTPServer {self.url}{'' if self.running else ' stopped'}>"


def start_http(
    app: Any, loop: asyncio.AbstractEventLoop, host: str, port: int, **options: Any
) -> HTTPServer:
    """Bind ``host:port`` now (errors raise here) and serve ``app`` on ``loop`` from then on."""
    try:
        server_module = importlib.import_module("embserve_asgi.server")
    except ImportError:
        from embserve._install import install_command

        raise EmbserveError(
            f"serving over HTTP needs the ASGI adapter: {install_command('asgi')}"
        ) from None
    try:
        sock = server_module.bind(host, port)
    except OSError as exc:
        raise EmbserveError(
            f"cannot serve HTTP on {host}:{port} ({exc.strerror or exc}); free the port or "
            'choose another: embserve.start(http_options={"port": ...})'
        ) from None
    server = HTTPServer(app, host, sock.getsockname()[1], loop)
    serving = server_module.serve(app, sock, shutdown_trigger=server._stopping.wait, **options)
    # The socket listens already: connections queue until the server's first turn on the loop.
    server._done = asyncio.run_coroutine_threadsafe(serving, loop)
    server._done.add_done_callback(_log_failure)
    return server


def _log_failure(done: concurrent.futures.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        logger.error("the HTTP server stopped with an error", exc_info=done.exception())
