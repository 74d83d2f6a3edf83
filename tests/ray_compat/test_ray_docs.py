"""Ray Serve's documentation examples, ported with `import embserve as serve`, run as scripts.

Each script in scripts/ is written as Ray's docs write it and calls localhost over HTTP; the
tests give each a free port through ``serve.start(http_options=...)`` (PORT), and one runs on
Ray's default, 8000, when it is free.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.servers import free_port

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = SCRIPTS.parents[2]


def run_script(name: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.parametrize(
    ("script", "prints"),
    [
        ("quickstart.py", "!dlrow olleH"),
        ("composition.py", "{'result': 6}"),
        ("batching.py", "more than max_batch_size=512"),
        ("fastapi_ingress.py", "ok"),
        ("multiplexing.py", "model 1: hi"),
    ],
)
def test_ray_docs_example_runs_to_completion(script: str, prints: str) -> None:
    result = run_script(script, free_port())
    assert result.returncode == 0, result.stderr[-3000:]
    assert prints in result.stdout


def test_the_quickstart_runs_on_rays_default_port_8000() -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8000))
        except OSError:
            pytest.skip("something else listens on port 8000")
    result = run_script("quickstart.py", 8000)
    assert result.returncode == 0, result.stderr[-3000:]
