"""embserve: an embeddable, in-process model-serving runtime with pluggable cluster backends.

Decorate functions and classes with :func:`deployment`, run them with a :class:`Runtime`, call
them through :class:`Handle` objects from any Python code, serve them over HTTP with :class:`App`.
``import embserve`` is light: backends and the ASGI adapter load when first used.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from embserve._default import get_handle, run, shutdown
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
from embserve.snapshot import DeploymentStatus, EndpointStatus, ReplicaStatus, RuntimeStatus

__version__ = "0.1.0"

# The library prints nothing itself: its records go to the "embserve" logger hierarchy, and
# where an application configured no logging they are dropped, not written to stderr.
logging.getLogger("embserve").addHandler(logging.NullHandler())

__all__ = [
    "App",
    "Application",
    "BackPressureError",
    "BackendNotFoundError",
    "Batcher",
    "Deployment",
    "DeploymentConfig",
    "DeploymentFailedError",
    "DeploymentStatus",
    "DeploymentTimeoutError",
    "DeploymentUnavailableError",
    "EmbserveError",
    "EndpointStatus",
    "HTTPError",
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
    "batch",
    "deployment",
    "get_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "get_request_context",
    "multiplexed",
    "remote_traceback",
    "run",
    "shutdown",
]


def __getattr__(name: str) -> Any:
    # embserve.App lives in the embserve-asgi distribution; load it on first use only, so that
    # `import embserve` imports no web framework.
    if name == "App":
        try:
            return importlib.import_module("embserve_asgi").App
        except ImportError:
            raise AttributeError(
                "embserve.App needs the ASGI adapter: pip install embserve-asgi"
            ) from None
    raise AttributeError(f"module 'embserve' has no attribute {name!r}")
