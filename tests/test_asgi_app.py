"""The ASGI adapter's parts without a server: conversion, errors, routing, snapshot, lifespan."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import pickle
from collections.abc import MutableMapping
from typing import Any, cast

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.exceptions import HTTPException
from starlette.requests import Request

import embserve
from embserve_asgi.app import App
from embserve_asgi.requests import BodyTimeout, BodyTooLarge, RequestSnapshot
from embserve_asgi.responses import Cancelled, error_response, json_bytes, render, to_response
from tests.http_inputs import BAD_JSON, GOOD_JSON

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


def _parsed(body: bytes) -> Any:
    snapshot = RequestSnapshot(method="POST", path="/", query_string=b"", headers=[], body=body)
    return asyncio.run(snapshot.__embserve_materialize__().json())


@pytest.mark.parametrize(("name", "body"), BAD_JSON, ids=[name for name, _ in BAD_JSON])
def test_what_python_parses_but_json_forbids_is_400(name: str, body: bytes) -> None:
    with pytest.raises(embserve.HTTPError) as caught:
        _parsed(body)
    assert caught.value.status == 400
    assert "JSON" in caught.value.detail or "UTF-8" in caught.value.detail


@pytest.mark.parametrize(("body", "value"), GOOD_JSON)
def test_json_near_the_limits_still_parses(body: bytes, value: Any) -> None:
    assert _parsed(body) == value


def test_what_json_cannot_hold_is_rendered_as_null_and_u_fffd() -> None:
    value = {
        "nan": math.nan,
        "inf": [math.inf, -math.inf, 1.5],
        "array": np.array([1.0, np.nan]),
        "text": "lone \ud800 and a pair \ud83d\ude00",
    }
    assert json.loads(json_bytes(value)) == {
        "nan": None,
        "inf": [None, None, 1.5],
        "array": [1.0, None],
        "text": "lone \ufffd and a pair \U0001f600",
    }
    assert json_bytes(math.nan) == b"null"
    assert render("x\udfff") == ("x\ufffd".encode(), b"text/plain; charset=utf-8")
    cycle: list[Any] = [math.nan]
    cycle.append(cycle)
    with pytest.raises(ValueError, match="Circular"):
        json_bytes(cycle)


def test_mappings_such_as_query_params_render_as_json_objects() -> None:
    from types import MappingProxyType

    from starlette.datastructures import QueryParams

    assert render(QueryParams("a=1&b=two")) == (b'{"a":"1","b":"two"}', b"application/json")
    assert json.loads(json_bytes({"nested": MappingProxyType({"x": 1})})) == {"nested": {"x": 1}}


SECRET = "postgres://admin:hunter2@db"


@pytest.mark.parametrize(
    "exc",
    [
        embserve.DeploymentUnavailableError(f"'m' has no running replica ({SECRET})"),
        embserve.DeploymentFailedError(f"the constructor raised {SECRET}", f"Traceback\n{SECRET}"),
        embserve.ReplicaDiedError(f"replica r1 died: health check failed: {SECRET}"),
        embserve.EmbserveError(SECRET),
        ValueError(SECRET),
    ],
)
def test_error_bodies_hold_no_exception_text_which_goes_to_the_log(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="embserve.http")
    response = error_response(exc, "rid-7", "ep")
    body = json.loads(bytes(response.body))
    assert set(body) == {"error", "request_id"} and body["request_id"] == "rid-7"
    assert SECRET not in bytes(response.body).decode()
    assert response.status_code in (500, 503)
    logged = [r for r in caplog.records if "rid-7" in r.getMessage()]
    assert len(logged) == 1
    assert SECRET in logging.Formatter().format(logged[0])  # the traceback, if any, with it
    assert getattr(logged[0], "request_id", None) == "rid-7"  # for structured log handlers


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (embserve.HTTPError(404, "gone"), 404, None),
        (HTTPException(422, "bad"), 422, None),
        (BodyTooLarge(10), 413, None),
        (BodyTimeout(0.5), 408, None),
        (embserve.BackPressureError("full", retry_after_s=2.5), 503, "3"),
        (embserve.ReplicaDiedError("died"), 503, "1"),
        (embserve.DeploymentUnavailableError("none"), 503, "1"),
        (embserve.RequestTimeoutError("slow"), 504, None),
        (Cancelled(), 503, "1"),
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
    with pytest.raises(ValueError, match="body_timeout_s"):
        App(body_timeout_s=0)
    with pytest.raises(TypeError, match="body_timeout_s"):
        App(body_timeout_s=cast(Any, "30"))
    assert App(body_timeout_s=None).body_timeout_s is None
    assert App().body_timeout_s == 30.0


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
            assert (await http.get("/-/healthz")).json() == {"status": "ok"}  # alive
            ready = await http.get("/-/ready")
            assert ready.status_code == 503
            assert any("/zero" in why for why in ready.json()["why"])
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
        raise RuntimeError(f"no model file at {SECRET}")

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
async def test_a_start_that_fails_on_first_request_tells_the_client_nothing_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App({"/broken": Broken.bind()})  # mounted: no lifespan, started by the first request
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as http:
        response = await http.get("/broken", headers={"x-request-id": "first-1"})
    assert response.status_code == 503
    assert response.json() == {
        "error": "the service is unavailable; retry later",
        "request_id": "first-1",
    }
    assert any("first-1" in r.getMessage() and SECRET in r.getMessage() for r in caplog.records)


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


NEEDS_TOKEN = "this admin page needs the header Authorization: Bearer <admin token>"


@pytest.mark.anyio
async def test_an_admin_token_guards_every_admin_page_but_healthz() -> None:
    app = App({"/ok": ok.bind()}, admin_token="s3cret")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as http:
            assert (await http.get("/-/healthz")).json() == {"status": "ok"}
            assert (await http.get("/ok")).text == "ok"  # the routes themselves are open
            for page in ("ready", "routes", "status", "metrics", "nosuch"):
                for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                    r = await http.get(f"/-/{page}", headers={**headers, "x-request-id": "a-1"})
                    assert r.status_code == 401, (page, headers)
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert r.json() == {"error": NEEDS_TOKEN, "request_id": "a-1"}
            good = {"authorization": "Bearer s3cret"}
            assert (await http.get("/-/status", headers=good)).json()["backend"] == "local"
            assert (await http.get("/-/ready", headers=good)).status_code == 200
            assert (await http.get("/-/nosuch", headers=good)).status_code == 404
            # The scheme is case-insensitive (RFC 9110); the token is not.
            assert (
                await http.get("/-/routes", headers={"authorization": "bearer s3cret"})
            ).is_success
            assert (
                await http.get("/-/routes", headers={"authorization": "Bearer S3CRET"})
            ).status_code == 401
    finally:
        await app.shutdown()


def test_the_admin_token_comes_from_the_environment_unless_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMBSERVE_ADMIN_TOKEN", "from-env")
    assert App().admin_token == "from-env"
    assert App(admin_token="given").admin_token == "given"
    assert App(admin_token="").admin_token is None  # "" turns the environment's token off
    monkeypatch.setenv("EMBSERVE_ADMIN_TOKEN", "")
    assert App().admin_token is None
    monkeypatch.delenv("EMBSERVE_ADMIN_TOKEN")
    assert App().admin_token is None
    with pytest.raises(TypeError, match="admin_token"):
        App(admin_token=b"bytes")  # type: ignore[arg-type]
