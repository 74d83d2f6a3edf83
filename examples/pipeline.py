"""A composition pipeline: preprocess, two models side by side, and a combiner.

``embserve run examples/pipeline.py:app`` serves it::

    curl -s -X POST http://127.0.0.1:8000/pipeline -d 'The service was GREAT, the food was good'

Each stage is a deployment of its own (its own replicas, limits and batching); the ingress gets
handles to the others through ``bind`` and calls the two models concurrently. A response is
passed straight into the next call, so the combiner waits for both without the ingress waiting
in between.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

import embserve

if TYPE_CHECKING:
    from starlette.requests import Request


@embserve.deployment
def preprocess(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped."""
    return re.findall(r"[a-z']+", text.lower())


@embserve.deployment(num_replicas=2)
class Sentiment:
    """Counts positive and negative words."""

    def __init__(self, positive: list[str], negative: list[str]) -> None:
        self.positive = set(positive)
        self.negative = set(negative)

    def __call__(self, words: list[str]) -> float:
        score = sum(w in self.positive for w in words) - sum(w in self.negative for w in words)
        return score / max(len(words), 1)


@embserve.deployment
def topics(words: list[str]) -> list[str]:
    """The topics a text mentions, from a small keyword table."""
    table = {"food": "food", "service": "service", "price": "price", "staff": "service"}
    return sorted({table[w] for w in words if w in table})


@embserve.deployment
def combine(score: float, found: list[str]) -> dict[str, object]:
    """One answer from the two models' outputs."""
    label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return {"label": label, "score": round(score, 3), "topics": found}


@embserve.deployment
class Pipeline:
    """The HTTP face: ``POST /pipeline`` with a text body."""

    http_methods = ("POST",)
    http_example = "The service was GREAT, the food was good"

    def __init__(
        self,
        preprocess: embserve.Handle,
        sentiment: embserve.Handle,
        topics: embserve.Handle,
        combine: embserve.Handle,
    ) -> None:
        self.preprocess = preprocess
        self.sentiment = sentiment
        self.topics = topics
        self.combine = combine

    async def run(self, text: str) -> object:
        """The whole pipeline on one text (also callable through a handle)."""
        words = await self.preprocess.remote(text)
        # The two models run at once; their responses go straight into the combiner.
        score, found = self.sentiment.remote(words), self.topics.remote(words)
        return await self.combine.remote(score, found)

    async def __call__(self, request: Request) -> object:
        return await self.run((await request.body()).decode("utf-8", "replace"))


pipeline = Pipeline.bind(
    preprocess.bind(),
    Sentiment.bind(["good", "great", "love"], ["bad", "slow", "awful"]),
    topics.bind(),
    combine.bind(),
)
app = embserve.App({"/pipeline": pipeline})


def main() -> None:
    """Call the pipeline through a handle, concurrently, on a local runtime."""

    async def go(handle: embserve.Handle) -> list[object]:
        texts = ["the food was great", "slow service and bad food", "fine"]
        return list(await asyncio.gather(*(handle.run.remote(t) for t in texts)))

    with embserve.Runtime() as runtime:
        handle = runtime.run(pipeline, name="pipeline")
        for answer in asyncio.run(go(handle)):
            print(answer)


if __name__ == "__main__":
    main()
