"""``embserve run module:attr``: serve an App (or an application, or a runtime) over HTTP.

``attr`` may name an :class:`~embserve_asgi.App`, an :class:`~embserve.Application` (served at
``/``), or a :class:`~embserve.Runtime` (its endpoints with a route prefix). ``module`` is a
dotted module name or a path to a ``.py`` file. Ctrl-C or SIGTERM stops the server gracefully:
no new connections, in-flight requests finish, then the runtime drains.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from embserve.deployment import Application, Deployment
from embserve.runtime import Runtime
from embserve_asgi.app import App
from embserve_asgi.server import bind, serve

__all__ = ["load", "main"]


def load(target: str) -> Any:
    """The object named by ``module:attr`` or ``path/to/file.py:attr``."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"embserve run: expected module:attr or file.py:attr, got {target!r}")
    module = _import(module_name)
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise SystemExit(f"embserve run: {module_name!r} has no attribute {attr!r}") from None
    return value


def _import(name: str) -> ModuleType:
    if name.endswith(".py") or os.sep in name:
        path = os.path.abspath(name)
        if not os.path.isfile(path):
            raise SystemExit(f"embserve run: no file {name!r}")
        module_name = os.path.splitext(os.path.basename(path))[0]
        sys.path.insert(0, os.path.dirname(path))
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module
    # Like uvicorn and hypercorn: modules of the directory the command runs in are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(name)


def as_app(value: Any, backend: str | None, body_timeout_s: float | None = None) -> App:
    """An :class:`App` for whatever ``module:attr`` named (options given override the App's)."""
    if isinstance(value, Deployment):
        value = value.bind()
    app: App
    if isinstance(value, Application):
        app = App({"/": value}, backend=backend or "local")
    elif isinstance(value, Runtime):
        app = App(runtime=value)
    elif isinstance(value, App):
        app = value
        if backend is not None:
            app.set_backend(backend)
    else:
        raise SystemExit(
            "embserve run: expected an embserve App, Application or Runtime, "
            f"got {type(value).__name__}"
        )
    if body_timeout_s is not None:
        app.body_timeout_s = body_timeout_s
    return app


def describe(app: App, url: str) -> str:
    """The route table and a curl line to try, as printed at start-up."""
    lines = [f"embserve: serving on {url} (Ctrl-C to stop)"]
    routes = app.planned_routes()
    width = max((len(p) for p in routes), default=1)
    for prefix, endpoint in sorted(routes.items()):
        lines.append(f"  {prefix.ljust(width)}  -> {endpoint}")
    if app.admin:
        lines.append("  admin: /-/healthz /-/ready /-/routes /-/status /-/metrics")
    if routes:
        first = min(routes, key=len) if "/" in routes else sorted(routes)[0]
        lines.append(f"try: curl -s -X POST {url}{first} -d 'I love fast serving'")
    else:
        lines.append(f"try: curl -s {url}/-/status")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``embserve`` command."""
    parser = argparse.ArgumentParser(prog="embserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve module:attr over HTTP")
    run.add_argument("target", help="module:attr or path/to/file.py:attr")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--backend", default=None, help="local (default), process, dask://host:port")
    run.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="at shutdown, in-flight requests get this long to finish, then 503 (default 30)",
    )
    run.add_argument(
        "--body-timeout",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="a request body must arrive within this, else 408 (default: the App's, 30)",
    )
    run.add_argument(
        "--keep-alive-timeout",
        type=_positive,
        default=5.0,
        metavar="SECONDS",
        help="close connections idle this long, or still sending headers (default 5)",
    )
    run.add_argument(
        "--read-timeout",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="close connections that send nothing this long, even mid-request (default: never)",
    )
    run.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = as_app(load(args.target), args.backend, args.body_timeout)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(describe(app, f"http://{shown}:{port}"), flush=True)
    options = {
        "graceful_timeout_s": args.graceful_timeout,
        "keep_alive_timeout_s": args.keep_alive_timeout,
        "read_timeout_s": args.read_timeout,
        "access_log": args.access_log,
    }
    asyncio.run(_serve(app, sock, options))
    print("embserve: stopped", flush=True)
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


async def _serve(app: App, sock: Any, options: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(app, sock, shutdown_trigger=stop.wait, **options)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


if __name__ == "__main__":
    sys.exit(main())
