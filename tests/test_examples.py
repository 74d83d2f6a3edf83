"""Every example in examples/ starts as its docstring says, and answers what it should.

Each is started the way a user would start it (``embserve run``, uvicorn, ``python
examples/...``), in a process of its own on a free port of 127.0.0.1, and called with httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.servers import free_port
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent


class Started:
    """A process started for a test, with the lines it printed on stdout so far."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
        """The first line printed that matches ``pattern``, waiting for it if need be."""

        def found() -> re.Match[str] | None:
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"exited with {self.process.returncode}: {self.lines}")
            return next((m for line in self.lines if (m := re.search(pattern, line))), None)

        match = wait_for(found, timeout_s)
        assert match is not None
        return match


@contextlib.contextmanager
def started(*command: str) -> Iterator[Started]:
    """Run ``command`` from the examples' directory; stop it with SIGINT (then SIGKILL)."""
    process = subprocess.Popen(
        command,
        cwd=EXAMPLES,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield Started(process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@contextlib.contextmanager
def embserve_run(target: str) -> Iterator[httpx.Client]:
    """``embserve run target`` on a free port, and a client of it once it serves."""
    port = free_port()
    with started(str(BIN / "embserve"), "run", target, "--port", str(port)) as server:
        server.wait_for_line(r"serving on http://127\.0\.0\.1:\d+")
        server.wait_for_line(r"^try: curl")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client


def test_quickstart_as_a_script_and_under_embserve_run() -> None:
    script = subprocess.run(
        [sys.executable, "quickstart.py"], cwd=EXAMPLES, capture_output=True, text=True, timeout=60
    )
    assert script.returncode == 0, script.stderr
    assert "'label': 'positive'" in script.stdout
    assert "['streamed', 'word', 'by', 'word']" in script.stdout
    with embserve_run("quickstart.py:app") as http:
        answer = http.post("/sentiment", content="I love fast serving").json()
        assert answer["label"] == "positive"
        assert http.post("/sentiment/words", content="a b").json() == ["a", "b"]
        not_text = http.post("/sentiment", content=b"\xff")
        assert not_text.status_code == 400
        assert not_text.json()["error"] == "the request body is not UTF-8 text"


def test_the_classifier_batches_concurrent_requests() -> None:
    with embserve_run("classifier.py:app") as http:
        one_hot = [[float(i == j) for i in range(8)] for j in range(8)]
        url = str(http.base_url)

        async def classify_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                calls = [client.post("/classify", json={"features": f}) for f in one_hot * 8]
                return list(await asyncio.gather(*calls))

        answers = [r.json()["label"] for r in asyncio.run(classify_all())]
        assert answers == ["cat", "dog", "bird", "fish"] * 16
        assert http.post("/classify", json={"features": [1]}).status_code == 400
        metrics = http.get("/-/metrics").text

        def total(series: str) -> float:
            found = re.findall(rf"^{series}\{{[^}}]*\}} (\S+)$", metrics, re.M)
            assert found, f"no {series} in /-/metrics"
            return sum(map(float, found))

        # Every request went through a batcher, and 64 requests at once made fewer batches.
        assert total("embserve_batch_size_sum") == 64
        assert total("embserve_batch_size_count") < 64


def test_the_fastapi_host_serves_its_views_and_the_mounted_app() -> None:
    port = free_port()
    uvicorn = (str(BIN / "uvicorn"), "fastapi_host:api", "--port", str(port))
    with (
        started(*uvicorn, "--no-access-log") as server,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
    ):

        def up() -> bool:
            try:
                return http.get("/health").status_code == 200
            except httpx.TransportError:
                assert server.process.poll() is None, "uvicorn exited"
                return False

        wait_for(up, 30)
        assert http.get("/predict", params={"x": 0.7}).json() == {"label": 1}
        assert http.get("/explain", params={"x": 0.2}).json()["label"] == 0
        assert http.post("/ml/clf", json={"x": 0.9}).json() == {"label": 1}
        assert http.post("/ml/clf", json={"y": 1}).status_code == 400


def test_the_flask_host_answers_through_sync_handles() -> None:
    port = free_port()
    with started(sys.executable, "flask_host.py", "--port", str(port)) as server:
        server.wait_for_line("serving on")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            def up() -> bool:
                try:
                    return http.get("/status").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(up, 30)
            assert http.post("/predict", json={"x": 0.7}).json() == {"label": 1}
            assert http.post("/predict", json={"x": 0.1}).json() == {"label": 0}
            assert http.post("/predict", json={}).status_code == 400
            assert http.get("/status").json() == {"classifier": "HEALTHY"}


def test_the_pipeline_composes_its_stages() -> None:
    with embserve_run("pipeline.py:app") as http:
        answer = http.post("/pipeline", content="The service was GREAT, the food was good")
        assert answer.json() == {"label": "positive", "score": 0.25, "topics": ["food", "service"]}
        assert http.post("/pipeline", content="slow and awful").json()["label"] == "negative"


def test_the_ab_rollout_splits_and_shadows() -> None:
    port = free_port()
    command = (sys.executable, "ab_rollout.py", "--port", str(port), "--share", "0.5")
    with started(*command) as server:
        server.wait_for_line("serving on")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            versions = [
                http.post("/recommend", content=f"u{i}").json()["version"] for i in range(60)
            ]
            assert set(versions) == {"v1", "v2"}  # at a share of 0.5, both in 60 requests
            assert "v3" not in versions  # the shadow's answers never reach callers

            def shadowed() -> bool:
                copies: int = http.get("/shadow-count").json()["shadow_copies"]
                assert copies <= 60
                return copies == 60  # shadow copies are fired and forgotten: they land soon

            wait_for(shadowed, 10)


def test_the_multiplexed_server_loads_each_model_once_per_replica() -> None:
    with embserve_run("multiplexed.py:app") as http:
        seen = []
        for model in ["en-fr", "en-de"] * 5:
            r = http.post("/translate", content="hello world", headers={"embserve-model-id": model})
            seen.append(r.json())
        assert {a["translation"] for a in seen} == {"bonjour monde", "hallo welt"}
        # A model stays on the replica that loaded it: at most one load per model and replica.
        assert all(a["loads_on_this_replica"] <= 2 for a in seen)
        unknown = http.post("/translate", content="x", headers={"embserve-model-id": "xx"})
        assert unknown.status_code == 404
        assert http.post("/translate", content="x").status_code == 400


def test_the_dask_example_places_two_replicas_per_declared_gpu() -> None:
    run = subprocess.run(
        [sys.executable, "dask_gpus.py"], cwd=EXAMPLES, capture_output=True, text=True, timeout=90
    )
    assert run.returncode == 0, run.stderr[-3000:]
    placed = re.findall(r"embedder#\d: worker (\d+), GPU \['0'\], holds \{'GPU': 0.5\}", run.stdout)
    assert sorted(placed) == ["0", "0", "1", "1"], run.stdout
    assert "8 answers of shape {(4,)}" in run.stdout
    assert "one-more: waiting for a Dask worker with GPU=0.5" in run.stdout


@pytest.mark.parametrize("path", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_a_test(path: str) -> None:
    stem = path.removesuffix(".py")
    tested = {"quickstart", "classifier", "fastapi_host", "flask_host", "pipeline"}
    tested |= {"ab_rollout", "multiplexed", "dask_gpus"}
    assert stem in tested, f"examples/{path} has no test in tests/test_examples.py"
