"""The module-level API: ``embserve.run``, ``embserve.get_handle``, ``embserve.shutdown`` on a
default :class:`~embserve.Runtime`, created on first use (what Ray Serve's global API does)."""

from __future__ import annotations

import threading

from embserve.deployment import Application, Deployment
from embserve.handle import Handle
from embserve.runtime import Runtime

__all__ = ["get_handle", "run", "shutdown"]

_default: Runtime | None = None
_default_lock = threading.Lock()


def _default_runtime() -> Runtime:
    global _default
    with _default_lock:
        if _default is None:
            _default = Runtime(name="default")
        return _default


def run(
    app: Application | Deployment,
    *,
    name: str | None = None,
    route_prefix: str | None = None,
    wait: bool = True,
) -> Handle:
    """:meth:`Runtime.run` on the default runtime (created on first use)."""
    return _default_runtime().run(app, name=name, route_prefix=route_prefix, wait=wait)


def get_handle(name: str) -> Handle:
    """:meth:`Runtime.get_handle` on the default runtime."""
    return _default_runtime().get_handle(name)


def shutdown() -> None:
    """Shut the default runtime down; the next module-level call starts a new one."""
    global _default
    with _default_lock:
        runtime, _default = _default, None
    if runtime is not None:
        runtime.shutdown()
