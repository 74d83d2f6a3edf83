"""How process workers start: from any script (no main guard needed), from daemonic processes,
with deployments of importable modules sent by reference and a clear error for what cannot be
sent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import embserve
from embserve_process import ProcessBackend

pytestmark = pytest.mark.timeout(60)

# A module-level lock: it cannot be pickled, so a deployment using it must travel by reference.
_COUNT_LOCK = threading.Lock()
_counts: dict[str, int] = {}


@embserve.deployment
class Counter:
    """Counts calls per key under the module's lock: its code uses the unpicklable global."""

    def __call__(self, key: str) -> tuple[int, int]:
        with _COUNT_LOCK:
            _counts[key] = _counts.get(key, 0) + 1
            return _counts[key], os.getpid()


@pytest.fixture(scope="module")
def rt() -> Iterator[embserve.Runtime]:
    """One process runtime for the module."""
    with embserve.Runtime(backend=ProcessBackend()) as runtime:
        yield runtime


def test_a_deployment_using_a_module_level_lock_runs_by_reference(rt: embserve.Runtime) -> None:
    handle = rt.run(Counter.bind(), name="counter")
    assert handle.remote("a").result(timeout_s=10)[0] == 1
    count, pid = handle.remote("a").result(timeout_s=10)
    # The worker imported this module: the lock and the counts are its own, not the caller's.
    assert (count, pid != os.getpid(), _counts) == (2, True, {})
    rt.delete("counter")


def run_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a script file of its own directory, the way a user would."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=45,
    )


def test_a_script_without_a_main_guard_runs_to_completion_quietly(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    done = run_script(
        tmp_path,
        """
        import embserve
        from helpers import double  # a sibling module: the worker imports it from here too

        @embserve.deployment
        def answer(x):
            return double(x)

        with embserve.Runtime(backend="process") as rt:
            print(rt.run(answer.bind()).remote(21).result(timeout_s=30))
        """,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "42\n", "")


def test_an_unpicklable_global_of_a_main_deployment_is_named_with_the_fix(
    tmp_path: Path,
) -> None:
    done = run_script(
        tmp_path,
        """
        import threading
        import embserve

        lock = threading.Lock()

        @embserve.deployment
        class Guarded:
            def __call__(self, x):
                with lock:
                    return x

        with embserve.Runtime(backend="process") as rt:
            try:
                rt.run(Guarded.bind())
            except embserve.DeploymentFailedError as exc:
                print(exc)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("deployment 'Guarded' cannot be sent to its replica: ")
    assert "the global 'lock' that Guarded.__call__ uses is a _thread.lock" in done.stdout
    assert "create it in __init__ instead" in done.stdout


def test_an_unpicklable_constructor_argument_is_named(rt: embserve.Runtime) -> None:
    with pytest.raises(embserve.DeploymentFailedError) as failed:
        rt.run(Counter.bind(threading.Lock()), name="bad-argument")
    message = str(failed.value)
    assert "constructor argument 0 is a _thread.lock, which cannot be pickled" in message
    assert "create it in __init__" in message
