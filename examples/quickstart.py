"""The quickstart: two deployments, one composed into the other, called through handles and HTTP.

``python examples/quickstart.py`` calls them through handles (the console demo, :func:`main`).
``make demo`` (``embserve run examples/quickstart.py:app``) serves them over HTTP on one route,
``/sentiment``, the one it lists. A route matches the paths under its prefix too, and
:class:`SentimentAPI` answers ``/sentiment/words`` word by word::

    curl -s -X POST http://127.0.0.1:8000/sentiment -d 'I love fast serving'
    curl -s -X POST http://127.0.0.1:8000/sentiment/words -d 'streamed word by word'
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import embserve

if TYPE_CHECKING:
    from starlette.requests import Request


@embserve.deployment
class Tokenizer:
    """Splits text into lower-case words."""

    def __call__(self, text: str) -> list[str]:
        return text.lower().split()


@embserve.deployment(num_replicas=2, max_ongoing_requests=8)
class Sentiment:
    """A toy sentiment model that uses the tokenizer through a handle."""

    def __init__(self, tokenizer: embserve.Handle) -> None:
        self.tokenizer = tokenizer
        self.good = {"good", "great", "love", "fast"}

    async def __call__(self, text: str) -> dict[str, object]:
        words = await self.tokenizer.remote(text)
        score = sum(word in self.good for word in words) / max(len(words), 1)
        return {"text": text, "score": score, "label": "positive" if score > 0.2 else "neutral"}

    async def stream_words(self, text: str) -> AsyncIterator[str]:
        for word in await self.tokenizer.remote(text):
            yield word


@embserve.deployment
class SentimentAPI:
    """The HTTP face of the model: POST text to ``/sentiment``, or to ``/sentiment/words``."""

    http_methods = ("POST",)
    http_example = "I love fast serving"  # the body of the curl line `embserve run` suggests

    def __init__(self, sentiment: embserve.Handle) -> None:
        self.sentiment = sentiment

    async def __call__(self, request: Request) -> Any:
        try:
            text = (await request.body()).decode("utf-8")
        except UnicodeDecodeError:
            raise embserve.HTTPError(400, "the request body is not UTF-8 text") from None
        if request.url.path.endswith("/words"):
            return [
                word async for word in self.sentiment.options(stream=True).stream_words.remote(text)
            ]
        return await self.sentiment.remote(text)


sentiment_app = Sentiment.bind(Tokenizer.bind())

# What `embserve run examples/quickstart.py:app` serves: an ASGI app that owns its runtime.
app = embserve.App({"/sentiment": SentimentAPI.bind(sentiment_app)})


def main() -> None:
    """Run the app on a local runtime and call it the ways a user would."""
    with embserve.Runtime() as runtime:
        handle = runtime.run(sentiment_app, name="sentiment", route_prefix="/sentiment")
        print(handle.remote("I love fast serving").result(timeout_s=5))
        print(list(handle.options(stream=True).stream_words.remote("streamed word by word")))
        for name, status in runtime.status().deployments.items():
            print(f"{name}: {status.state}, {status.running_replicas} replica(s) running")


if __name__ == "__main__":
    main()
