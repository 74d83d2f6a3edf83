"""HTTP requests to replicas in worker processes: the snapshot crosses a process boundary.

The request reaches user code in another process as a Starlette ``Request`` rebuilt there; its
results, streams and errors come back and convert as with in-thread replicas.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import embserve
from tests.e2e.test_http import Server


@embserve.deployment
class Inspect:
    """Tells what it received, and where it ran."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        payload = await request.json()
        if payload.get("fail"):
            raise KeyError("no such thing")
        return {
            "payload": payload,
            "path": request.url.path,
            "query": request.url.query,
            "type": type(request).__name__,
            "is_request": isinstance(request, Request),
            "pid": os.getpid(),
            "request_id": embserve.get_request_context().request_id,
        }


@embserve.deployment
class Count:
    """Streams numbers."""

    async def __call__(self, request: Request) -> AsyncIterator[bytes]:
        for i in range(int(request.query_params["n"])):
            yield f"{i};".encode()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """An App whose runtime uses the process backend, under hypercorn."""
    app = embserve.App({"/inspect": Inspect.bind(), "/count": Count.bind()}, backend="process")
    running = Server(app)
    yield running
    running.stop()


def test_requests_reach_a_worker_process_as_starlette_requests(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post("/inspect/x?q=1", json={"a": [1, 2]}, headers={"X-Request-Id": "abc-123"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["pid"] != os.getpid()
        assert answer == {
            "payload": {"a": [1, 2]},
            "path": "/inspect/x",
            "query": "q=1",
            "type": "HTTPRequest",
            "is_request": True,
            "pid": answer["pid"],
            "request_id": "abc-123",  # the client's id, seen by user code in the worker
        }
        assert http.post("/inspect", content=b"{oops").status_code == 400
        failed = http.post("/inspect", json={"fail": True})
        assert failed.status_code == 500 and "no such thing" not in failed.text
        streamed = http.get("/count", params={"n": 5})
        assert (streamed.headers["content-type"], streamed.content) == (
            "application/octet-stream",
            b"0;1;2;3;4;",
        )
