"""An existing FastAPI app that hosts embserve: a view calling a handle, and an App mounted.

Serve it with any ASGI server::

    uvicorn fastapi_host:api --app-dir examples --port 8000
    curl -s 'http://127.0.0.1:8000/predict?x=0.7'                    # a FastAPI view
    curl -s -X POST http://127.0.0.1:8000/ml/clf -d '{"x": 0.7}'     # the mounted App

The App's lifespan is the host's, so the runtime starts with the server (on its event loop: async
views reach in-thread replicas with no thread hop) and drains when the server stops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

import embserve

if TYPE_CHECKING:
    from starlette.requests import Request


@embserve.deployment(num_replicas=2)
class Classifier:
    """Above the threshold is class 1."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: float) -> int:
        return int(x > self.threshold)

    def explain(self, x: float) -> dict[str, object]:
        """Why ``x`` gets its class."""
        return {"x": x, "threshold": self.threshold, "label": self(x)}


@embserve.deployment
class ClassifierAPI:
    """The model over HTTP: ``POST /ml/clf`` with ``{"x": number}``."""

    http_methods = ("POST",)

    def __init__(self, classifier: embserve.Handle) -> None:
        self.classifier = classifier

    async def __call__(self, request: Request) -> dict[str, int]:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("x"), (int, float)):
            raise embserve.HTTPError(400, 'expected {"x": number}')
        return {"label": await self.classifier.remote(float(body["x"]))}


ml = embserve.App({"/clf": ClassifierAPI.bind(Classifier.bind(0.5))})
api = FastAPI(title="A host app", lifespan=ml.lifespan)
api.mount("/ml", ml)


@api.get("/predict")
async def predict(x: float) -> dict[str, int]:
    """A view of the host calling the model through a handle of the App's runtime."""
    label: int = await ml.runtime.get_handle("Classifier").remote(x)
    return {"label": label}


@api.get("/explain")
def explain(x: float) -> dict[str, object]:
    """A sync view (run in the server's thread pool) waiting on a handle."""
    answer: dict[str, object] = (
        ml.runtime.get_handle("Classifier").explain.remote(x).result(timeout_s=5)
    )
    return answer


@api.get("/health")
async def health() -> dict[str, str]:
    """The host's own route."""
    return {"status": "ok"}
