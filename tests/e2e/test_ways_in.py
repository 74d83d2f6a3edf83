"""The user's ways in, end to end, written only against the public API.

1. A library inside an existing web server: sync and async views of a Starlette app (under a real
   hypercorn) call the same handle, with the runtime on its own thread or on the server's loop.
3. Local mode in unit tests: the pytest plugin's runtime fixture.
And the Ray Serve quickstart idiom on the module-level helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import embserve
from tests.e2e.servers import get_json, hypercorn_server


@embserve.deployment(num_replicas=2, max_ongoing_requests=16)
class Scorer:
    def __init__(self, weight: float) -> None:
        self.weight = weight

    async def __call__(self, x: float) -> float:
        return x * self.weight

    def describe(self) -> str:
        return f"scorer x{self.weight}"


def web_app(get_handle: Any, lifespan: Any = None) -> Starlette:
    """An existing Starlette app whose views call embserve through a handle."""

    def sync_view(request: Request) -> JSONResponse:  # runs in Starlette's thread pool
        x = float(request.query_params["x"])
        return JSONResponse({"score": get_handle().remote(x).result(timeout_s=5)})

    async def async_view(request: Request) -> JSONResponse:  # runs on the server's loop
        x = float(request.query_params["x"])
        return JSONResponse({"score": await get_handle().remote(x)})

    async def describe(request: Request) -> JSONResponse:
        return JSONResponse({"text": await get_handle().describe.remote()})

    routes = [
        Route("/sync", sync_view),
        Route("/async", async_view),
        Route("/describe", describe),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def exercise(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        assert get_json(client, "/sync?x=2") == {"score": 6.0}
        assert get_json(client, "/async?x=3") == {"score": 9.0}
        assert get_json(client, "/describe") == {"text": "scorer x3.0"}

        def both(i: int) -> tuple[Any, Any]:
            return get_json(client, f"/sync?x={i}"), get_json(client, f"/async?x={i}")

        with ThreadPoolExecutor(8) as pool:
            for i, (sync, async_) in enumerate(pool.map(both, range(100))):
                assert sync == async_ == {"score": 3.0 * i}


def test_views_call_a_runtime_on_its_own_thread() -> None:
    with embserve.Runtime() as runtime:
        handle = runtime.run(Scorer.bind(3.0))
        with hypercorn_server(web_app(lambda: handle)) as url:
            exercise(url)


def test_views_call_a_runtime_on_the_servers_loop() -> None:
    state: dict[str, embserve.Handle] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with embserve.Runtime() as runtime:
            state["handle"] = await runtime.run_async(Scorer.bind(3.0))
            yield

    with hypercorn_server(web_app(lambda: state["handle"], lifespan)) as url:
        exercise(url)


def test_unit_test_with_the_plugin_runtime(embserve_runtime: embserve.Runtime) -> None:
    handle = embserve_runtime.run(Scorer.bind(0.5))
    assert handle.remote(4).result(timeout_s=1) == 2.0
    assert embserve_runtime.status().deployments["Scorer"].running_replicas == 2


def test_ray_serve_quickstart_idiom() -> None:
    handle = embserve.run(Scorer.bind(2.0), route_prefix=None)  # handles only: no HTTP
    try:
        assert handle.describe.remote().result() == "scorer x2.0"
        assert handle.remote(21).result() == 42.0
    finally:
        embserve.shutdown()
