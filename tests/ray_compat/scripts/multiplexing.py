"""Ray Serve's model multiplexing guide: models by id, over HTTP and through handles."""

import os

import httpx
from starlette.requests import Request

import embserve as serve

PORT = int(os.environ.get("PORT", "8000"))
serve.start(http_options={"port": PORT})


class Model:
    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def predict(self, data: str) -> str:
        return f"model {self.model_id}: {data}"


@serve.deployment
class ModelInferencer:
    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str) -> Model:
        return Model(model_id)

    async def __call__(self, request: Request) -> str:
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        return model.predict((await request.body()).decode())


handle = serve.run(ModelInferencer.bind())

resp = httpx.post(
    f"http://localhost:{PORT}", headers={"serve_multiplexed_model_id": "1"}, content=b"hi"
)
print(resp.text)
assert resp.text == "model 1: hi"


@serve.deployment
class Upstream:
    def __init__(self, downstream: serve.Handle) -> None:
        self.downstream = downstream

    async def __call__(self, request: Request) -> str:
        model_id = request.query_params["model"]
        result: str = await self.downstream.options(multiplexed_model_id=model_id).predict.remote(
            "via a handle"
        )
        return result


@serve.deployment
class Downstream:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Model:
        return Model(model_id)

    async def predict(self, data: str) -> str:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return model.predict(data)


serve.run(Upstream.bind(Downstream.bind()), name="composed", route_prefix="/composed")
resp = httpx.get(f"http://localhost:{PORT}/composed", params={"model": "7"})
assert resp.text == "model 7: via a handle", resp.text
print("ok")
