"""The module-level API: Ray Serve's global functions on a default runtime, HTTP included."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

import embserve
from tests.e2e.servers import free_port


@embserve.deployment
class Echo:
    def __init__(self, tag: str = "v1") -> None:
        self.tag = tag

    def __call__(self, x: object = None) -> str:
        return f"{self.tag}:{x}"


@embserve.deployment
class Doubler:
    def __call__(self, x: int) -> int:
        return 2 * x


@embserve.deployment
class Front:
    def __init__(self, doubler: embserve.Handle) -> None:
        self.doubler = doubler

    async def __call__(self, x: int) -> int:
        result: int = await self.doubler.remote(x)
        return result


@pytest.fixture
def port() -> Iterator[int]:
    chosen = free_port()
    embserve.start(http_options={"host": "127.0.0.1", "port": chosen})
    try:
        yield chosen
    finally:
        embserve.shutdown()


def test_run_serves_http_at_the_route_prefix_and_replaces_an_app_of_the_same_name(
    port: int,
) -> None:
    handle = embserve.run(Echo.bind("v1"), route_prefix="/echo")
    assert handle.remote(1).result(timeout_s=5) == "v1:1"
    url = f"http://127.0.0.1:{port}/echo"
    assert httpx.get(url).status_code == 200
    embserve.run(Echo.bind("v2"), route_prefix="/echo")
    assert embserve.get_app_handle("default").remote(2).result(timeout_s=5) == "v2:2"
    assert sorted(embserve.status().applications) == ["default"]


def test_status_and_handles_by_application_and_deployment_name(port: int) -> None:
    embserve.run(Front.bind(Doubler.bind()), name="math", route_prefix=None)
    app = embserve.status().applications["math"]
    assert app.status == "RUNNING"
    assert {name: d.status for name, d in app.deployments.items()} == {
        "Front": "HEALTHY",
        "Doubler": "HEALTHY",
    }
    assert app.deployments["Doubler"].replica_states == {"RUNNING": 1}
    assert embserve.get_app_handle("math").remote(4).result(timeout_s=5) == 8
    doubler = embserve.get_deployment_handle("Doubler", app_name="math")
    assert doubler.remote(5).result(timeout_s=5) == 10
    assert embserve.get_deployment_handle("Doubler").remote(1).result(timeout_s=5) == 2
    with pytest.raises(KeyError, match="no deployment 'Nope'"):
        embserve.get_deployment_handle("Nope", app_name="math")
    with pytest.raises(ValueError, match="belongs to one application"):
        embserve.run(Front.bind(Doubler.bind()), name="other", route_prefix=None)
    embserve.delete("math")
    assert embserve.status().applications == {}
    with pytest.raises(KeyError, match="no application named 'math'"):
        embserve.get_app_handle("math")


def test_status_without_a_runtime_is_empty() -> None:
    assert embserve.status().applications == {}


def test_a_busy_port_is_an_error_that_says_what_to_do() -> None:
    chosen = free_port()
    embserve.start(http_options={"port": chosen})
    try:
        other = embserve.Runtime()
        with pytest.raises(embserve.EmbserveError, match="free the port or choose another"):
            other.serve_http(port=chosen)
        other.shutdown()
    finally:
        embserve.shutdown()


def test_a_runtime_serves_http_only_when_asked() -> None:
    with embserve.Runtime() as rt:
        rt.run(Echo.bind(), route_prefix="/")
        assert rt._servers == []
        server = rt.serve_http(port=0)
        assert httpx.get(server.url + "/").text.startswith("v1:<embserve_asgi.requests.HTTPRequest")
    assert not server.running  # shutting the runtime down stopped it


def test_a_script_ends_when_its_main_code_ends() -> None:
    code = (
        "import embserve as serve\n"
        "@serve.deployment\n"
        "def hello(request):\n"
        "    return 'hi'\n"
        f"serve.start(http_options={{'port': {free_port()}}})\n"
        "serve.run(hello.bind())\n"
        "print('done')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
