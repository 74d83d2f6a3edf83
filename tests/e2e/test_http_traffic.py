"""HTTP over a traffic split: what depends on the deployment (streaming, allowed methods) is
decided for the deployment the policy chose, under a real hypercorn with httpx."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from starlette.requests import Request

import embserve
from tests.e2e.servers import hypercorn_server


@embserve.deployment
class Streams:
    http_methods = ("POST",)

    async def __call__(self, request: Request) -> AsyncIterator[str]:
        for word in ("a", "b", "c"):
            yield word


@embserve.deployment
class Returns:
    async def __call__(self, request: Request) -> dict[str, str]:
        return {"id": embserve.get_request_context().request_id}


@pytest.fixture(params=["runtime thread", "server loop"])
def split(request: pytest.FixtureRequest) -> Iterator[tuple[httpx.Client, embserve.Runtime]]:
    """An endpoint split 50/50 between a streaming and a plain deployment, served over HTTP
    from a runtime on a thread of its own, or from the App's runtime on the server's loop."""
    if request.param == "runtime thread":
        with embserve.Runtime(seed=1) as rt:
            rt.run(Streams.bind(), name="split", route_prefix="/split")
            rt.run(Returns.bind(), name="returns")
            rt.set_traffic("split", {"split": 0.5, "returns": 0.5})
            with hypercorn_server(rt.asgi_app()) as url, httpx.Client(base_url=url) as client:
                yield client, rt
        return
    app = embserve.App({"/split": Streams.options(name="split").bind()})
    with hypercorn_server(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/-/healthz").status_code == 200
        app.runtime.run(Returns.bind(), name="returns")
        app.runtime.set_traffic("split", {"split": 0.5, "returns": 0.5})
        yield client, app.runtime


def test_a_split_between_a_stream_and_a_value_answers_every_request(
    split: tuple[httpx.Client, embserve.Runtime],
) -> None:
    client, _ = split
    bodies: Counter[str] = Counter()
    for index in range(60):
        response = client.post("/split", content=b"x", headers={"x-request-id": f"req-{index}"})
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("application/json"):
            assert response.json() == {"id": f"req-{index}"}  # the client's id reaches user code
            bodies["value"] += 1
        else:
            assert response.text == "abc"
            bodies["stream"] += 1
    assert bodies["value"] >= 10 and bodies["stream"] >= 10, bodies


def test_allowed_methods_follow_the_deployment_that_was_chosen(
    split: tuple[httpx.Client, embserve.Runtime],
) -> None:
    client, _ = split
    answers: Counter[int] = Counter()
    for _ in range(60):
        response = client.get("/split")
        answers[response.status_code] += 1
        if response.status_code == 405:
            assert response.headers["allow"] == "POST"
            assert response.json()["request_id"]
    assert set(answers) == {200, 405} and min(answers.values()) >= 10, answers
