"""Serving with uvicorn (httptools, and uvloop where installed), as :mod:`.server` serves with
hypercorn: on a socket bound beforehand, stopped by a trigger, draining the App.

Two things hypercorn does that uvicorn does not are added here, so that ``embserve run`` keeps
its promises on either server: connections that are still sending a request's headers when the
keep-alive timeout runs out are closed (uvicorn only times out idle connections between
requests), and the access log is written in hypercorn's one-line format.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from embserve_asgi._logs import AccessLog, forward_log

__all__ = ["available", "loop_factory", "serve_uvicorn"]


def available() -> bool:
    """Whether uvicorn and httptools (its fast HTTP/1.1 parser) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("uvicorn", "httptools"))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop factory where uvloop is installed, else None (asyncio's)."""
    if importlib.util.find_spec("uvloop") is None:
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _protocol() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderDeadline(HttpToolsProtocol):
        """uvicorn's httptools protocol, whose keep-alive timer also bounds how long a request's
        headers may take: it runs from the connection's start (and each answer's end) until the
        next request's headers are whole, not only until its first byte."""

        _headers_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def data_received(self, data: bytes) -> None:
            # uvicorn cancels the timer at the first byte; keep it until the headers are whole.
            if self.timeout_keep_alive_task is not None:
                self._headers_timer = self.timeout_keep_alive_task
                self.timeout_keep_alive_task = None
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._stop_headers_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_headers_timer()
            super().connection_lost(exc)

        def _stop_headers_timer(self) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
                self._headers_timer = None

    return HeaderDeadline


async def serve_uvicorn(
    app: Any,
    sock: socket.socket,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None,
    on_shutdown: Callable[[], None] | None,
    graceful_timeout_s: float,
    keep_alive_timeout_s: float,
    access_log: logging.Logger | None,
    error_log: logging.Logger,
    backlog: int,
) -> None:
    """Serve ``app`` on ``sock`` with uvicorn until ``shutdown_trigger`` returns (then call
    ``on_shutdown``), or, without a trigger, until SIGINT or SIGTERM (main thread only)."""
    import uvicorn

    class Triggered(uvicorn.Server):
        """A uvicorn server stopped by its caller, who owns the process's signals."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    forward_log("uvicorn.error", error_log)
    config = uvicorn.Config(
        AccessLog(app, access_log) if access_log is not None else app,
        http=_protocol(),
        ws="none",  # the App closes websockets at once; no websocket library is needed
        lifespan="on",
        log_config=None,  # the command (or the host program) configures logging
        access_log=False,
        proxy_headers=False,  # as hypercorn: X-Forwarded-* are not trusted unless asked
        timeout_keep_alive=keep_alive_timeout_s,  # type: ignore[arg-type]  # any seconds
        timeout_graceful_shutdown=graceful_timeout_s,  # type: ignore[arg-type]
        backlog=backlog,
    )
    if shutdown_trigger is None:
        await _serving(uvicorn.Server(config), sock)
        return
    server = Triggered(config)
    trigger = shutdown_trigger

    async def stop_when_triggered() -> None:
        await trigger()
        if on_shutdown is not None:
            on_shutdown()
        server.should_exit = True  # uvicorn looks at it every 0.1 s

    watcher = asyncio.ensure_future(stop_when_triggered())
    try:
        await _serving(server, sock)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _serving(server: Any, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits when the app's lifespan startup fails
        raise RuntimeError("the app failed to start (see the log)") from exc
