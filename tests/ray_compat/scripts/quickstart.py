"""Ray Serve's quickstart, with `from ray import serve` replaced (a reversing "translator")."""

import os

import httpx
from starlette.requests import Request

import embserve as serve

PORT = int(os.environ.get("PORT", "8000"))  # the tests choose a free one; Ray's is 8000
serve.start(http_options={"port": PORT})


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.2, "num_gpus": 0})
class Translator:
    def __init__(self) -> None:
        # Ray's quickstart loads a transformers pipeline here; reversing stands in for it.
        self.model = reversed

    def translate(self, text: str) -> str:
        return "".join(self.model(text))

    async def __call__(self, http_request: Request) -> str:
        english_text: str = await http_request.json()
        return self.translate(english_text)


translator_app = Translator.bind()
serve.run(translator_app)

response = httpx.post(f"http://localhost:{PORT}/", json="Hello world!")
print(response.text)
assert response.text == "!dlrow olleH"
assert serve.status().applications["default"].status == "RUNNING"
assert serve.status().applications["default"].deployments["Translator"].status == "HEALTHY"
