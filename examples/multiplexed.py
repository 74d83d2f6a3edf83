"""A multiplexed model server: one deployment serving many models, each replica caching a few.

``embserve run examples/multiplexed.py:app`` serves it; the caller names the model in a header::

    curl -s -X POST http://127.0.0.1:8000/translate -H 'embserve-model-id: en-fr' -d 'hello world'

Each replica loads a model the first time a request names it and keeps the two it used last
(``max_num_models_per_replica``); the router sends a request to a replica that holds its model
already, so a model is loaded once per replica that serves it, not once per request. Ray
Serve's header ``serve_multiplexed_model_id`` works too.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import embserve

if TYPE_CHECKING:
    from starlette.requests import Request

# The "models": word tables standing in for weights that take a while to load.
DICTIONARIES = {
    "en-fr": {"hello": "bonjour", "world": "monde", "cat": "chat"},
    "en-de": {"hello": "hallo", "world": "welt", "cat": "katze"},
    "en-es": {"hello": "hola", "world": "mundo", "cat": "gato"},
}


class Translator:
    """One loaded model."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.table = DICTIONARIES[model_id]

    def translate(self, text: str) -> str:
        return " ".join(self.table.get(word, word) for word in text.lower().split())


@embserve.deployment(num_replicas=2)
class TranslationServer:
    """``POST /translate`` with the text as body and the model in ``embserve-model-id``."""

    http_methods = ("POST",)

    def __init__(self) -> None:
        self.loads: list[str] = []

    @embserve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Translator:
        if model_id not in DICTIONARIES:
            raise embserve.HTTPError(404, f"no model {model_id!r}; try {sorted(DICTIONARIES)}")
        await asyncio.sleep(0.05)  # loading weights takes time
        self.loads.append(model_id)
        return Translator(model_id)

    async def __call__(self, request: Request) -> dict[str, object]:
        model_id = embserve.get_multiplexed_model_id()
        if not model_id:
            raise embserve.HTTPError(400, "name a model in the embserve-model-id header")
        model = await self.get_model(model_id)
        text = (await request.body()).decode("utf-8", "replace")
        return {
            "model": model_id,
            "translation": model.translate(text),
            "replica": embserve.get_replica_context().replica_id,
            "loads_on_this_replica": len(self.loads),
        }


app = embserve.App({"/translate": TranslationServer.bind()})
