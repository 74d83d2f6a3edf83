"""Way in 2: endpoints served over HTTP by ``embserve.App`` under a real hypercorn.

One server for the whole module (127.0.0.1, a free port), driven by httpx: every return kind,
every error kind, streaming, disconnect cancellation, admin routes, and 2,000 requests at 64
concurrent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse

import embserve
from embserve_asgi.server import bind, serve

# httpcore tries `import sniffio` on every async request, and a failed import is searched for
# on sys.path again each time, which slows the client more than the server under test. Tests
# that drive a server with httpx's async client import this module first.
if importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

import httpx


class Server:
    """An ASGI app served by hypercorn in a thread of its own, on a port bound beforehand."""

    def __init__(self, app: Any, graceful_timeout_s: float = 5.0) -> None:
        sock = bind("127.0.0.1", 0)
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._app = app
        self._sock = sock
        self._graceful = graceful_timeout_s
        self.loop_ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-hypercorn", daemon=True)
        self._thread.start()
        assert self.loop_ready.wait(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by stop()
            self._error = exc

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.loop_ready.set()
        await serve(
            self._app,
            self._sock,
            shutdown_trigger=self._stop.wait,
            graceful_timeout_s=self._graceful,
        )

    def stop(self) -> None:
        """Stop gracefully and wait for the server thread (and the App's lifespan) to end."""
        assert self.loop is not None and self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "hypercorn did not stop"
        if self._error is not None:
            raise self._error


# -- deployments -------------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    """A dataclass return value."""

    x: int
    y: float


@embserve.deployment(max_ongoing_requests=64)
class Echo:
    """Returns what it saw of the request."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        return {
            "method": request.method,
            "path": request.url.path,
            "root_path": request.scope.get("root_path", ""),
            "query": dict(request.query_params),
            "header": request.headers.get("x-custom"),
            "body": body.decode("utf-8", "replace"),
            "client": request.client.host if request.client else None,
            "is_request": isinstance(request, Request),
        }


@embserve.deployment(max_ongoing_requests=64)
async def double(request: Request) -> dict[str, int]:
    """Doubles the JSON number it is sent."""
    payload = await request.json()
    return {"n": payload["n"], "doubled": payload["n"] * 2}


@embserve.deployment
def kinds(request: Request) -> Any:
    """Returns one value of the kind named by the last path segment (sync user code)."""
    kind = request.url.path.rsplit("/", 1)[-1]
    values: dict[str, Any] = {
        "dict": {"a": 1, "b": [1, 2]},
        "list": [1, "two", 3.5, None],
        "int": 42,
        "float": 2.5,
        "none": None,
        "bool": True,
        "str": "héllo",
        "bytes": b"\x00\x01\xff",
        "numpy": np.arange(6, dtype=np.int64).reshape(2, 3),
        "numpy_scalar": {"v": np.int64(7), "f": np.float32(0.5)},
        "dataclass": Point(1, 2.5),
        "response": PlainTextResponse("made", status_code=201, headers={"x-made": "yes"}),
        "generator": (f"{i}," for i in range(3)),
    }
    return values[kind]


@embserve.deployment
class Words:
    """Streams the words of ``?text=`` one at a time (an async generator)."""

    async def __call__(self, request: Request) -> AsyncIterator[str]:
        for word in request.query_params.get("text", "").split():
            yield word + "\n"


@embserve.deployment
def records(request: Request) -> Iterator[dict[str, int]]:
    """Streams JSON records (a sync generator)."""
    for i in range(int(request.query_params.get("n", "3"))):
        yield {"i": i}


@embserve.deployment
async def breaks_midway(request: Request) -> AsyncIterator[str]:
    """Streams one item, then fails."""
    yield "first\n"
    raise RuntimeError("broke while streaming")


@embserve.deployment
async def failing(request: Request) -> Any:
    """Raises the error named by the last path segment."""
    kind = request.url.path.rsplit("/", 1)[-1]
    if kind == "value":
        raise ValueError("secret internal detail")
    if kind == "http":
        raise embserve.HTTPError(418, "I am a teapot")
    if kind == "starlette":
        raise HTTPException(409, "conflict here", headers={"x-why": "because"})
    if kind == "json":
        return await request.json()
    return "fine"


@embserve.deployment
class PostOnly:
    """Answers POST only."""

    http_methods = ("POST",)

    def __call__(self, request: Request) -> str:
        return "posted"


ENTERED = threading.Event()
RELEASE = threading.Event()


@embserve.deployment(max_ongoing_requests=1, max_queued_requests=0)
class Gate:
    """Holds its one request slot until the test releases it."""

    async def __call__(self, request: Request) -> str:
        ENTERED.set()
        await asyncio.to_thread(RELEASE.wait, 10)
        return "released"


HANG_STARTED = threading.Event()
HANG_CANCELLED = threading.Event()


@embserve.deployment
class Hang:
    """Never answers; records being cancelled."""

    async def __call__(self, request: Request) -> str:
        HANG_STARTED.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            HANG_CANCELLED.set()
            raise
        return "never"


ENDLESS_CLOSED = threading.Event()


@embserve.deployment
class Endless:
    """Streams until the client goes away; records that its generator was closed."""

    async def __call__(self, request: Request) -> AsyncIterator[str]:
        try:
            while True:
                yield "tick\n"
                await asyncio.sleep(0.001)  # a producer that takes a moment per item
        finally:
            ENDLESS_CLOSED.set()


@embserve.deployment(request_timeout_s=0.2)
class Slow:
    """Takes longer than its request timeout."""

    async def __call__(self, request: Request) -> str:
        await asyncio.Event().wait()
        return "never"


APP = embserve.App(
    {
        "/echo": Echo.bind(),
        "/echo/deeper": double.bind(),
        "/kinds": kinds.bind(),
        "/words": Words.bind(),
        "/records": records.bind(),
        "/breaks": breaks_midway.bind(),
        "/fail": failing.bind(),
        "/post-only": PostOnly.bind(),
        "/gate": Gate.bind(),
        "/hang": Hang.bind(),
        "/endless": Endless.bind(),
        "/slow": Slow.bind(),
    },
    max_body_size=1024,
)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The App under hypercorn for the whole module."""
    running = Server(APP)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    """A client of the module's server."""
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


# -- requests and return values -----------------------------------------------------------


def test_request_snapshot_reaches_the_replica_whole(client: httpx.Client) -> None:
    r = client.post(
        "/echo/some/where?a=1&b=two", content=b"payload", headers={"x-custom": "custom"}
    )
    assert r.status_code == 200
    assert r.json() == {
        "method": "POST",
        "path": "/echo/some/where",
        "root_path": "",
        "query": {"a": "1", "b": "two"},
        "header": "custom",
        "body": "payload",
        "client": "127.0.0.1",
        "is_request": True,
    }


def test_longest_prefix_wins(client: httpx.Client) -> None:
    assert client.post("/echo/deeper", json={"n": 4}).json() == {"n": 4, "doubled": 8}
    assert client.post("/echo/deeperx").json()["path"] == "/echo/deeperx"
    assert client.get("/echo").json()["path"] == "/echo"


@pytest.mark.parametrize(
    ("kind", "media", "expected"),
    [
        ("dict", "application/json", {"a": 1, "b": [1, 2]}),
        ("list", "application/json", [1, "two", 3.5, None]),
        ("int", "application/json", 42),
        ("float", "application/json", 2.5),
        ("none", "application/json", None),
        ("bool", "application/json", True),
        ("numpy", "application/json", [[0, 1, 2], [3, 4, 5]]),
        ("numpy_scalar", "application/json", {"v": 7, "f": 0.5}),
        ("dataclass", "application/json", {"x": 1, "y": 2.5}),
    ],
)
def test_json_return_values(client: httpx.Client, kind: str, media: str, expected: Any) -> None:
    r = client.get(f"/kinds/{kind}")
    assert r.status_code == 200
    assert r.headers["content-type"] == media
    assert r.json() == expected


def test_text_bytes_response_and_generator_values(client: httpx.Client) -> None:
    r = client.get("/kinds/str")
    assert (r.status_code, r.headers["content-type"], r.text) == (
        200,
        "text/plain; charset=utf-8",
        "héllo",
    )
    r = client.get("/kinds/bytes")
    assert (r.headers["content-type"], r.content) == ("application/octet-stream", b"\x00\x01\xff")
    r = client.get("/kinds/response")
    assert (r.status_code, r.text, r.headers["x-made"]) == (201, "made", "yes")
    assert r.headers["x-request-id"]
    r = client.get("/kinds/generator")
    assert (r.status_code, r.text) == (200, "0,1,2,")


def test_streams_arrive_chunk_by_chunk(server: Server) -> None:
    with (
        httpx.Client(base_url=server.url, timeout=10) as http,
        http.stream("GET", "/words", params={"text": "one two three"}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert "content-length" not in r.headers
        assert "".join(r.iter_text()) == "one\ntwo\nthree\n"
    with httpx.Client(base_url=server.url, timeout=10) as http:
        r = http.get("/records", params={"n": 4})
    assert r.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in r.text.splitlines()] == [{"i": i} for i in range(4)]


def test_a_stream_that_fails_midway_is_cut_not_ended(server: Server) -> None:
    with (
        httpx.Client(base_url=server.url, timeout=10) as http,
        http.stream("GET", "/breaks") as r,
    ):
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            r.read()


def test_request_id_is_kept_or_made(client: httpx.Client) -> None:
    assert client.get("/kinds/int", headers={"x-request-id": "abc-123"}).headers[
        "x-request-id"
    ] == ("abc-123")
    made = {client.get("/kinds/int").headers["x-request-id"] for _ in range(3)}
    assert len(made) == 3 and all(rid.isalnum() for rid in made)  # unique, header-safe


# -- errors -------------------------------------------------------------------------------


def test_user_exception_is_500_without_detail(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("ERROR", logger="embserve.http"):
        r = client.get("/fail/value", headers={"x-request-id": "req-500"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error", "request_id": "req-500"}
    assert "secret" not in r.text and "Traceback" not in r.text
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "req-500" in logged and "secret internal detail" in logged


def test_http_errors_keep_their_status(client: httpx.Client) -> None:
    r = client.get("/fail/http")
    assert (r.status_code, r.json()["error"]) == (418, "I am a teapot")
    r = client.get("/fail/starlette")
    assert (r.status_code, r.json()["error"], r.headers["x-why"]) == (
        409,
        "conflict here",
        "because",
    )


def test_bad_json_is_400(client: httpx.Client) -> None:
    r = client.post("/fail/json", content=b"{not json")
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]
    assert client.post("/fail/json", json={"ok": 1}).json() == {"ok": 1}


def test_unknown_route_404_and_method_405(client: httpx.Client) -> None:
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json()["request_id"] == r.headers["x-request-id"]
    assert client.get("/-/nothing").status_code == 404
    r = client.get("/post-only")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert client.post("/post-only").text == "posted"


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    assert client.post("/echo", content=b"x" * 1024).status_code == 200
    assert client.post("/echo", content=b"x" * 1025).status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while streaming in
        for _ in range(64):
            yield b"y" * 100

    r = client.post("/echo", content=chunked())
    assert r.status_code == 413
    assert "1024" in r.json()["error"]


def test_backpressure_is_503_with_retry_after(server: Server, client: httpx.Client) -> None:
    ENTERED.clear()
    RELEASE.clear()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.get, "/gate")
        try:
            assert ENTERED.wait(10)
            r = client.get("/gate")
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) >= 1
        finally:
            RELEASE.set()
        assert first.result(10).text == "released"


def test_request_timeout_is_504(client: httpx.Client) -> None:
    r = client.get("/slow")
    assert r.status_code == 504
    assert "request_timeout_s" in r.json()["error"]


def test_client_disconnect_cancels_the_request(server: Server, client: httpx.Client) -> None:
    HANG_STARTED.clear()
    HANG_CANCELLED.clear()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"GET /hang HTTP/1.1\r\nhost: test\r\n\r\n")
        assert HANG_STARTED.wait(10)
    assert HANG_CANCELLED.wait(10), "the replica kept running after the client left"
    assert client.get("/kinds/int").json() == 42  # and the server is fine


def test_client_disconnect_stops_a_stream(server: Server, client: httpx.Client) -> None:
    ENDLESS_CLOSED.clear()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"GET /endless HTTP/1.1\r\nhost: test\r\n\r\n")
        received = b""
        while b"tick" not in received:  # headers and chunks may come in separate reads
            chunk = raw.recv(4096)
            assert chunk, "the server closed the stream before its first item"
            received += chunk
    assert ENDLESS_CLOSED.wait(10), "the generator kept running after the client left"
    assert client.get("/kinds/int").json() == 42


