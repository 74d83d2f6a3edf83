"""HTTP hardening under a real server (hypercorn and uvicorn on 127.0.0.1, raw sockets where HTTP
is bad): body deadlines, the server's own timeouts, error bodies that leak nothing, graceful
cuts."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import embserve
from tests.e2e.servers import embserve_server, raw_exchange
from tests.waiting import wait_until

BODY_TIMEOUT_S = 0.3


@pytest.fixture(params=["hypercorn", "uvicorn", "granian"])
def server(request: pytest.FixtureRequest) -> str:
    """The server that embserve_asgi.server.serve runs: each test runs on both."""
    name: str = request.param
    return name


@embserve.deployment
async def echo(request: Request) -> dict[str, int]:
    """The size of the body it received."""
    return {"size": len(await request.body())}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _status_and_body(raw: bytes) -> tuple[int, Any, dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), json.loads(body), headers


STALLED = {
    "half a body": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 50,
    "headers only": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n",
    "no last chunk": (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    ),
}


@pytest.mark.parametrize("request_bytes", STALLED.values(), ids=list(STALLED))
def test_a_body_that_stops_arriving_gets_408_within_the_deadline_and_is_closed(
    request_bytes: bytes, server: str
) -> None:
    app = embserve.App({"/echo": echo.bind()}, body_timeout_s=BODY_TIMEOUT_S)
    with embserve_server(app, server=server) as (url, _):
        started = time.monotonic()
        raw, closed = raw_exchange(_port(url), request_bytes, timeout_s=10)
        took = time.monotonic() - started
        status, body, headers = _status_and_body(raw)
        assert status == 408 and closed
        assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + 2.0
        assert body == {
            "error": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
            "request_id": headers["x-request-id"],
        }
        # A body that arrives in pieces within the deadline is read whole.
        sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=10)
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 6\r\n\r\nabc"
        )
        sock.sendall(b"def")
        raw, closed = raw_exchange(0, b"", sock=sock, timeout_s=10)
        assert closed and raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b'{"size":6}')


def test_two_hundred_stalled_connections_are_all_answered_and_closed(server: str) -> None:
    app = embserve.App({"/echo": echo.bind()}, body_timeout_s=BODY_TIMEOUT_S)
    with embserve_server(app, server=server) as (url, _):
        sockets = []
        try:
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=10)
                sockets.append(sock)
                sock.sendall(STALLED["half a body"])
            started = time.monotonic()
            answers = [
                raw_exchange(
                    0, b"", sock=sock, timeout_s=max(0.1, 20 - (time.monotonic() - started))
                )
                for sock in sockets
            ]
        finally:
            for sock in sockets:
                sock.close()
        assert all(closed for _, closed in answers), "a stalled connection was kept open"
        assert all(raw.startswith(b"HTTP/1.1 408 ") for raw, _ in answers)
        assert time.monotonic() - started < 20
        assert not app._watchers.active  # and nothing of theirs is watched any more


def test_headers_that_never_end_are_closed_by_the_keep_alive_timeout(server: str) -> None:
    app = embserve.App({"/echo": echo.bind()})
    with embserve_server(app, server=server, keep_alive_timeout_s=0.3) as (url, _):
        started = time.monotonic()
        raw, closed = raw_exchange(_port(url), b"POST /echo HTTP/1.1\r\nHost: t\r\n", timeout_s=10)
        assert closed and raw == b"" and time.monotonic() - started < 5


SECRET = "postgres://admin:hunter2@db"
broken = threading.Event()


@embserve.deployment(health_check_period_s=0.05, health_check_timeout_s=5)
class Flaky:
    """Starts once; once `broken`, fails its health check and every restart, quoting a secret."""

    def __init__(self) -> None:
        if broken.is_set():
            raise RuntimeError(f"cannot connect to {SECRET}")

    def check_health(self) -> None:
        if broken.is_set():
            raise RuntimeError(f"lost {SECRET}")

    def __call__(self, request: Request) -> str:
        if "fail" in request.query_params:
            raise ValueError(f"the query failed on {SECRET}")
        return "ok"


def test_no_user_exception_text_reaches_a_client_but_the_log_has_it_with_the_request_id(
    caplog: pytest.LogCaptureFixture, server: str
) -> None:
    caplog.set_level(logging.INFO)
    broken.clear()
    app = embserve.App({"/flaky": Flaky.bind()})
    with (
        embserve_server(app, server=server) as (url, _),
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        assert http.get("/flaky").text == "ok"
        failed = http.get("/flaky?fail=1", headers={"x-request-id": "handler-1"})
        assert failed.status_code == 500
        assert failed.json() == {"error": "internal server error", "request_id": "handler-1"}

        broken.set()  # the health check fails, the replica is replaced, the restart fails
        wait_until(lambda: http.get("/-/ready").status_code == 503)
        wait_until(lambda: http.get("/flaky").status_code == 503)
        unavailable = http.get("/flaky", headers={"x-request-id": "down-1"})
        assert unavailable.json() == {
            "error": "no replica of this route is running; retry later",
            "request_id": "down-1",
        }
        assert unavailable.headers["retry-after"] == "1"
        health, status = http.get("/-/ready"), http.get("/-/status")
        assert health.json()["why"] == ["/flaky (Flaky) has no running replica [UNHEALTHY]"]
        assert status.json()["deployments"]["Flaky"]["state"] == "UNHEALTHY"
        for response in (failed, unavailable, health, status, http.get("/-/routes")):
            assert SECRET not in response.text and "hunter2" not in response.text
        assert "hunter2" in app.runtime.status().deployments["Flaky"].message  # kept in-process
    broken.clear()
    for request_id in ("handler-1", "down-1"):
        logged = [
            logging.Formatter().format(r) for r in caplog.records if request_id in r.getMessage()
        ]
        assert len(logged) == 1 and SECRET in logged[0], logged


started = threading.Event()
cancelled = threading.Event()


@embserve.deployment
async def hang(request: Request) -> str:
    """Runs until cancelled."""
    started.set()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        cancelled.set()
        raise
    return "never"


def test_requests_cut_by_the_graceful_timeout_get_503_with_their_request_id(server: str) -> None:
    started.clear()
    cancelled.clear()
    app = embserve.App({"/hang": hang.bind()})
    with (
        embserve_server(app, server=server, graceful_timeout_s=0.3) as (url, shut_down),
        ThreadPoolExecutor(1) as pool,
    ):
        pending = pool.submit(
            httpx.get, f"{url}/hang", headers={"x-request-id": "cut-1"}, timeout=20
        )
        assert started.wait(10)
        shut_down()
        response = pending.result(20)
    assert response.status_code == 503
    assert response.json() == {
        "error": "the server stopped before the request finished; retry",
        "request_id": "cut-1",
    }
    assert cancelled.is_set()  # the async user code was cancelled, not left running


def test_an_app_whose_start_fails_is_not_served_and_the_failure_raises(server: str) -> None:
    from embserve_asgi.server import bind, serve

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no model file"})

    async def serving() -> None:
        sock = bind("127.0.0.1", 0)
        never = asyncio.Event()
        await asyncio.wait_for(serve(app, sock, server=server, shutdown_trigger=never.wait), 10)

    # Each server says it its own way (hypercorn: its LifespanFailureError); none serves on.
    with pytest.raises(Exception, match=r"failed to start|[Ll]ifespan failure"):
        asyncio.run(serving())
