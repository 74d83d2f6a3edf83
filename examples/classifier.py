"""A numpy classifier with dynamic batching, served over HTTP.

``embserve run examples/classifier.py:app`` serves it; each request is one feature vector::

    curl -s -X POST http://127.0.0.1:8000/classify -d '{"features": [1, 0, 0, 0, 0, 0, 0, 0]}'

The model is a linear layer and a softmax over ``LABELS``; requests that arrive together are
classified in one matrix product (``@embserve.batch``), which is what keeps a GPU or BLAS busy.
``/-/metrics`` shows the batch sizes (``embserve_batch_size``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

import embserve

if TYPE_CHECKING:
    from starlette.requests import Request

LABELS = ("cat", "dog", "bird", "fish")
FEATURES = 8


def make_weights(seed: int = 0) -> np.ndarray:
    """Weights for the example: feature ``i`` votes for label ``i % len(LABELS)``."""
    weights = np.zeros((FEATURES, len(LABELS)), np.float32)
    for i in range(FEATURES):
        weights[i, i % len(LABELS)] = 4.0
    noise = np.random.default_rng(seed).normal(0, 0.01, weights.shape).astype(np.float32)
    return weights + noise


@embserve.deployment(num_replicas=2)
class Classifier:
    """Classifies feature vectors, a batch at a time."""

    def __init__(self, seed: int) -> None:
        self.weights = make_weights(seed)  # a real model loads its weights here

    @embserve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def __call__(self, rows: list[np.ndarray]) -> list[dict[str, object]]:
        logits = np.stack(rows) @ self.weights
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        return [
            {"label": LABELS[int(p.argmax())], "probability": round(float(p.max()), 4)}
            for p in probabilities
        ]


@embserve.deployment
class ClassifierAPI:
    """``POST /classify`` with ``{"features": [8 numbers]}``."""

    http_methods = ("POST",)
    http_example = '{"features": [1, 0, 0, 0, 0, 0, 0, 0]}'

    def __init__(self, classifier: embserve.Handle) -> None:
        self.classifier = classifier

    async def __call__(self, request: Request) -> object:
        body = await request.json()
        features = body.get("features") if isinstance(body, dict) else None
        if not isinstance(features, list) or len(features) != FEATURES:
            raise embserve.HTTPError(400, f'expected {{"features": [{FEATURES} numbers]}}')
        try:
            row = np.asarray(features, np.float32)
        except (TypeError, ValueError):
            raise embserve.HTTPError(400, "features must be numbers") from None
        return await self.classifier.remote(row)


app = embserve.App({"/classify": ClassifierAPI.bind(Classifier.bind(0))})
