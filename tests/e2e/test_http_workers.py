"""``embserve run --workers N``: refused where each process would start replicas of its own;
N real server processes on one port where the backend says its replicas are shared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_http_cli import EMBSERVE, start

SERVICE = textwrap.dedent(
    """
    import os
    import sys

    import embserve
    from embserve.local import LocalBackend


    class SharedLocal(LocalBackend):
        # What a Dask backend with a namespace says: every process's runtime routes to the one
        # set of replicas. (Untrue of threads; enough for the command, which only asks.)
        shares_replicas = True


    @embserve.deployment
    class Pid:
        def __init__(self):
            # Proves where a replica started: the command must start none in its own process.
            with open(os.environ["STARTED_LOG"], "a") as log:
                log.write(f"{os.getpid()}\\n")

        def __call__(self, request):
            return {"pid": os.getpid()}


    app = embserve.App({"/pid": Pid.bind()})
    shared = embserve.App({"/pid": Pid.bind()}, backend=SharedLocal())
    """
)

REFUSAL = (
    "embserve run: --workers 2 needs replicas shared between processes; the {backend} backend "
    "starts its own replicas in each process. Use a Dask backend with a namespace "
    "(docs/scaling.md), or one worker with more replicas (num_replicas=...)\n"
)


@pytest.fixture
def service(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder with ``service.py`` and the environment that runs it."""
    (tmp_path / "service.py").write_text(SERVICE)
    return tmp_path, {**os.environ, "STARTED_LOG": str(tmp_path / "started.log")}


@pytest.mark.parametrize("backend", ["local", "process"])
def test_workers_are_refused_when_each_process_would_start_its_own_replicas(
    service: tuple[Path, dict[str, str]], backend: str
) -> None:
    folder, env = service
    command = [str(EMBSERVE), "run", "service.py:app", "--workers", "2", "--port", "0"]
    result = subprocess.run(
        [*command, "--backend", backend],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == REFUSAL.format(backend=backend)
    assert not (folder / "started.log").exists()  # no replica started, anywhere


@pytest.mark.parametrize("server", ["granian", "uvicorn", "hypercorn"])
def test_two_workers_answer_on_one_port_when_replicas_are_shared(
    service: tuple[Path, dict[str, str]], server: str
) -> None:
    folder, env = service
    command = [str(EMBSERVE), "run", "service.py:shared", "--workers", "2", "--port", "0"]
    process, url, banner = start([*command, "--server", server], folder, env)
    try:
        assert any(f"with {server}, 2 workers (Ctrl-C to stop)" in line for line in banner)
        # Both workers serve once the banner is out: each has its replica running.
        started = (folder / "started.log").read_text().split()
        assert len(started) == 2 and str(process.pid) not in started
        pids: set[int] = set()
        deadline = time.monotonic() + 20
        while len(pids) < 2:  # each request on a new connection: either worker may accept it
            assert time.monotonic() < deadline, f"only worker(s) {pids} answered"
            answer = httpx.get(f"{url}/pid", headers={"connection": "close"}, timeout=10)
            assert answer.status_code == 200
            pids.add(answer.json()["pid"])
        assert {str(pid) for pid in pids} == set(started)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert out.count("embserve: stopped") == 1
        for pid in pids:  # the workers are gone with it
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


BROKEN = textwrap.dedent(
    """
    import embserve
    from embserve.local import LocalBackend


    class SharedLocal(LocalBackend):
        shares_replicas = True


    @embserve.deployment
    class Broken:
        def __init__(self):
            raise ValueError("no weights")

        def __call__(self, request):
            return "never"


    app = embserve.App({"/broken": Broken.bind()}, backend=SharedLocal())
    """
)


def test_a_worker_that_fails_to_start_stops_the_command(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(BROKEN)
    command = [sys.executable, "-m", "embserve", "run", "broken.py:app", "--workers", "2"]
    result = subprocess.run(
        [*command, "--port", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "serving on" not in result.stdout
    assert (
        "embserve run: the constructor of deployment 'Broken' raised ValueError: no weights"
        in result.stderr
    )
