"""The ``embserve`` command: serve an App over HTTP, or show a running server's status.

``embserve run module:attr`` serves ``attr``: an :class:`~embserve_asgi.App`, an
:class:`~embserve.Application` (served at ``/``), or a :class:`~embserve.Runtime` (its endpoints
with a route prefix). ``module`` is a dotted module name or a path to a ``.py`` file. The runtime
starts and every route is deployed before the command says where it serves; progress goes to
stderr meanwhile. Ctrl-C or SIGTERM stops it gracefully: no new connections, in-flight requests
finish, then the runtime drains. It serves with the fastest server installed: granian, else
uvicorn (httptools, uvloop), else hypercorn (``--server`` chooses); ``--workers N`` runs N
server processes on the one port, for a backend whose replicas they share (see
:mod:`embserve_asgi.workers`).

``embserve status URL`` prints the status table of the server at ``URL`` (its ``/-/status``).

What goes wrong before serving (a module that is missing or raises, a busy port, an unknown
backend, a constructor that raises) is printed as one line, after the user's traceback when
user code raised, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from embserve.errors import DeploymentFailedError, EmbserveError
from embserve.snapshot import RuntimeStatus
from embserve_asgi._target import CommandError, as_app, load, print_user_traceback
from embserve_asgi.admin import ADMIN_TOKEN_ENV, unready
from embserve_asgi.app import App
from embserve_asgi.server import SERVERS, bind, choose_server, loop_factory, run_on, serve
from embserve_asgi.workers import refuse_unshared, supervise, worker_command

__all__ = ["as_app", "curl_hint", "describe", "load", "main"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
ADMIN_PAGES = "/-/healthz /-/ready /-/routes /-/status /-/metrics"


def main(argv: Sequence[str] | None = None) -> int:
    """The ``embserve`` command; returns its exit status."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except CommandError as exc:
        print(f"embserve {args.command}: {exc}", file=sys.stderr, flush=True)
        return 1
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embserve",
        description="Serve embserve deployments over HTTP, and look at them.",
        epilog="'embserve COMMAND --help' describes a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="serve module:attr over HTTP",
        description="Serve an embserve App, Application or Runtime over HTTP with granian, "
        "uvicorn or hypercorn (see --server). Ctrl-C or SIGTERM stops it gracefully.",
    )
    run.set_defaults(handler=_run)
    run.add_argument(
        "target",
        metavar="module:attr",
        help="what to serve: a module and attribute (service:app) or a file (path/to/app.py:app)",
    )
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    run.add_argument(
        "--port", type=int, default=8000, help="port to listen on (8000; 0 picks a free one)"
    )
    run.add_argument(
        "--server",
        choices=SERVERS,
        default="auto",
        help="the HTTP server: auto (the default) is the fastest installed: granian, else uvicorn "
        "with httptools (and uvloop), else hypercorn",
    )
    run.add_argument(
        "--workers",
        type=_count,
        default=1,
        metavar="N",
        help="N server processes on the one port, each with its own runtime (1); only for a "
        "backend whose replicas the processes share (Dask with a namespace)",
    )
    run.add_argument(
        "--backend",
        default=None,
        metavar="NAME",
        help="where replicas run: local (the default), process, dask://host:port",
    )
    run.add_argument(
        "--namespace",
        metavar="NAME",
        help="share replicas with the other runtimes of NAME on the Dask cluster (what "
        "--workers N needs; see docs/scaling.md)",
    )
    run.add_argument(
        "--admin-token",
        default=None,
        metavar="TOKEN",
        help=f"admin routes but /-/healthz need 'Authorization: Bearer TOKEN' (default: "
        f"the App's, else ${ADMIN_TOKEN_ENV}; prefer the variable, as ps shows arguments)",
    )
    run.add_argument(
        "--no-admin", action="store_true", help="serve no admin routes (/-/healthz and the rest)"
    )
    run.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="at shutdown, in-flight requests get this long to finish, then 503 (30)",
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
        help="close connections idle this long, or still sending headers (5)",
    )
    run.add_argument(
        "--read-timeout",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="close connections that send nothing this long, even mid-request (default: "
        "never; hypercorn only)",
    )
    # One of the processes `--workers N` starts: it serves on an inherited socket, and tells
    # its parent on another descriptor that it serves (with its banner), instead of printing.
    run.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument(
        "--access-log",
        action="store_true",
        help="print a line per request to stdout, in Apache's combined format (as hypercorn's)",
    )

    status = commands.add_parser(
        "status",
        help="print the status table of a running server",
        description="Fetch URL/-/status from a running embserve server and print it as a table.",
    )
    status.set_defaults(handler=_status)
    status.add_argument("url", metavar="URL", help="the server, e.g. http://127.0.0.1:8000")
    status.add_argument(
        "--admin-token",
        default=None,
        metavar="TOKEN",
        help=f"the server's admin token (default: ${ADMIN_TOKEN_ENV})",
    )
    status.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the answer (10)",
    )
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


