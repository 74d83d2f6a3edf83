"""``embserve run``, ``embserve status``, ``python -m embserve run``: real processes, real HTTP.

The command shows its start-up progress, prints its route table and a curl line once every
route runs, and stops gracefully on SIGTERM: requests in flight are answered before the process
exits. What fails before it serves is one plain line (after the user's traceback, when user code
raised) and a non-zero exit.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import signal
import socket
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
# The tests of what the command does once it serves run on both servers it offers.
SERVERS = ["granian", "uvicorn", "hypercorn"]


def start(
    command: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Start the command and read its output (stderr and stdout, in order) up to the curl line:
    (process, url, those lines)."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
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


@pytest.fixture(params=SERVERS)
def quickstart(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """``embserve run examples.quickstart:app`` on a free port, with each server."""
    command = [str(EMBSERVE), "run", "examples.quickstart:app", "--port", "0"]
    process, url, banner = start([*command, "--server", request.param], ROOT)
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
    # Progress first, plainly; the banner once every route runs.
    assert banner.index("embserve: starting 1 replica(s) of 'SentimentAPI'") < len(banner)
    ready = next(i for i, line in enumerate(banner) if "'SentimentAPI' ready: 1/1 in" in line)
    assert ready < next(i for i, line in enumerate(banner) if "serving on" in line)
    server = next(name for name in SERVERS if f"with {name}" in text)
    assert f"serving on {url} with {server} (Ctrl-C to stop)" in text
    hint = f"curl -s -X POST {url}/sentiment -d 'I love fast serving'"
    assert banner[-1] == f"try: {hint}"
    if shutil.which("curl"):  # the line works as printed
        answer = subprocess.run(shlex.split(hint), capture_output=True, text=True, timeout=10)
        assert '"label":"positive"' in answer.stdout
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


@pytest.mark.parametrize("server", SERVERS)
def test_sigterm_drains_in_flight_requests(tmp_path: Path, server: str) -> None:
    (tmp_path / "slow_service.py").write_text(SLOW_APP)
    command = [sys.executable, "-m", "embserve", "run", "slow_service.py:app", "--port", "0"]
    process, url, _ = start([*command, "--server", server], tmp_path)
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


@pytest.mark.parametrize("server", SERVERS)
def test_body_and_graceful_timeouts_from_the_command_line(tmp_path: Path, server: str) -> None:
    (tmp_path / "slow_service.py").write_text(SLOW_APP)
    command = [str(EMBSERVE), "run", "slow_service.py:app", "--port", "0", "--server", server]
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
        # Headers that never end are cut by the keep-alive timeout (2 s here).
        started = time.monotonic()
        raw, closed = raw_exchange(port, b"GET /slow HTTP/1.1\r\nHost: t\r\n", timeout_s=10)
        assert raw == b"" and closed
        assert 1.5 < time.monotonic() - started < 6
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


GATED_APP = textwrap.dedent(
    """
    import sys

    import embserve


    @embserve.deployment
    class Gated:
        def __init__(self):
            sys.stdin.readline()  # the test lets the constructor finish by writing a line

        def __call__(self, request):
            return "open"


    app = embserve.App({"/gated": Gated.bind()})
    """
)


def start_gated(tmp_path: Path) -> subprocess.Popen[str]:
    """``embserve run`` of GATED_APP, whose constructor waits for a line on stdin."""
    (tmp_path / "gated.py").write_text(GATED_APP)
    return subprocess.Popen(
        [str(EMBSERVE), "run", "gated.py:app", "--port", "0"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_the_banner_waits_for_every_constructor(tmp_path: Path) -> None:
    process = start_gated(tmp_path)
    assert process.stdin is not None and process.stdout is not None
    try:
        assert process.stdout.readline() == "embserve: starting 1 replica(s) of 'Gated'\n"
        # The constructor now waits on stdin: whatever the command prints next comes after it.
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().startswith("embserve: 'Gated' ready: 1/1 in ")
        assert process.stdout.readline().startswith("embserve: serving on http://127.0.0.1:")
        assert process.stdout.readline() == "  /gated  -> Gated\n"
    finally:
        process.kill()
        process.communicate()


BROKEN_APP = textwrap.dedent(
    """
    import embserve


    @embserve.deployment
    class Broken:
        def __init__(self):
            raise ValueError("no weights at /models/m.bin")

        def __call__(self, request):
            return "never"


    app = embserve.App({"/broken": Broken.bind()})
    """
)

RAISES_ON_IMPORT = "import os\n\nraise RuntimeError('SERVICE_CONFIG is not set')\n"


@pytest.mark.parametrize(
    ("target", "options", "last_line", "traceback"),
    [
        ("nosuch_module:app", [], "embserve run: no module named 'nosuch_module'", False),
        ("broken.py:nosuch", [], "embserve run: 'broken.py' has no attribute 'nosuch'", False),
        ("missing.py:app", [], "embserve run: no file 'missing.py'", False),
        ("app_without_colon", [], "embserve run: expected module:attr or file.py:attr, got", False),
        (
            "raises.py:app",
            [],
            "embserve run: importing 'raises.py' failed: RuntimeError: SERVICE_CONFIG is not set",
            True,
        ),
        (
            "broken.py:app",
            ["--backend", "nosuch"],
            "embserve run: no embserve backend named 'nosuch' is installed",
            False,
        ),
        (
            "broken.py:app",
            ["--server", "uvicorn", "--read-timeout", "5"],
            "embserve run: --server uvicorn: uvicorn has no read timeout; use hypercorn for one",
            False,
        ),
        (
            "broken.py:app",
            [],
            "embserve run: the constructor of deployment 'Broken' raised ValueError: "
            "no weights at /models/m.bin",
            True,
        ),
    ],
)
def test_what_fails_before_serving_is_one_plain_line(
    tmp_path: Path, target: str, options: list[str], last_line: str, traceback: bool
) -> None:
    (tmp_path / "broken.py").write_text(BROKEN_APP)
    (tmp_path / "raises.py").write_text(RAISES_ON_IMPORT)
    command = [sys.executable, "-m", "embserve_asgi.cli", "run", target, "--port", "0", *options]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""  # never "serving on"
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(last_line), result.stderr
    tracebacks = result.stderr.count("Traceback (most recent call last)")
    assert tracebacks == (1 if traceback else 0), result.stderr
    if traceback:  # the user's code, not the machinery that ran it
        assert re.search(r'File ".*(raises|broken)\.py", line \d', result.stderr)
        assert "importlib" not in result.stderr and "hypercorn" not in result.stderr
    else:
        progress = [line for line in lines[:-1] if line.startswith("embserve: starting ")]
        assert lines[:-1] == progress, result.stderr


IN_USE = os.strerror(errno.EADDRINUSE).lower()  # "address already in use"


def test_a_busy_port_is_one_plain_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [str(EMBSERVE), "run", "examples.quickstart:app", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"embserve run: cannot listen on 127.0.0.1:{port}: {IN_USE}\n"


def status(url: str, *options: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """``embserve status URL ...`` with ``$EMBSERVE_ADMIN_TOKEN`` set to ``token`` (or unset)."""
    env = {k: v for k, v in os.environ.items() if k != "EMBSERVE_ADMIN_TOKEN"}
    if token is not None:
        env["EMBSERVE_ADMIN_TOKEN"] = token
    return subprocess.run(
        [str(EMBSERVE), "status", url, *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("server", SERVERS)
def test_admin_token_and_embserve_status(server: str) -> None:
    # --admin-token beats the environment's token, which the App reads when none is given.
    env = {**os.environ, "EMBSERVE_ADMIN_TOKEN": "from-env"}
    command = [str(EMBSERVE), "run", "examples.quickstart:app", "--port", "0", "--server", server]
    process, url, banner = start([*command, "--admin-token", "from-cli"], ROOT, env)
    try:
        assert (
            "  admin: /-/healthz /-/ready /-/routes /-/status /-/metrics (Bearer token"
            in banner[-2]
        )
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/-/healthz").status_code == 200  # probes need no token
            refused = http.get("/-/status", headers={"x-request-id": "adm-1"})
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["request_id"] == "adm-1"
            assert (
                http.get("/-/status", headers={"authorization": "Bearer from-env"}).status_code
                == 401
            )
            good = http.get("/-/ready", headers={"authorization": "Bearer from-cli"})
            assert good.status_code == 200

        table = status(url, token="from-cli")  # the token from the environment
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0] == "backend: local"
        assert "SentimentAPI  HEALTHY  1/1 running" in table.stdout
        assert "endpoint SentimentAPI /sentiment -> SentimentAPI 100%" in table.stdout
        assert status(url, "--admin-token", "from-cli", token="wrong").returncode == 0

        for result, line in [
            (
                status(url),
                f"{url}/-/status needs the admin token (--admin-token or $EMBSERVE_ADMIN_TOKEN)",
            ),
            (status(url, "--admin-token", "wrong"), f"{url}/-/status refused the admin token"),
        ]:
            assert result.returncode == 1 and result.stdout == ""
            assert result.stderr == f"embserve status: {line}\n"
    finally:
        stop(process)

    # The admin routes off: `embserve status` says so; a server gone: it says so too.
    process, url, banner = start([*command, "--no-admin"], ROOT)
    try:
        assert not any("admin:" in line for line in banner)
        assert httpx.get(f"{url}/-/healthz", timeout=10).status_code == 404
        off = status(url)
        assert off.returncode == 1
        assert (
            off.stderr == f"embserve status: {url}/-/status not found (are the admin routes off?)\n"
        )
    finally:
        stop(process)
    gone = status(url)
    assert gone.returncode == 1
    assert gone.stderr == f"embserve status: cannot reach {url}: connection refused\n"


@pytest.mark.parametrize("server", SERVERS)
def test_the_access_log_is_hypercorn_s_one_line_format(server: str) -> None:
    command = [str(EMBSERVE), "run", "examples.quickstart:app", "--port", "0", "--access-log"]
    command += ["--server", server]
    process, url, _ = start(command, ROOT)
    try:
        with httpx.Client(base_url=url, timeout=10, headers={"user-agent": "curl/8.5.0"}) as http:
            assert http.post("/sentiment", content=b"good").status_code == 200
            assert http.get("/nowhere", headers={"referer": "http://x/"}).status_code == 404
    finally:
        out = stop(process)
    lines = out.splitlines()
    host = r"127\.0\.0\.1:\d+ - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]"
    assert any(
        re.fullmatch(host + r' "POST /sentiment 1\.1" 200 \d+ "-" "curl/8\.5\.0"', line)
        for line in lines
    ), out
    assert any(
        re.fullmatch(host + r' "GET /nowhere 1\.1" 404 \d+ "http://x/" "curl/8\.5\.0"', line)
        for line in lines
    ), out


def test_help_is_plain_text() -> None:
    for command in (["--help"], ["run", "--help"], ["status", "--help"]):
        result = subprocess.run(
            [str(EMBSERVE), *command], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0 and result.stderr == ""
        assert result.stdout.startswith("usage: embserve")
    run_help = subprocess.run([str(EMBSERVE), "run", "--help"], capture_output=True, text=True)
    for option in ("--admin-token", "--no-admin", "--access-log", "--backend", "--port"):
        assert option in run_help.stdout


def test_sigterm_while_starting_stops_without_serving(tmp_path: Path) -> None:
    process = start_gated(tmp_path)
    assert process.stdout is not None
    try:
        assert process.stdout.readline() == "embserve: starting 1 replica(s) of 'Gated'\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0  # the constructor still waits on stdin
        assert process.stdout.read() == "embserve: stopped\n"
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
