"""embserve: an embeddable, in-process model-serving runtime with pluggable cluster backends.

Decorate functions and classes with :func:`deployment`, run them with a :class:`Runtime`, call
them through :class:`Handle` objects from any Python code, serve them over HTTP with :class:`App`.
``import embserve`` is light: backends and the ASGI adapter load when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from embserve._default import (
    delete,
    get_app_handle,
    get_deployment_handle,
    get_handle,
    run,
    shutdown,
    start,
    status,
)
from embserve._http import HTTPServer
from embserve.batching import Batcher, batch
from embserve.context import ReplicaContext, get_replica_context
from embserve.deployment import Application, Deployment, DeploymentConfig, deployment
from embserve.errors import (
    BackendNotFoundError,
    BackPressureError,
    DeploymentFailedError,
    DeploymentTimeoutError,
    DeploymentUnavailableError,
    EmbserveError,
    HTTPError,
    MethodNotAllowedError,
    ReplicaDiedError,
    RequestTimeoutError,
    remote_traceback,
)
from embserve.handle import Handle, Response, ResponseStream
from embserve.multiplex import get_multiplexed_model_id, multiplexed
from embserve.replica import ReplicaState
from embserve.request import Request, RequestContext, get_request_context
from embserve.runtime import Runtime
from embserve.snapshot import (
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    EndpointStatus,
    ReplicaStatus,
    RuntimeStatus,
    ServeStatus,
)

__version__ = "0.1.0"

__all__ = [
    "App",
    "Application",
    "ApplicationStatusOverview",
    "BackPressureError",
    "BackendNotFoundError",
    "Batcher",
    "Deployment",
    "DeploymentConfig",
    "DeploymentFailedError",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "DeploymentTimeoutError",
    "DeploymentUnavailableError",
    "EmbserveError",
    "EndpointStatus",
    "HTTPError",
    "HTTPServer",
    "Handle",
    "MethodNotAllowedError",
    "ReplicaContext",
    "ReplicaDiedError",
    "ReplicaState",
    "ReplicaStatus",
    "Request",
    "RequestContext",
    "RequestTimeoutError",
    "Response",
    "ResponseStream",
    "Runtime",
    "RuntimeStatus",
    "ServeStatus",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "get_request_context",
    "ingress",
    "multiplexed",
    "remote_traceback",
    "run",
    "shutdown",
    "start",
    "status",
]


def __getattr__(name: str) -> Any:
    # embserve.App lives in the embserve-asgi distribution; load it on first use only, so that
    # `import embserve` imports no web framework.
    # embserve.ingress likewise: FastAPI apps are the adapter's business.
    if name in ("App", "ingress"):
        try:
            return getattr(importlib.import_module("embserve_asgi"), name)
        except ImportError:
            from embserve._install import install_command

            raise AttributeError(
                f"embserve.{name} needs the ASGI adapter: {install_command('asgi')}"
            ) from None
    raise AttributeError(f"module 'embserve' has no attribute {name!r}")
