"""Real servers for end-to-end tests: hypercorn on 127.0.0.1, in a thread, stopped by event."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def hypercorn_server(app: Any, *, timeout_s: float = 10.0) -> Iterator[str]:
    """Serve ``app`` with hypercorn on a free port; yield its base URL; stop it on exit."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 5
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(app, config, shutdown_trigger=stop.wait))
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="hypercorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if failure or time.monotonic() > deadline:
                raise RuntimeError(f"hypercorn did not start: {failure}") from None
            time.sleep(0.01)
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)


def get_json(client: httpx.Client, path: str) -> Any:
    """GET ``path`` and return its JSON, failing on a non-2xx answer."""
    response = client.get(path)
    response.raise_for_status()
    return response.json()


@contextlib.contextmanager
def embserve_server(app: Any, **options: Any) -> Iterator[tuple[str, Callable[[], None]]]:
    """Serve ``app`` with :func:`embserve_asgi.serve` (``options`` passed on) on a free port.

    Yields the base URL and a function that starts the server's graceful shutdown; the server
    is stopped (and waited for) on exit in any case.
    """
    from embserve_asgi.server import bind, serve

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(app, sock, shutdown_trigger=stop.wait, **options))
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
        finally:
            loop.close()

    def shut_down() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)

    thread = threading.Thread(target=run, name="embserve-server", daemon=True)
    thread.start()  # the socket listens already: connections queue until the server accepts
    try:
        yield f"http://127.0.0.1:{port}", shut_down
    finally:
        shut_down()
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
        assert not failure, failure


def raw_exchange(
    port: int, data: bytes, *, timeout_s: float = 10.0, sock: socket.socket | None = None
) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection (or ``sock``); read until the server closes it.

    Returns what arrived and whether the server closed the connection within ``timeout_s``.
    """
    if sock is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        sock.sendall(data)
    received = b""
    deadline = time.monotonic() + timeout_s
    with sock:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False
