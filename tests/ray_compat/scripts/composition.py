"""Ray Serve's model composition guide: handles, responses passed on, apps by name."""

import os

import httpx
from starlette.requests import Request

import embserve as serve
from embserve.handle import DeploymentHandle, DeploymentResponse

PORT = int(os.environ.get("PORT", "8000"))
serve.start(http_options={"port": PORT})


@serve.deployment
class Adder:
    def __init__(self, increment: int) -> None:
        self._increment = increment

    def __call__(self, val: int) -> int:
        return val + self._increment


@serve.deployment
class Multiplier:
    def __init__(self, multiple: int) -> None:
        self._multiple = multiple

    def __call__(self, val: int) -> int:
        return val * self._multiple


@serve.deployment
class Ingress:
    def __init__(self, adder: DeploymentHandle, multiplier: DeploymentHandle) -> None:
        self._adder = adder
        self._multiplier = multiplier

    async def __call__(self, input: int) -> int:
        adder_response: DeploymentResponse = self._adder.remote(input)
        # Pass the adder response directly into the multiplier (no `await` needed).
        multiplier_response: DeploymentResponse = self._multiplier.remote(adder_response)
        # `await` the final chained response.
        result: int = await multiplier_response
        return result


app = Ingress.bind(Adder.bind(increment=1), Multiplier.bind(multiple=2))

handle: DeploymentHandle = serve.run(app)
response = handle.remote(5)
assert response.result() == 12, "(5 + 1) * 2 = 12"


# An HTTP front for the same graph, as a second application.
@serve.deployment
class Calculator:
    def __init__(self, ingress: DeploymentHandle) -> None:
        self._ingress = ingress

    async def __call__(self, request: Request) -> dict[str, int]:
        value = int(request.query_params["value"])
        return {"result": await self._ingress.remote(value)}


serve.run(Calculator.bind(serve.get_app_handle("default")), name="calc", route_prefix="/calc")
print(httpx.get(f"http://localhost:{PORT}/calc", params={"value": 2}).json())
assert httpx.get(f"http://localhost:{PORT}/calc", params={"value": 2}).json() == {"result": 6}

# Handles and status by name.
adder = serve.get_deployment_handle("Adder", app_name="default")
assert adder.remote(1).result() == 2
status = serve.status()
assert sorted(status.applications) == ["calc", "default"]
assert sorted(status.applications["default"].deployments) == ["Adder", "Ingress", "Multiplier"]
assert all(d.status == "HEALTHY" for d in status.applications["default"].deployments.values())

serve.delete("calc")
assert sorted(serve.status().applications) == ["default"]
assert httpx.get(f"http://localhost:{PORT}/calc", params={"value": 2}).status_code == 404
serve.shutdown()
print("ok")
