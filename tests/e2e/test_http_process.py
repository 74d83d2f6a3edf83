"""HTTP requests to replicas in worker processes: the snapshot crosses a process boundary.

The request reaches user code in another process as a Starlette ``Request`` rebuilt there; its
results, streams and errors come back and convert as with in-thread replicas.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import embserve
from tests.e2e.servers import free_port
from tests.e2e.test_http import Server
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("server_cli", ["hypercorn", "uvicorn", "granian"])
def test_a_server_cli_serves_a_process_backend_app_from_its_worker(server_cli: str) -> None:
    # hypercorn runs the app in a daemonic multiprocessing child, which multiprocessing does
    # not let start children of its own: the process backend's workers are not those.
    port = free_port()
    app = "tests.e2e.process_service:api"
    binary = str(Path(sys.executable).with_name(server_cli))
    if server_cli == "hypercorn":
        command = [binary, "--bind", f"127.0.0.1:{port}", app]
    elif server_cli == "granian":
        command = [binary, "--interface", "asgi", "--port", str(port), app]
    else:
        command = [binary, "--host", "127.0.0.1", "--port", str(port), app]
    server = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def answer() -> httpx.Response | None:
        assert server.poll() is None, f"{server_cli} exited"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ml/where", timeout=10)
        except httpx.TransportError:
            return None

    try:
        response = wait_for(answer, timeout_s=30, step_s=0.05)
        assert response is not None
        assert response.status_code == 200, response.text
        where = response.json()
        assert where["title"] == "process-service" and where["pid"] != server.pid
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert "Traceback" not in output, output
