"""``embserve run`` and ``python -m embserve run``: real processes serving real HTTP.

The command prints its route table and a curl line, and stops gracefully on SIGTERM: requests
in flight are answered before the process exits.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.servers import raw_exchange

ROOT = Path(__file__).resolve().parents[2]
EMBSERVE = Path(sys.executable).with_name("embserve")


def start(command: list[str], cwd: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Start the command and read its banner up to the curl line: (process, url, banner)."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    banner: list[str] = []
    for line in process.stdout:  # ends when the process does: no hang if it fails to start
        banner.append(line.rstrip())
        if line.startswith("try: curl"):
            break
    match = re.search(r"serving on (http://\S+)", "\n".join(banner))
    if match is None:
        process.kill()
        pytest.fail("no banner:\n" + "\n".join(banner) + (process.stdout.read() or ""))
    return process, match.group(1), banner


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, then the rest of the output once the process exited on its own."""
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    return out


@pytest.fixture
def quickstart() -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """``embserve run examples.quickstart:app`` on a free port."""
    process, url, banner = start(
        [str(EMBSERVE), "run", "examples.quickstart:app", "--port", "0"], ROOT
    )
    try:
        yield process, url, banner
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_embserve_run_serves_the_quickstart(
    quickstart: tuple[subprocess.Popen[str], str, list[str]],
) -> None:
    process, url, banner = quickstart
    text = "\n".join(banner)
    assert "/sentiment" in text and "SentimentAPI" in text and "/-/healthz" in text
    assert f"curl -s -X POST {url}/sentiment" in text
    with httpx.Client(base_url=url, timeout=10) as http:
        r = http.post("/sentiment", content=b"I love fast serving")
        assert r.json() == {"text": "I love fast serving", "score": 0.5, "label": "positive"}
        assert http.post("/sentiment/words", content=b"A b").json() == ["a", "b"]
        assert http.get("/sentiment").status_code == 405
    out = stop(process)
    assert process.returncode == 0, out
    assert "embserve: stopped" in out


SLOW_APP = textwrap.dedent(
    """
    import asyncio

    import embserve


    @embserve.deployment
    async def slow(request):
        await asyncio.sleep(float(request.query_params["s"]))
        return {"slept": True}


    app = embserve.App({"/slow": slow.bind()})
    """
)


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    (tmp_path / "slow_service.py").write_text(SLOW_APP)
    process, url, _ = start(
        [sys.executable, "-m", "embserve", "run", "slow_service.py:app", "--port", "0"],
        tmp_path,
    )
    try:
        with httpx.Client(base_url=url, timeout=10) as http, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.get, "/slow", params={"s": "0.5"})
            deadline = time.monotonic() + 10
            while 'embserve_http_requests_in_flight{endpoint="slow"} 1.0' not in (
                http.get("/-/metrics").text
            ):
                assert time.monotonic() < deadline, "the request never started"
            process.send_signal(signal.SIGTERM)
            answer = pending.result(10)
        assert answer.status_code == 200 and answer.json() == {"slept": True}
        out, _ = process.communicate(timeout=30)
        assert process.returncode == 0, out
        assert "embserve: stopped" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_body_and_graceful_timeouts_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "slow_service.py").write_text(SLOW_APP)
    command = [str(EMBSERVE), "run", "slow_service.py:app", "--port", "0"]
    options = ["--body-timeout", "0.3", "--graceful-timeout", "0.3", "--keep-alive-timeout", "2"]
    process, url, _ = start(command + options, tmp_path)
    try:
        port = int(url.rsplit(":", 1)[1])
        started = time.monotonic()
        raw, closed = raw_exchange(
            port, b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\nabc", timeout_s=10
        )
        assert raw.startswith(b"HTTP/1.1 408 ") and closed
        assert time.monotonic() - started < 5
        with httpx.Client(base_url=url, timeout=20) as http, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                http.get, "/slow", params={"s": "30"}, headers={"x-request-id": "cli-1"}
            )
            deadline = time.monotonic() + 10
            while 'embserve_http_requests_in_flight{endpoint="slow"} 1.0' not in (
                http.get("/-/metrics").text
            ):
                assert time.monotonic() < deadline, "the request never started"
            process.send_signal(signal.SIGTERM)
            answer = pending.result(20)
        assert answer.status_code == 503
        assert answer.json()["request_id"] == "cli-1"
        out, _ = process.communicate(timeout=30)
        assert process.returncode == 0, out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
