"""Routing for the ASGI app: route prefixes, the routes an App is given, paths under mounts."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from starlette.types import Scope

from embserve.deployment import Application, Deployment

__all__ = ["Route", "check_routes", "is_generator", "route_path"]


class Route:
    """A route prefix of the App and what serves it: the endpoint, its methods, streaming."""

    __slots__ = ("endpoint", "methods", "prefix", "slashed", "streaming")

    def __init__(self, prefix: str, endpoint: str, deployment: Deployment | None) -> None:
        self.prefix = prefix
        self.slashed = prefix.rstrip("/") + "/"
        self.endpoint = endpoint
        target = deployment.target if deployment is not None else None
        self.streaming = is_generator(target)
        methods = getattr(target, "http_methods", None)
        self.methods: frozenset[str] | None = None
        if methods:
            allowed = {str(m).upper() for m in methods}
            if "GET" in allowed:
                allowed.add("HEAD")
            self.methods = frozenset(allowed)

    def matches(self, path: str) -> bool:
        """Whether ``path`` falls under this route prefix."""
        return path == self.prefix or path.startswith(self.slashed)


def is_generator(target: Any) -> bool:
    """Whether a deployment target answers with a generator (its route streams)."""
    if target is None:
        return False
    fn = target.__call__ if inspect.isclass(target) else target
    return inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)


def route_path(scope: Scope) -> str:
    """The request path below the ``root_path`` a host app mounted us at."""
    # Starlette's mounts keep the full path and set root_path; the part under it is ours.
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        rest = path[len(root) :]
        if not rest:
            return "/"
        if rest[0] == "/":
            return rest
    return path


def check_routes(routes: Mapping[str, Application], *, admin: bool) -> list[tuple[str, Any]]:
    """Validate an App's routes: prefixes, the admin prefix, one route per deployment name."""
    if not isinstance(routes, Mapping):
        raise TypeError(f"routes must map route prefixes to applications, got {routes!r}")
    checked: list[tuple[str, Application]] = []
    names: dict[str, str] = {}
    for prefix, application in routes.items():
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ValueError(f"a route prefix must start with '/', got {prefix!r}")
        if admin and (prefix == "/-" or prefix.startswith("/-/")):
            raise ValueError(f"route prefix {prefix!r} is taken by the admin routes (admin=True)")
        if isinstance(application, Deployment):
            application = application.bind()
        if not isinstance(application, Application):
            raise TypeError(
                f"routes[{prefix!r}] must be an Application (Deployment.bind(...)), "
                f"got {application!r}"
            )
        other = names.get(application.name)
        if other is not None:
            raise ValueError(
                f"routes {other!r} and {prefix!r} both deploy {application.name!r}; give one "
                "another name with .options(name=...)"
            )
        names[application.name] = prefix
        checked.append((prefix, application))
    return checked
