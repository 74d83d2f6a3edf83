"""@embserve.ingress: a FastAPI app's routes as methods of a deployment, on every backend."""

from __future__ import annotations

import os

import httpx
import pytest
from fastapi import FastAPI

import embserve
from tests.ray_compat.greeter import Greeter


@pytest.mark.parametrize("backend", ["local", "process"])
def test_routes_are_class_based_views_served_under_the_route_prefix(backend: str) -> None:
    with embserve.Runtime(backend) as rt:
        handle = rt.run(Greeter.bind("Hi"), route_prefix="/greet")
        server = rt.serve_http(port=0)
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                root = client.get("/greet")
                assert root.status_code == 200, root.text
                assert root.json()["greeting"] == "Hi"
                assert (root.json()["pid"] == os.getpid()) is (backend == "local")
                assert client.get("/greet/hello/ann", params={"shout": True}).json() == "HI, ANN"
                missing = client.get("/greet/hello/nobody")
                assert (missing.status_code, missing.json()) == (404, {"detail": "nobody is here"})
                assert client.get("/greet/hello/ann", params={"shout": "?"}).status_code == 422
                assert client.get("/greet/openapi.json").json()["paths"].keys() == {
                    "/",
                    "/hello/{name}",
                }
        finally:
            server.stop()
        assert handle.plain.remote(1).result(timeout_s=10) == 2
        assert not server.running


def test_ingress_refuses_what_it_cannot_serve() -> None:
    app = FastAPI()
    with pytest.raises(TypeError, match="defines __call__"):

        @embserve.ingress(app)
        class Both:
            def __call__(self) -> None: ...

    with pytest.raises(TypeError, match="decorates a class"):
        embserve.ingress(app)(len)
