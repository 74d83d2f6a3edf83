"""``embserve.App`` mounted into host apps: Starlette under hypercorn, FastAPI under uvicorn.

Mounts run no lifespan: the Starlette host's App starts its runtime on first use; the FastAPI
host serves ``rt.asgi_app()`` of a runtime it runs itself, and an App whose lifespan it adopts,
beside views that call handles of those same runtimes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import embserve
from embserve_asgi.server import bind
from tests.e2e.test_http import Server


@embserve.deployment
class Doubler:
    """Doubles ``?x=`` over HTTP, or its argument through a handle."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        x = int(request.query_params["x"])
        return {"x": x, "doubled": await self.compute(x), "path": request.url.path}

    async def compute(self, x: int) -> int:
        return 2 * x


@embserve.deployment
async def parse(request: Request) -> Any:
    """Answers the JSON it is sent; fails on purpose for ``{"fail": true}``."""
    payload = await request.json()
    if payload.get("fail"):
        raise RuntimeError("failed on purpose")
    return payload


@embserve.deployment
class Words:
    """Streams words."""

    async def __call__(self, request: Request) -> Any:
        for word in request.query_params["text"].split():
            yield word + " "


# -- Starlette host under hypercorn; the App starts its runtime on the first request ------


@pytest.fixture(scope="module")
def starlette_host() -> Iterator[tuple[Server, embserve.App]]:
    """A Starlette app with a host route and an embserve App mounted at /ml."""
    ml = embserve.App({"/double": Doubler.bind(), "/words": Words.bind()})

    async def host(request: Request) -> PlainTextResponse:
        return PlainTextResponse("from the host")

    app = Starlette(routes=[Route("/host", host), Mount("/ml", app=ml)])
    server = Server(app)
    yield server, ml
    assert server.loop is not None
    asyncio.run_coroutine_threadsafe(ml.shutdown(), server.loop).result(10)
    server.stop()


def test_mounted_in_starlette_starts_on_first_use(
    starlette_host: tuple[Server, embserve.App],
) -> None:
    server, ml = starlette_host
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/host").text == "from the host"
        r = http.get("/ml/double", params={"x": 21})
        assert r.status_code == 200
        assert r.json() == {"x": 21, "doubled": 42, "path": "/ml/double"}
        assert ml.runtime.loop is not None  # started by that request, no lifespan ran
        assert http.get("/ml/words", params={"text": "a b c"}).text == "a b c "
        assert http.get("/ml/nothing").status_code == 404
        assert http.get("/ml/-/healthz").json()["status"] == "ok"
        assert set(http.get("/ml/-/routes").json()) == {"/double", "/words"}


# -- FastAPI host under uvicorn, views calling handles of the same runtimes ---------------


class UvicornServer:
    """A FastAPI/Starlette app under uvicorn in a thread, on a port bound beforehand."""

    def __init__(self, app: Any) -> None:
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for it (and its lifespan shutdown)."""
        self.server.should_exit = True
        self._thread.join(30)
        assert not self._thread.is_alive()


@pytest.fixture(scope="module")
def fastapi_host() -> Iterator[tuple[UvicornServer, embserve.Runtime, embserve.App]]:
    """FastAPI mounting ``rt.asgi_app()`` at /ml and an App owning its runtime at /owned."""
    with embserve.Runtime() as rt:
        rt.run(Doubler.bind(), name="double", route_prefix="/double")
        rt.run(parse.bind(), name="parse", route_prefix="/parse")
        handle = rt.get_handle("double")
        owned = embserve.App(
            {"/words": Words.bind(), "/d": Doubler.options(name="owned-doubler").bind()}
        )
        api = FastAPI(lifespan=owned.lifespan)

        @api.get("/host/{x}")
        async def async_view(x: int) -> dict[str, int]:
            return {"x": x, "via_handle": await handle.compute.remote(x)}

        @api.get("/sync/{x}")
        def sync_view(x: int) -> dict[str, int]:
            return {"x": x, "via_handle": handle.compute.remote(x).result(timeout_s=5)}

        @api.get("/owned-view/{x}")
        async def owned_view(x: int) -> dict[str, int]:
            doubler = owned.runtime.get_handle("owned-doubler")
            return {"x": x, "via_handle": await doubler.compute.remote(x)}

        api.mount("/ml", rt.asgi_app())
        api.mount("/owned", owned)
        server = UvicornServer(api)
        yield server, rt, owned
        server.stop()


def test_fastapi_views_and_mounted_endpoints_share_a_runtime(
    fastapi_host: tuple[UvicornServer, embserve.Runtime, embserve.App],
) -> None:
    server, _, owned = fastapi_host
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/host/5").json() == {"x": 5, "via_handle": 10}
        assert http.get("/sync/7").json() == {"x": 7, "via_handle": 14}
        r = http.get("/ml/double", params={"x": 4})
        assert r.json() == {"x": 4, "doubled": 8, "path": "/ml/double"}
        assert r.headers["x-request-id"]
        assert http.post("/ml/parse", json={"a": [1, 2]}).json() == {"a": [1, 2]}
        assert http.post("/ml/parse", content=b"{broken").status_code == 400
        failed = http.post("/ml/parse", json={"fail": True}, headers={"x-request-id": "r-1"})
        assert failed.status_code == 500
        assert failed.json() == {"error": "internal server error", "request_id": "r-1"}
        assert http.get("/ml/unknown").status_code == 404
        assert http.get("/ml/-/routes").json()["/double"]["endpoint"] == "double"
        status = http.get("/ml/-/status").json()
        assert status["deployments"]["double"]["state"] == "HEALTHY"
        # The App whose lifespan FastAPI ran: started with the host, on its loop.
        assert http.get("/owned/words", params={"text": "x y"}).text == "x y "
        assert http.get("/owned/d", params={"x": 2}).json()["doubled"] == 4
        assert http.get("/owned-view/6").json() == {"x": 6, "via_handle": 12}
        assert owned.runtime.status().deployments["Words"].running_replicas == 1
        assert http.get("/owned/-/healthz").status_code == 200
        assert http.get("/host-missing").status_code == 404  # FastAPI's own 404 still works


def test_routes_added_later_are_served(
    fastapi_host: tuple[UvicornServer, embserve.Runtime, embserve.App],
) -> None:
    server, rt, _ = fastapi_host
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/ml/later", params={"x": 1}).status_code == 404
        rt.run(Doubler.options(name="later").bind(), route_prefix="/later")
        assert http.get("/ml/later", params={"x": 3}).json()["doubled"] == 6
        rt.delete("later")
        assert http.get("/ml/later", params={"x": 3}).status_code == 404