# -- admin --------------------------------------------------------------------------------


def test_admin_routes(client: httpx.Client) -> None:
    health = client.get("/-/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    routes = client.get("/-/routes").json()
    assert routes["/echo"] == {"endpoint": "Echo", "traffic": {"Echo": 1.0}}
    assert routes["/echo/deeper"]["endpoint"] == "double"
    status = client.get("/-/status").json()
    assert status["deployments"]["Echo"]["state"] == "HEALTHY"
    assert status["endpoints"]["Echo"]["route_prefix"] == "/echo"
    client.get("/kinds/int")
    metrics = client.get("/-/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'embserve_http_requests_total{endpoint="kinds",status="200"}' in text
    assert 'embserve_http_request_duration_seconds_count{endpoint="kinds"}' in text
    assert 'embserve_http_requests_in_flight{endpoint="kinds"} 0.0' in text


# -- load ---------------------------------------------------------------------------------


def test_2000_requests_at_64_concurrent_all_right(server: Server) -> None:
    # 64 clients of one connection each: one shared httpx pool spends time quadratic in its
    # size looking for an idle connection, which would measure httpx rather than the server.
    async def worker(numbers: range) -> list[tuple[int, int, Any]]:
        answers = []
        async with httpx.AsyncClient(base_url=server.url, timeout=30, verify=False) as http:
            for n in numbers:
                r = await http.post("/echo/deeper", json={"n": n})
                answers.append((n, r.status_code, r.json()))
        return answers

    async def drive() -> list[tuple[int, int, Any]]:
        parts = await asyncio.gather(*(worker(range(k, 2000, 64)) for k in range(64)))
        return [answer for part in parts for answer in part]

    started = time.perf_counter()
    answers = asyncio.run(drive())
    elapsed = time.perf_counter() - started
    assert sorted(n for n, _, _ in answers) == list(range(2000))
    wrong = [a for a in answers if a[1] != 200 or a[2] != {"n": a[0], "doubled": 2 * a[0]}]
    assert not wrong, wrong[:5]
    assert elapsed < 40


def test_metrics_page_serves_the_runtimes_families_too(client: httpx.Client) -> None:
    assert client.post("/echo", content=b"x").status_code == 200
    text = client.get("/-/metrics").text
    assert "embserve_http_requests_total" in text
    assert 'embserve_requests_total{deployment="Echo",outcome="ok"}' in text
    assert "embserve_execution_seconds_bucket" in text
