"""The quickstart: two deployments, one composed into the other, called through handles.

Run it with ``make demo`` (or ``python examples/quickstart.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import embserve


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


app = Sentiment.bind(Tokenizer.bind())


def main() -> None:
    """Run the app on a local runtime and call it the ways a user would."""
    with embserve.Runtime() as runtime:
        handle = runtime.run(app, name="sentiment", route_prefix="/sentiment")
        print(handle.remote("I love fast serving").result(timeout_s=5))
        print(list(handle.options(stream=True).stream_words.remote("streamed word by word")))
        for name, status in runtime.status().deployments.items():
            print(f"{name}: {status.state}, {status.running_replicas} replica(s) running")


if __name__ == "__main__":
    main()
