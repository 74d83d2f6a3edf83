"""The ASGI adapter's parts without a server: conversion, errors, routing, snapshot, lifespan."""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import MutableMapping
from typing import Any, cast

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.exceptions import HTTPException
from starlette.requests import Request

import embserve
from embserve_asgi.app import App
from embserve_asgi.requests import BodyTooLarge, RequestSnapshot
from embserve_asgi.responses import error_response, to_response

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=60, deadline=None)
def test_json_values_round_trip(value: Any) -> None:
    response = to_response(value, "rid")
    assert response.headers["x-request-id"] == "rid"
    if isinstance(value, str):
        assert response.media_type == "text/plain; charset=utf-8"
        assert bytes(response.body).decode("utf-8") == value
    else:
        assert response.media_type == "application/json"
        assert json.loads(bytes(response.body)) == value


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.text("abc/-_", max_size=30).map(lambda p: "/" + p),
    query=st.text("abc=&%+0123", max_size=30).map(str.encode),
    headers=st.lists(
        st.tuples(st.text("abcxyz-", min_size=1, max_size=10), st.text("abc 123", max_size=10)),
        max_size=5,
    ),
    body=st.binary(max_size=200),
)
@settings(max_examples=40, deadline=None)
def test_snapshot_survives_pickling_and_becomes_the_request(
    method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes
) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    snapshot = RequestSnapshot(
        method=method,
        path=path,
        query_string=query,
        headers=raw,
        body=body,
        client=("10.0.0.1", 1234),
        request_id="r-9",
    )
    copy = pickle.loads(pickle.dumps(snapshot))
    request = copy.__embserve_materialize__()
    assert isinstance(request, Request)
    assert (request.method, request.scope["path"]) == (method, path)
    assert request.scope["query_string"] == query
    assert request.headers.raw == raw
    assert request.client is not None and request.client.host == "10.0.0.1"
    assert request.state.request_id == "r-9"
    assert asyncio.run(request.body()) == body


def test_materialized_request_answers_bad_json_with_400() -> None:
    snapshot = RequestSnapshot(method="POST", path="/", query_string=b"", headers=[], body=b"{nope")
    request = snapshot.__embserve_materialize__()
    with pytest.raises(embserve.HTTPError) as caught:
        asyncio.run(request.json())
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (embserve.HTTPError(404, "gone"), 404, None),
        (HTTPException(422, "bad"), 422, None),
        (BodyTooLarge(10), 413, None),
        (embserve.BackPressureError("full", retry_after_s=2.5), 503, "3"),
        (embserve.ReplicaDiedError("died"), 503, "1"),
        (embserve.RequestTimeoutError("slow"), 504, None),
        (ValueError("private"), 500, None),
    ],
)
def test_errors_map_to_statuses(exc: Exception, status: int, retry_after: str | None) -> None:
    response = error_response(exc, "rid", "ep")
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    body = json.loads(bytes(response.body))
    assert body["request_id"] == "rid"
    if status == 500:
        assert body == {"error": "internal server error", "request_id": "rid"}


class FakeRuntime:
    """Only what routing reads of a runtime: its route table."""

    def __init__(self, prefixes: list[str]) -> None:
        self.table = {p: (f"ep{p}", None) for p in prefixes}
        self.id = "fake"

    def routes(self) -> dict[str, tuple[str, None]]:
        return self.table


segments = st.sampled_from(["a", "b", "ab", "c"])
prefixes = st.lists(segments, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s))


@given(st.sets(prefixes, min_size=1, max_size=6), st.lists(segments, max_size=4))
def test_routing_picks_the_longest_matching_prefix(routes: set[str], parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    app = App(runtime=cast(embserve.Runtime, FakeRuntime(sorted(routes))))
    route = app._match(path)
    matching = [p for p in routes if path == p or path.startswith(p + "/")]
    if not matching:
        assert route is None
    else:
        assert route is not None and route.prefix == max(matching, key=len)


def test_app_checks_its_arguments() -> None:
    @embserve.deployment
    def f(request: Request) -> str:
        return "x"

    with pytest.raises(ValueError, match="start with '/'"):
        App({"nope": f.bind()})
    with pytest.raises(ValueError, match="admin"):
        App({"/-/mine": f.bind()})
    App({"/-/mine": f.bind()}, admin=False)
    with pytest.raises(ValueError, match=r"options\(name="):
        App({"/a": f.bind(), "/b": f.bind()})
    with pytest.raises(TypeError, match="Application"):
        App({"/a": cast(Any, "not an app")})
    with pytest.raises(ValueError, match="max_body_size"):
        App(max_body_size=-1)


@embserve.deployment
def ok(request: Request) -> str:
    """Answers ok."""
    return "ok"


@pytest.mark.anyio
async def test_admin_off_and_healthz_without_replicas() -> None:
    app = App({"/ok": ok.bind(), "/zero": ok.options(name="zero", num_replicas=0).bind()})
    quiet = App({"/ok": ok.bind()}, admin=False)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as http:
            assert (await http.get("/ok")).text == "ok"  # started on first use
            health = await http.get("/-/healthz")
            assert health.status_code == 503
            assert any("/zero" in why for why in health.json()["why"])
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=quiet), base_url="http://t"
        ) as http:
            assert (await http.get("/-/healthz")).status_code == 404
            assert (await http.get("/ok")).text == "ok"
    finally:
        await app.shutdown()
        await quiet.shutdown()


@embserve.deployment
class Broken:
    """Cannot start."""

    def __init__(self) -> None:
        raise RuntimeError("no model file")

    def __call__(self, request: Request) -> str:
        return "never"


async def _lifespan(app: App) -> list[str]:
    messages = asyncio.Queue[dict[str, Any]]()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        messages.put_nowait({"type": kind})
    sent: list[str] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, messages.get, send)
    return sent


@pytest.mark.anyio
async def test_lifespan_starts_and_stops_the_owned_runtime() -> None:
    app = App({"/ok": ok.bind()})
    assert await _lifespan(app) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert app.runtime.loop is not None
    with pytest.raises(embserve.EmbserveError):
        await app.runtime.run_async(ok.bind())  # shut down with the lifespan
    assert await _lifespan(App({"/broken": Broken.bind()})) == ["lifespan.startup.failed"]


@pytest.mark.anyio
async def test_websockets_are_refused() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    await App(runtime=cast(embserve.Runtime, FakeRuntime(["/a"])))(
        {"type": "websocket", "path": "/a"}, receive, send
    )
    assert sent == [{"type": "websocket.close", "code": 1003}]
