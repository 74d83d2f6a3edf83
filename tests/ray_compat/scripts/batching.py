"""Ray Serve's dynamic request batching guide: batch, batch_size_fn, batched streams."""

import os
from collections.abc import AsyncGenerator

import httpx
from starlette.requests import Request
from starlette.responses import StreamingResponse

import embserve as serve
from embserve.handle import DeploymentHandle

PORT = int(os.environ.get("PORT", "8000"))
serve.start(http_options={"port": PORT})


@serve.deployment
class Model:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def __call__(self, multiple_samples: list[int]) -> list[int]:
        # Use numpy's vectorized computation to efficiently process a batch.
        return [sample * 2 for sample in multiple_samples]


handle: DeploymentHandle = serve.run(Model.bind())
responses = [handle.remote(i) for i in range(8)]
assert [r.result() for r in responses] == [i * 2 for i in range(8)]


@serve.deployment
class Tokens:
    # The size of a batch is its number of tokens, not of requests.
    @serve.batch(
        max_batch_size=512,
        batch_wait_timeout_s=0.05,
        batch_size_fn=lambda batch: sum(len(tokens) for tokens in batch),
    )
    async def __call__(self, batch: list[list[int]]) -> list[int]:
        return [len(tokens) for tokens in batch]


tokens = serve.run(Tokens.bind(), name="tokens", route_prefix=None)
assert tokens.remote([0] * 300).result() == 300  # alone it fits in 512
assert [r.result() for r in [tokens.remote([0] * 300), tokens.remote([0] * 300)]] == [300, 300]
try:
    tokens.remote([0] * 513).result()
except ValueError as exc:
    print("refused:", exc)
else:
    raise AssertionError("a request of 513 tokens fits no batch of 512")


@serve.deployment
class StreamingResponder:
    @serve.batch(max_batch_size=5, batch_wait_timeout_s=0.1)
    async def generate_numbers(
        self, max_list: list[int]
    ) -> AsyncGenerator[list[int | type[StopIteration]], None]:
        for i in range(max(max_list)):
            next_numbers: list[int | type[StopIteration]] = []
            for requested_max in max_list:
                if requested_max > i:
                    next_numbers.append(i)
                else:
                    next_numbers.append(StopIteration)
            yield next_numbers

    async def __call__(self, request: Request) -> StreamingResponse:
        max_number = int(request.query_params["max"])
        generator = self.generate_numbers(max_number)
        return StreamingResponse(
            (f"{number}," async for number in generator), media_type="text/plain"
        )


serve.run(StreamingResponder.bind(), name="stream", route_prefix="/stream")
with httpx.Client(base_url=f"http://localhost:{PORT}") as client:
    assert client.get("/stream", params={"max": 3}).text == "0,1,2,"
    assert client.get("/stream", params={"max": 1}).text == "0,"
print("ok")
