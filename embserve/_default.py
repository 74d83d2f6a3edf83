"""The module-level API, Ray Serve's global API on a default :class:`~embserve.Runtime`.

``embserve.run``, ``start``, ``status``, ``get_app_handle``, ``get_deployment_handle``,
``delete`` and ``shutdown`` act on one runtime created on first use, and serve HTTP for the
applications that have a route prefix, on 127.0.0.1:8000 unless ``start`` said otherwise. An
*application* is what one ``run`` deployed under one name: its ingress deployment (run under the
application's name, which is also its endpoint's) and the deployments it binds, recorded here so
that status, handles and deletion work by application. The runtime runs in a daemon thread and
is shut down at exit, so a script ends when its main code does.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
from collections.abc import Mapping
from typing import Any

from embserve._http import HTTPServer
from embserve.context import get_replica_context
from embserve.deployment import Application, Deployment
from embserve.handle import Handle
from embserve.runtime import Runtime
from embserve.snapshot import (
    ApplicationStatusOverview,
    ServeStatus,
    application_status,
    deployment_overview,
)

__all__ = [
    "delete",
    "get_app_handle",
    "get_deployment_handle",
    "get_handle",
    "run",
    "shutdown",
    "start",
    "status",
]

logger = logging.getLogger("embserve.runtime")

DEFAULT_APP_NAME = "default"
DEFAULT_HTTP_OPTIONS: Mapping[str, Any] = {"host": "127.0.0.1", "port": 8000}


class _Unset(enum.Enum):
    TOKEN = 0


@dataclasses.dataclass
class _Application:
    # The deployments of one application: name as written -> name in the runtime (the same,
    # but for the ingress, which runs under the application's name).
    deployments: dict[str, str]
    route_prefix: str | None


_default: Runtime | None = None
_server: HTTPServer | None = None
_http_options: dict[str, Any] = dict(DEFAULT_HTTP_OPTIONS)
_apps: dict[str, _Application] = {}
# Guards the globals above only; never held while deploying, since a constructor may look a
# handle up by name (get_deployment_handle) while its application deploys.
_lock = threading.RLock()


def _default_runtime() -> Runtime:
    global _default
    with _lock:
        if _default is None:
            _default = Runtime(name="default")
        return _default


def _serve_http(runtime: Runtime) -> None:
    global _server
    with _lock:
        if _server is None or not _server.running:
            _server = runtime.serve_http(_http_options["host"], _http_options["port"])


def start(
    http_options: Mapping[str, Any] | None = None,
    *,
    detached: bool = False,
    proxy_location: Any = None,
) -> None:
    """Start the default runtime and its HTTP server (Ray Serve's ``serve.start``).

    ``http_options={"host": ..., "port": ...}`` chooses where HTTP is served (default
    127.0.0.1:8000; port 0 picks a free one). Called again with other options while the server
    runs, it keeps the running one and logs a warning, as Ray Serve does. ``detached`` and
    ``proxy_location`` are accepted and ignored: the runtime lives in this process.
    """
    options = dict(http_options or {})
    unknown = sorted(set(options) - set(DEFAULT_HTTP_OPTIONS))
    if unknown:
        raise TypeError(f"http_options {unknown} are not offered; known: host, port")
    with _lock:
        wanted = {**DEFAULT_HTTP_OPTIONS, **options}
        if _server is not None and _server.running and wanted != _http_options:
            logger.warning(
                "the HTTP server runs with %s already; the new http_options are ignored",
                _http_options,
            )
            return
        _http_options.update(wanted)
        _serve_http(_default_runtime())


def run(
    target: Application | Deployment,
    blocking: bool = False,
    name: str = DEFAULT_APP_NAME,
    route_prefix: str | _Unset | None = _Unset.TOKEN,
    *,
    timeout_s: float | None = None,
) -> Handle:
    """Deploy ``target`` as the application ``name`` on the default runtime; return its handle.

    As Ray Serve's ``serve.run``: waits until its replicas run, serves it over HTTP at
    ``route_prefix`` (default: the deployment's ``route_prefix``, else ``"/"``; None: no HTTP),
    and replaces the application of the same name, if any (a rolling update; deployments it
    had and this one has not are deleted). ``blocking=True`` then serves until Ctrl-C. A
    deployment belongs to one application: binding one that another application runs is a
    ``ValueError`` (rename it with ``.options(name=...)``).
    """
    if isinstance(target, Deployment):
        target = target.bind()
    if not isinstance(target, Application):
        raise TypeError(f"run() takes an Application (Deployment.bind(...)), got {target!r}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    prefix = (
        (target.deployment.config.route_prefix or "/")
        if isinstance(route_prefix, _Unset)
        else route_prefix
    )
    names = {
        (target.name if node is target else node.deployment.name): (
            name if node is target else node.deployment.name
        )
        for node in target.walk()
    }
    runtime = _default_runtime()
    with _lock:
        _check_owners(name, set(names.values()))
        before = _apps.get(name)
        # Known before deploying, so that constructors can look their siblings up by name.
        merged = {**(before.deployments if before else {}), **names}
        _apps[name] = _Application(merged, prefix)
    try:
        handle = runtime.run(target, name=name, route_prefix=prefix, timeout_s=timeout_s)
    except BaseException:
        with _lock:
            if before is None:
                _apps.pop(name, None)
            else:
                _apps[name] = before
        raise
    with _lock:
        _apps[name] = _Application(names, prefix)
    for left in sorted(set(merged.values()) - set(names.values())):
        runtime.delete(left)
    if prefix is not None:
        _serve_http(runtime)
    with _lock:
        server = _server
    if server is not None:
        server.reroute()
    if blocking:
        try:
            threading.Event().wait()  # until Ctrl-C, as serve.run(blocking=True)
        except KeyboardInterrupt:
            shutdown()
    return handle


def _check_owners(name: str, wanted: set[str]) -> None:
    for other, app in _apps.items():
        if other == name:
            continue
        taken = sorted(wanted & ({other} | set(app.deployments.values())))
        if taken:
            raise ValueError(
                f"application {name!r} would run deployment(s) {taken} of application "
                f"{other!r}: a deployment belongs to one application here; rename it with "
                ".options(name=...) or delete the other application first"
            )


def _runtime_or_none() -> Runtime | None:
    with _lock:
        return _default


def get_app_handle(name: str) -> Handle:
    """A handle to the ingress deployment of the application ``name``."""
    with _lock:
        if name not in _apps or _default is None:
            raise KeyError(f"no application named {name!r}; running: {sorted(_apps)}")
        return Handle(_default.id, name)


def get_deployment_handle(deployment_name: str, app_name: str | None = None) -> Handle:
    """A handle to the deployment ``deployment_name`` of the application ``app_name``.

    ``app_name`` defaults to the caller's application inside a replica, else to the only one
    running, else to ``"default"``.
    """
    with _lock:
        if app_name is None:
            app_name = _current_app()
        app = _apps.get(app_name)
        if app is None or _default is None:
            raise KeyError(f"no application named {app_name!r}; running: {sorted(_apps)}")
        found = app.deployments.get(deployment_name)
        if found is None:
            raise KeyError(
                f"application {app_name!r} has no deployment {deployment_name!r}; "
                f"it has {sorted(app.deployments)}"
            )
        return Handle(_default.id, found)


def _current_app() -> str:
    try:
        return get_replica_context().app_name or DEFAULT_APP_NAME
    except RuntimeError:
        return next(iter(_apps)) if len(_apps) == 1 else DEFAULT_APP_NAME


def get_handle(name: str) -> Handle:
    """A handle to the application, or the deployment, called ``name``."""
    with _lock:
        for app in _apps.values():
            if name not in _apps and name in app.deployments:
                name = app.deployments[name]
                break
    return _default_runtime().get_handle(name)


def delete(name: str) -> None:
    """Delete the application ``name`` and its deployments (nothing when there is none)."""
    with _lock:
        app = _apps.pop(name, None)
        runtime = _default
    if app is None or runtime is None:
        return
    runtime.delete(name)  # the ingress first: it holds handles to the others
    for left in sorted(set(app.deployments.values()) - {name}):
        runtime.delete(left)


def status() -> ServeStatus:
    """The applications of the default runtime and their deployments, in Ray Serve's shape.

    ``embserve.status().applications["default"].status`` is ``"RUNNING"`` once every
    deployment of it is; ``.deployments["Model"].status`` is ``"HEALTHY"`` then. The full
    snapshot of the runtime (replicas, endpoints) is ``Runtime.status()``.
    """
    runtime = _runtime_or_none()
    if runtime is None:
        return ServeStatus({})
    snapshot = runtime.status()
    with _lock:
        apps = {name: dataclasses.replace(app) for name, app in _apps.items()}
        url = _server.url if _server is not None and _server.running else None
    applications = {}
    for name, app in apps.items():
        deployments = {
            written: deployment_overview(written, snapshot.deployments[actual])
            for written, actual in app.deployments.items()
            if actual in snapshot.deployments
        }
        state, message = application_status(deployments)
        applications[name] = ApplicationStatusOverview(
            name, state, message, app.route_prefix, deployments
        )
    return ServeStatus(applications, url)


def shutdown() -> None:
    """Stop the HTTP server and the default runtime; the next call starts anew, with defaults."""
    global _default, _server
    with _lock:
        runtime, _default = _default, None
        _server = None
        _apps.clear()
        _http_options.clear()
        _http_options.update(DEFAULT_HTTP_OPTIONS)
    if runtime is not None:
        runtime.shutdown()  # stops the server first
