"""Routing for the ASGI app: route prefixes, the routes an App is given, paths under mounts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.types import Scope

from embserve.deployment import Application, Deployment

__all__ = ["Route", "check_routes", "route_path"]


class Route:
    """A route prefix of the App and the endpoint that serves it.

    Whether a request streams and which HTTP methods it may use depend on the deployment the
    endpoint's traffic policy chooses for it, so they are decided per request by the runtime.
    """

    __slots__ = ("endpoint", "prefix", "slashed")

    def __init__(self, prefix: str, endpoint: str) -> None:
        self.prefix = prefix
        self.slashed = prefix.rstrip("/") + "/"
        self.endpoint = endpoint

    def matches(self, path: str) -> bool:
        """Whether ``path`` falls under this route prefix."""
        return path == self.prefix or path.startswith(self.slashed)


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