# -- embserve run -------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    _configure_logging()
    try:
        server = choose_server(args.server, read_timeout=args.read_timeout is not None)
    except ValueError as exc:
        raise CommandError(f"--server {args.server}: {exc}") from None
    app = as_app(load(args.target), args.backend, args.body_timeout, args.namespace)
    if args.no_admin:
        app.admin = False
    if args.admin_token is not None:
        app.admin_token = args.admin_token or None
    if args.workers > 1 and args.worker_fd is None:
        refuse_unshared(app, args.workers)
    if args.worker_fd is not None:
        sock = socket.socket(fileno=args.worker_fd)
    else:
        try:
            sock = bind(args.host, args.port)
        except OSError as exc:
            where = f"{args.host}:{args.port}"
            raise CommandError(f"cannot listen on {where}: {_reason(exc)}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    if args.workers > 1 and args.worker_fd is None:
        command, env = worker_command(args, server)
        return supervise(sock, args.workers, command, env, args.graceful_timeout)
    options = {
        "server": server,
        "graceful_timeout_s": args.graceful_timeout,
        "keep_alive_timeout_s": args.keep_alive_timeout,
        "read_timeout_s": args.read_timeout,
        "access_log": args.access_log,
    }
    note = server if args.workers == 1 else f"{server}, {args.workers} workers"
    serving = _serve(app, sock, url, options, note, args.ready_fd)
    served = run_on(loop_factory(server), serving)
    if args.worker_fd is None:
        print("embserve: stopped", flush=True)
    if not served:
        # Stopped while a constructor ran: it cannot be interrupted, and Python would join its
        # thread at exit, keeping the process alive as long as the constructor runs. The
        # runtime is shut down already; nothing is left to wait for.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


async def _serve(
    app: App,
    sock: socket.socket,
    url: str,
    options: dict[str, Any],
    note: str | None = None,
    ready_fd: int | None = None,
) -> bool:
    """Start the App, then serve it until told to stop; False if told to stop while starting.

    Once it serves, the banner goes to stdout, or (a worker of ``--workers N``) to ``ready_fd``,
    which its parent reads.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        # The App starts here rather than in the server's lifespan (which then finds it
        # started), so that nothing says "serving" before every constructor ran, and a start
        # that fails ends the command with one line instead of a server's traceback.
        # Connections that arrive meanwhile wait in the socket's backlog.
        if not await _start(app, stop):
            return False
        banner = describe(app, url, note)
        if ready_fd is None:
            print(banner, flush=True)
        else:
            # A few hundred bytes into an empty pipe: written at once, never blocking.
            os.write(ready_fd, (banner + "\n").encode("utf-8"))
            os.close(ready_fd)
        await serve(app, sock, shutdown_trigger=stop.wait, **options)
        return True
    finally:
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
        if sock.fileno() != -1:  # not handed to the server
            sock.close()
        await app.shutdown()  # once served, the lifespan did it already; this is then a no-op


async def _start(app: App, stop: asyncio.Event) -> bool:
    """Start the App's runtime and deploy its routes; False if told to stop first."""
    starting = asyncio.ensure_future(app.startup())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if stop.is_set():  # told to stop, even if the start has just finished too
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        return False
    exc = starting.exception()
    if exc is None:
        return True
    if isinstance(exc, DeploymentFailedError):
        # The user's traceback, once; the message's first line says which constructor.
        if exc.traceback_text:
            sys.stderr.write(exc.traceback_text.rstrip("\n") + "\n")
    elif not isinstance(exc, EmbserveError):
        print_user_traceback(exc)
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    if not isinstance(exc, EmbserveError):
        first = f"starting failed: {type(exc).__name__}: {first}"
    raise CommandError(first)


def describe(app: App, url: str, server: str | None = None) -> str:
    """What ``embserve run`` prints once the App serves: its routes and a curl line to try
    (``server``: which server serves it, said on the first line)."""
    using = f" with {server}" if server else ""
    lines = [f"embserve: serving on {url}{using} (Ctrl-C to stop)"]
    routes = app.routes()
    width = max((len(p) for p in routes), default=1)
    for prefix, endpoint in sorted(routes.items()):
        lines.append(f"  {prefix.ljust(width)}  -> {endpoint}")
    if app.admin:
        guarded = " (Bearer token: all but /-/healthz)" if app.admin_token else ""
        lines.append(f"  admin: {ADMIN_PAGES}{guarded}")
    why = unready(app.runtime, routes)
    lines.extend(f"  not ready: {line}" for line in why)
    hint = curl_hint(app, url, ready=not why)
    if hint is not None:
        lines.append(f"try: {hint}")
    return "\n".join(lines)


def curl_hint(app: App, url: str, *, ready: bool = True) -> str | None:
    """A curl line that works for ``app``, or None when there is nothing sure to call.

    A route whose deployment gives an ``http_example`` (a request body) is sent that body; else
    a route whose deployment lists GET in its ``http_methods`` is asked with GET; else the
    admin page ``/-/routes``; else the first route, with a method it takes. Not ready:
    ``/-/ready``.
    """
    auth = f' -H "Authorization: Bearer ${ADMIN_TOKEN_ENV}"' if app.admin_token else ""
    if not ready:
        return f"curl -s{auth} {url}/-/ready" if app.admin else None
    served = app.routes()
    owned = {p: a.deployment.target for p, a in app.applications().items() if p in served}
    order = sorted(owned, key=lambda p: (len(p), p))
    for prefix in order:
        example = getattr(owned[prefix], "http_example", None)
        if isinstance(example, (str, bytes)):
            text = example.decode("utf-8", "replace") if isinstance(example, bytes) else example
            method = _method_for_a_body(owned[prefix])
            return f"curl -s -X {method} {url}{prefix} -d {shlex.quote(text)}"
    for prefix in order:
        if getattr(owned[prefix], "http_methods", None) and "GET" in _methods(owned[prefix]):
            return f"curl -s {url}{prefix}"
    if app.admin:
        return f"curl -s{auth} {url}/-/routes"
    if order:  # a method the deployment takes, if not a body it understands
        return f"curl -s -X {_method_for_a_body(owned[order[0]])} {url}{order[0]}"
    if served:
        return f"curl -s {url}{min(served, key=lambda p: (len(p), p))}"
    return None


def _methods(target: Any) -> set[str]:
    # What the core's HTTP serving reads too: the target's http_methods, or every method.
    declared = getattr(target, "http_methods", None)
    return {str(m).upper() for m in declared} if declared else {"GET", "POST"}


def _method_for_a_body(target: Any) -> str:
    methods = _methods(target)
    if "POST" in methods:
        return "POST"
    with_body = sorted(methods - {"GET", "HEAD", "OPTIONS"})
    return with_body[0] if with_body else "POST"


class _Plain(logging.Formatter):
    """``embserve: message`` (``embserve: warning: message``): progress a person reads."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"embserve: {text}"


def _configure_logging() -> None:
    embserve = logging.getLogger("embserve")
    if any(isinstance(h.formatter, _Plain) for h in embserve.handlers):
        return  # configured by an earlier main() in this process
    # The user's own logging, as usual; embserve's progress plainly, on stderr.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(_Plain())
    embserve.addHandler(progress)
    embserve.setLevel(logging.INFO)
    embserve.propagate = False
    # The servers' "Running on ..." would repeat, less clearly, what the banner says.
    logging.getLogger("embserve.http.server").setLevel(logging.WARNING)
    # The access log is data, not progress: on stdout, each line as hypercorn formats it.
    access = logging.getLogger("embserve.http.access")
    lines = logging.StreamHandler(sys.stdout)
    lines.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(lines)
    access.propagate = False


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


# -- embserve status ----------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    url = args.url if "://" in args.url else f"http://{args.url}"
    page = url.rstrip("/") + "/-/status"
    token = args.admin_token if args.admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV)
    headers = {"accept": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(page, headers=headers), timeout=args.timeout
        ) as answer:
            body = answer.read()
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 401 and token:
            raise CommandError(f"{page} refused the admin token") from None
        if exc.code == 401:
            needs = f"--admin-token or ${ADMIN_TOKEN_ENV}"
            raise CommandError(f"{page} needs the admin token ({needs})") from None
        if exc.code == 404:
            raise CommandError(f"{page} not found (are the admin routes off?)") from None
        raise CommandError(f"{page} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        shown = _reason(reason) if isinstance(reason, OSError) else str(reason)
        raise CommandError(f"cannot reach {url}: {shown}") from None
    try:
        status = RuntimeStatus.from_dict(json.loads(body))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CommandError(f"{page} did not answer with an embserve status") from None
    print(status, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
