"""Worker processes killed under 64-way load from handles, replaced, and never left behind.

Every call ends within a bound; calls that had not started on a killed worker run elsewhere;
those it was running end with ReplicaDiedError (naming the signal); the deployment gets its
replicas back and serves.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import embserve
from embserve_process import ProcessBackend
from tests.waiting import settle, wait_for

T = TypeVar("T")

pytestmark = pytest.mark.timeout(90)

# How soon a killed worker must be noticed (the bound).
DETECTION_BOUND_S = 1.0
# Calls in flight or queued from handles when workers are killed.
LOAD = 64


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (exited and reaped, or a zombie nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@embserve.deployment(num_replicas=2, max_ongoing_requests=4, health_check_period_s=60)
class Sleeper:
    """Sleeps, then says which process served the call."""

    async def __call__(self, delay: float) -> int:
        await asyncio.sleep(delay)
        return os.getpid()


@pytest.fixture(scope="module")
def rt() -> Iterator[embserve.Runtime]:
    """One process runtime for the module."""
    with embserve.Runtime(backend=ProcessBackend()) as runtime:
        yield runtime


def replicas(rt: embserve.Runtime, name: str) -> dict[int, Any]:
    """The RUNNING replicas of ``name`` by worker pid."""
    status = rt.status().deployments[name]
    return {r.info["pid"]: r for r in status.replicas if r.state is embserve.ReplicaState.RUNNING}


def kill_one_under_load(
    rt: embserve.Runtime, handle: embserve.Handle, name: str, requests: int
) -> tuple[int, list[Any], float]:
    """Kill a busy worker with SIGKILL while ``requests`` calls are queued or in flight.

    Returns the victim's pid, each request's outcome (a pid or the exception), and how long the
    runtime took to take the victim out of its replicas.
    """
    responses = [handle.remote(0.05) for _ in range(requests)]
    busy = wait_for(
        lambda: [pid for pid, r in replicas(rt, name).items() if r.ongoing_requests > 0]
    )
    victim = busy[0]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in replicas(rt, name), timeout_s=5, step_s=0.002)
    noticed = time.monotonic() - killed
    outcomes = settle(responses)
    return victim, outcomes, noticed


def test_sigkill_under_load_fails_only_what_was_in_flight_and_replaces_the_worker(
    rt: embserve.Runtime,
) -> None:
    handle = rt.run(Sleeper.bind(), name="sleeper")
    for _ in range(2):  # a bounded number of kills, each one replaced before the next
        victim, outcomes, noticed = kill_one_under_load(rt, handle, "sleeper", LOAD)
        assert noticed < DETECTION_BOUND_S
        failures = [o for o in outcomes if isinstance(o, Exception)]
        # Only what the victim was running may fail; everything queued went elsewhere.
        assert len(failures) <= Sleeper.config.ongoing_limit
        assert all(isinstance(f, embserve.ReplicaDiedError) and f.started for f in failures)
        assert all("SIGKILL" in str(f) for f in failures)
        assert victim not in [o for o in outcomes if isinstance(o, int)][-10:]
        assert len(outcomes) == LOAD
        pids = wait_for(
            lambda: set(replicas(rt, "sleeper")) if len(replicas(rt, "sleeper")) == 2 else set()
        )
        assert victim not in pids
        assert wait_for(functools.partial(gone, victim))
        assert handle.remote(0).result(timeout_s=10) in pids
    rt.delete("sleeper")


def test_with_max_retries_requests_in_flight_on_a_killed_worker_succeed(
    rt: embserve.Runtime,
) -> None:
    handle = rt.run(Sleeper.options(max_retries=3).bind(), name="retrying")
    victim, outcomes, noticed = kill_one_under_load(rt, handle, "retrying", LOAD)
    assert noticed < DETECTION_BOUND_S
    assert all(isinstance(o, int) for o in outcomes), outcomes
    assert victim not in outcomes[-8:]
    rt.delete("retrying")


def test_threads_on_direct_lines_lose_only_what_a_killed_worker_was_running(
    rt: embserve.Runtime,
) -> None:
    """Plain threads call ``.result()`` (on each replica's direct line, or through the loop
    when the line is taken) while a worker is killed: every call ends, only calls the victim
    was running fail, and the threads are served again."""
    handle = rt.run(Sleeper.bind(), name="threads")
    handle.remote(0).result(timeout_s=10)  # the first call turns the shared counts on
    outcomes: list[Any] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                outcome: Any = handle.remote(0.002).result()
            except Exception as exc:
                outcome = exc
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(outcomes) >= 100)
        victim = next(iter(replicas(rt, "threads")))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in (pids := replicas(rt, "threads")) and len(pids) == 2)
        served = len(outcomes)
        wait_for(lambda: len(outcomes) >= served + 100)  # served again, by both replicas
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failures) <= Sleeper.config.ongoing_limit
    assert all(isinstance(f, embserve.ReplicaDiedError) and f.started for f in failures)
    assert all("SIGKILL" in str(f) for f in failures)
    assert victim not in outcomes[-50:]
    rt.delete("threads")


def test_every_worker_killed_at_once_under_load_ends_every_call_and_capacity_returns(
    rt: embserve.Runtime,
) -> None:
    handle = rt.run(Sleeper.bind(), name="all-killed")
    responses = [handle.remote(0.05) for _ in range(LOAD)]

    def all_busy() -> list[int]:
        running = replicas(rt, "all-killed")
        return list(running) if all(r.ongoing_requests for r in running.values()) else []

    victims = wait_for(all_busy)
    assert len(victims) == 2
    started = time.monotonic()
    for victim in victims:
        os.kill(victim, signal.SIGKILL)
    outcomes = settle(responses)
    assert time.monotonic() - started < 20  # nothing hung
    failures = [o for o in outcomes if isinstance(o, Exception)]
    # At most what both were running fails, as started; the queued calls waited for the
    # replacements and ran there.
    assert len(failures) <= 2 * Sleeper.config.ongoing_limit
    assert all(isinstance(f, embserve.ReplicaDiedError) and f.started for f in failures)
    assert len(outcomes) == LOAD and len(failures) < LOAD
    pids = wait_for(
        lambda: set(replicas(rt, "all-killed")) if len(replicas(rt, "all-killed")) == 2 else set()
    )
    assert not pids & set(victims)
    assert {handle.remote(0).result(timeout_s=10) for _ in range(8)} <= pids
    rt.delete("all-killed")


def test_leaving_the_runtime_leaves_no_worker() -> None:
    with embserve.Runtime(backend="process") as runtime:
        runtime.run(Sleeper.bind(), name="brief")
        pids = list(replicas(runtime, "brief"))
        assert len(pids) == 2
    # Stopped and reaped before shutdown returned: not even a zombie is left.
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


_PARENT = textwrap.dedent(
    """
    import os, sys, embserve

    @embserve.deployment(num_replicas=2)
    def pid():
        return os.getpid()

    if __name__ == "__main__":
        rt = embserve.Runtime(backend="process")
        rt.run(pid.bind())
        infos = rt.status().deployments["pid"].replicas
        print(" ".join(str(r.info["pid"]) for r in infos), flush=True)
        sys.stdin.readline()  # until killed, or told to exit
        # then leave without shutting down: the runtime's exit handler must stop the workers
    """
)


@pytest.mark.parametrize("how", ["killed", "exits"])
def test_workers_do_not_outlive_their_parent(tmp_path: Path, how: str) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(not gone(pid) for pid in pids)
        if how == "killed":
            parent.kill()
        else:
            assert parent.stdin is not None
            parent.stdin.write("exit\n")
            parent.stdin.flush()
        assert parent.wait(timeout=30) in (0, -signal.SIGKILL)
        wait_for(lambda: all(gone(pid) for pid in pids), timeout_s=10)
    finally:
        parent.kill()
        parent.wait()
