"""A FastAPI service that mounts an App on the process backend, for ``hypercorn`` to import.

``hypercorn tests.e2e.process_service:api`` runs it in hypercorn's worker, a daemonic
``multiprocessing`` child. Its deployment uses two module globals that cannot travel by value
(a lock and the FastAPI app itself): it must reach its worker by reference.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request

import embserve

lock = threading.Lock()


@embserve.deployment
class Where:
    """Says which process served the request and which app mounts it."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        with lock:
            return {"pid": os.getpid(), "title": api.title}


ml = embserve.App({"/where": Where.bind()}, backend="process")
api = FastAPI(title="process-service", lifespan=ml.lifespan)
api.mount("/ml", ml)
