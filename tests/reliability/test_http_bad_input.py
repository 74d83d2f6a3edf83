"""Bad input against a real server (hypercorn on 127.0.0.1): JSON that Python takes but JSON
forbids, malformed HTTP on raw sockets, and requests that time out or whose client leaves, each
of which must cancel the async user code serving it. Bounded in time and in count."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import embserve
from tests.e2e.servers import embserve_server, raw_exchange
from tests.http_inputs import BAD_JSON
from tests.waiting import wait_until

COUNT = 20  # requests of each kind that time out or are left


@embserve.deployment
async def parse(request: Request) -> Any:
    """Echoes the JSON body it parsed."""
    return await request.json()


@embserve.deployment
def not_finite(request: Request) -> Any:
    """Returns what JSON cannot hold."""
    return {"nan": float("nan"), "inf": float("inf"), "text": "a lone \ud800"}


lock = threading.Lock()
running: dict[str, int] = {"started": 0, "cancelled": 0}


@embserve.deployment(max_ongoing_requests=100, request_timeout_s=0.2)
async def timed(request: Request) -> str:
    """Runs past its request_timeout_s; counts its start and its cancellation."""
    return await _outlive()


@embserve.deployment(max_ongoing_requests=100)
async def left(request: Request) -> str:
    """Runs until its client leaves; counts its start and its cancellation."""
    return await _outlive()


async def _outlive() -> str:
    with lock:
        running["started"] += 1
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        with lock:
            running["cancelled"] += 1
        raise
    return "never"


@pytest.fixture
def server() -> Any:
    app = embserve.App(
        {"/parse": parse, "/nan": not_finite, "/timed": timed, "/left": left}, body_timeout_s=2
    )
    with embserve_server(app) as (url, _):
        yield app, url


def test_the_bad_json_table_is_answered_400_and_the_server_serves_on(server: Any) -> None:
    _, url = server
    with httpx.Client(base_url=url, timeout=10) as http:
        for name, body in BAD_JSON:
            response = http.post("/parse", content=body, headers={"x-request-id": f"bad-{name}"})
            assert response.status_code == 400, (name, response.text)
            assert response.json()["request_id"] == f"bad-{name}"
            assert set(response.json()) == {"error", "request_id"}
        assert http.post("/parse", content=b'{"ok": [1, 2.5, "\\ud83d\\ude00"]}').json() == {
            "ok": [1, 2.5, "\U0001f600"]
        }
        answer = http.get("/nan")
        assert answer.status_code == 200
        assert answer.json() == {"nan": None, "inf": None, "text": "a lone \ufffd"}


MALFORMED = {
    "a Content-Length that is not a number": (
        b"POST /parse HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n"
    ),
    "a negative Content-Length": b"POST /parse HTTP/1.1\r\nHost: t\r\nContent-Length: -4\r\n\r\n",
    "two Content-Lengths": (
        b"POST /parse HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "a bad chunk size": (
        b"POST /parse HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nab\r\n0\r\n\r\n"
    ),
    "a header without a colon": b"GET /parse HTTP/1.1\r\nHost: t\r\nnonsense\r\n\r\n",
    "a request line of garbage": b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
    "a header line of 100 kB": b"GET /parse HTTP/1.1\r\nHost: t\r\nX-Big: "
    + b"a" * 100_000
    + b"\r\n\r\n",
}


def test_malformed_http_is_refused_and_the_connection_closed(server: Any) -> None:
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    for name, data in MALFORMED.items():
        raw, closed = raw_exchange(port, data, timeout_s=10)
        assert closed, name
        assert raw.startswith(b"HTTP/1.1 4") or raw == b"", (name, raw[:80])
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.post("/parse", content=b"[1]").json() == [1]


def test_timeouts_and_clients_leaving_cancel_the_async_user_code(server: Any) -> None:
    app, url = server
    with lock:
        running.update(started=0, cancelled=0)
    with ThreadPoolExecutor(COUNT) as pool:
        answers = list(pool.map(lambda _: httpx.get(f"{url}/timed", timeout=10), range(COUNT)))
    assert [a.status_code for a in answers] == [504] * COUNT
    wait_until(lambda: running == {"started": COUNT, "cancelled": COUNT})

    def leave(_: int) -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{url}/left", timeout=httpx.Timeout(10, read=0.3))

    with ThreadPoolExecutor(COUNT) as pool:
        list(pool.map(leave, range(COUNT)))
    wait_until(lambda: running == {"started": 2 * COUNT, "cancelled": 2 * COUNT})
    wait_until(lambda: all(m.in_flight == 0 for m in app._metrics.values()))
    wait_until(lambda: not app._watchers.active)
