"""Serving with granian (a Rust HTTP server), as :mod:`.server` serves with uvicorn and
hypercorn: in this process, on the running event loop, on a socket bound beforehand, stopped by
a trigger, draining the App.

granian parses HTTP and writes answers on a thread of its own and runs the app on the loop that
awaits :func:`serve_granian`: an embserve App is served on its runtime's loop as under the other
servers. Two things are added so that ``embserve run`` keeps its promises on it: granian starts
the app's lifespan shutdown as soon as it stops accepting, so that shutdown first waits for the
requests in flight (up to the graceful timeout); and the access log is written in hypercorn's
one-line format. Its header-read timeout is the keep-alive timeout: it bounds both an idle
connection and one still sending a request's headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embserve_asgi._logs import AccessLog, forward_log

__all__ = ["available", "serve_granian"]


def available() -> bool:
    """Whether granian is installed (and usable here: not on Windows, where its socket handling
    differs from what this module was tested with)."""
    return sys.platform != "win32" and importlib.util.find_spec("granian") is not None


class _Counted:
    """The app, with its requests in flight counted, and a lifespan shutdown that waits (up to
    ``patience_s``) until none is left."""

    def __init__(self, app: ASGIApp, patience_s: float) -> None:
        self.app = app
        self.patience_s = patience_s
        self.in_flight = 0
        self._none_left: asyncio.Event | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._receiving(receive), send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if not self.in_flight and self._none_left is not None:
                self._none_left.set()

    def _receiving(self, receive: Receive) -> Receive:
        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self.in_flight:
                self._none_left = asyncio.Event()
                # Past the patience, the app's own shutdown deals with what is left.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._none_left.wait(), self.patience_s)
            return message

        return receiving


async def serve_granian(
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
    """Serve ``app`` on ``sock`` with granian until ``shutdown_trigger`` returns (then call
    ``on_shutdown``), or, without a trigger, until SIGINT or SIGTERM (main thread only)."""
    from granian import _granian as native
    from granian.constants import Interfaces
    from granian.errors import FatalError
    from granian.http import HTTP1Settings
    from granian.server.embed import Server

    # Its stub lags the native type, which takes (fd, is_uds, backlog).
    socket_holder: Any = native.SocketHolder

    host, port = sock.getsockname()[:2]
    fd = sock.detach()  # granian owns the socket from here on

    class OnSocket(Server):
        """granian's in-process server, on the socket bound beforehand."""

        def _init_shared_socket(self) -> None:
            # What granian's own does, but with the socket given rather than one it binds.
            own: Any = self
            own._shd, own._sfd, own._ssp = socket_holder(fd, False, backlog), fd, None

    served = AccessLog(app, access_log) if access_log is not None else app
    header_timeout_ms = max(1, round(keep_alive_timeout_s * 1000))
    server: Any = OnSocket(
        _Counted(served, graceful_timeout_s),
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        backlog=backlog,
        http1_settings=HTTP1Settings(header_read_timeout=header_timeout_ms),
    )
    # Constructed, it configured its own loggers (printing to stdout): send what it logs where
    # the caller's server log goes instead, at the levels the caller set.
    forward_log("_granian", error_log)
    granian_log = logging.getLogger("_granian")
    granian_log.setLevel(logging.NOTSET)
    if _not_experimental not in granian_log.filters:
        granian_log.addFilter(_not_experimental)
    if shutdown_trigger is None:
        shutdown_trigger = _signalled
    trigger = shutdown_trigger

    async def stop_when_triggered() -> None:
        await trigger()
        if on_shutdown is not None:
            on_shutdown()
        server.stop()

    watcher = asyncio.ensure_future(stop_when_triggered())
    try:
        await server.serve()
    except FatalError as exc:  # the app's lifespan startup failed (granian logged why)
        raise RuntimeError("the app failed to start (see the log)") from exc
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def _not_experimental(record: logging.LogRecord) -> bool:
    # Said at every start of the embedded server; it is the one embserve chose and tests.
    return "experimental" not in record.getMessage()


async def _signalled() -> None:
    import signal

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stopped.set)
    try:
        await stopped.wait()
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)
