"""The wheels install and serve outside the checkout: ``make dist``, then in a fresh virtualenv
``pip install --find-links dist 'embserve[asgi,process,dask]'`` and ``embserve run``.

The slowest test of the suite by design (a virtualenv and an install, ~20 s; pip's cache keeps
it there); it is skipped, saying so, only where pip cannot reach a package index.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest

from tests.e2e.servers import free_port
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

SERVICE = """
import embserve
from starlette.requests import Request


@embserve.deployment(num_replicas=2)
class Echo:
    async def __call__(self, request: Request) -> dict:
        return {"echo": (await request.body()).decode(), "from": embserve.__file__}


app = embserve.App({"/echo": Echo.bind()})
"""


def pip(python: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run pip for the environment of ``python``, outside the checkout.

    This interpreter's pip works on the fresh environment (``pip --python``), which saves
    installing pip into it.
    """
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "--disable-pip-version-check",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=python.parent,
    )


def test_the_install_command_suggested_works_from_where_embserve_is(tmp_path: Path) -> None:
    from embserve._install import install_command

    # Imported from this checkout: the folder of the sub-distribution, which pip installs.
    assert install_command("asgi") == f"pip install {ROOT / 'adapters' / 'asgi'}"
    assert install_command("dask") == f"pip install {ROOT / 'backends' / 'dask'}"
    # Installed from wheels (site-packages has no sub-distribution folders): the extra.
    assert install_command("process", root=tmp_path) == "pip install 'embserve[process]'"


@pytest.mark.timeout(300)
def test_the_wheels_install_in_a_fresh_virtualenv_and_serve(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    probe = pip(python, "download", "--no-deps", "--dest", str(tmp_path / "probe"), "cloudpickle")
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index here: {probe.stderr.strip()[-300:]}")

    dist = tmp_path / "dist"
    make = subprocess.run(
        ["make", "-s", "dist", f"DIST={dist}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert make.returncode == 0, make.stderr[-3000:]
    wheels = sorted(p.name.split("-")[0] for p in dist.glob("*.whl"))
    assert wheels == ["embserve", "embserve_asgi", "embserve_dask", "embserve_process"]

    outside = tmp_path / "service"
    outside.mkdir()
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    # The core alone: what is missing is named with the command that installs it from here.
    core = pip(python, "install", "--find-links", str(dist), "embserve")
    assert core.returncode == 0, core.stderr[-3000:]
    missing = subprocess.run(
        [str(python), "-m", "embserve", "run", "service:app"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=outside,
        env=clean_env,
    )
    assert missing.returncode == 1
    assert "needs the ASGI adapter: pip install 'embserve[asgi]'" in missing.stdout
    no_backend = subprocess.run(
        [str(python), "-c", "import embserve; embserve.Runtime(backend='process').start()"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=outside,
        env=clean_env,
    )
    assert "install it with `pip install 'embserve[process]'`" in no_backend.stderr

    installed = pip(python, "install", "--find-links", str(dist), "embserve[asgi,process,dask]")
    assert installed.returncode == 0, installed.stderr[-3000:]

    # Every backend is found through its entry point, from the wheels, not from the checkout.
    check = subprocess.run(
        [
            str(python),
            "-c",
            "import embserve, embserve.backends as b; print(embserve.__file__); "
            "print(sorted(b.load_backend(n).__name__ for n in ('local', 'process', 'dask')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=outside,
        env=clean_env,
    )
    assert check.returncode == 0, check.stderr
    where, backends = check.stdout.splitlines()
    assert Path(where).is_relative_to(env_dir) and not Path(where).is_relative_to(ROOT)
    assert backends == "['DaskBackend', 'LocalBackend', 'ProcessBackend']"

    (outside / "service.py").write_text(SERVICE)
    port = free_port()
    server = subprocess.Popen(
        [str(env_dir / "bin" / "embserve"), "run", "service:app", "--port", str(port)],
        cwd=outside,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            def answered() -> httpx.Response | None:
                assert server.poll() is None, server.communicate()[0]
                try:
                    return http.post("/echo", content="from a fresh virtualenv")
                except httpx.TransportError:
                    return None

            answer = wait_for(answered, 60)
            assert answer is not None and answer.status_code == 200
            assert answer.json()["echo"] == "from a fresh virtualenv"
            assert Path(answer.json()["from"]).is_relative_to(env_dir)
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert re.search(r"serving on http://127\.0\.0\.1:\d+", output), output
