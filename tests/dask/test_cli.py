"""End to end with Dask's own command-line tools, as a user runs them: ``dask scheduler`` and
``dask worker --resources GPU=1``, a worker killed under load and another one added."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import embserve
from embserve.errors import ReplicaDiedError

ROOT = Path(__file__).resolve().parents[2]
DASK = str(Path(sys.executable).with_name("dask"))


@embserve.deployment(num_replicas=4, resources={"GPU": 0.5}, max_ongoing_requests=4)
class Shard:
    """Half a GPU each: two replicas per worker."""

    def __call__(self) -> tuple[str, tuple[str, ...], int]:
        context = embserve.get_replica_context()
        return context.worker, context.gpu_ids, os.getpid()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Cluster:
    """A scheduler and workers started with the ``dask`` command, stopped at the end."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.scheduler = self._spawn(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
            {},
        )

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        process = subprocess.Popen(
            args, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.processes.append(process)
        return process

    def worker(self, name: str, gpu: str) -> subprocess.Popen[bytes]:
        """A worker declaring one GPU, pinned to ``gpu`` as dask-cuda would pin it."""
        return self._spawn(
            [
                DASK, "worker", f"tcp://127.0.0.1:{self.port}", "--host", "127.0.0.1",
                "--nthreads", "1", "--resources", "GPU=1", "--no-nanny", "--no-dashboard",
                "--name", name,
            ],
            {"CUDA_VISIBLE_DEVICES": gpu},
        )  # fmt: skip

    def stop(self) -> None:
        # Workers first: a worker whose scheduler vanishes mid-close can hang in Dask's own
        # shutdown, which is not what this test is about.
        workers = [p for p in self.processes if p is not self.scheduler]
        for group in (workers, [self.scheduler]):
            for process in group:
                if process.poll() is None:
                    process.terminate()
            for process in group:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def cli_cluster() -> Iterator[_Cluster]:
    """A cluster of real ``dask`` processes on loopback."""
    cluster = _Cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def _running(rt: embserve.Runtime) -> list[Any]:
    return [r for r in rt.status().deployments["shard"].replicas if r.state.value == "RUNNING"]


def _wait_for(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_dask_cli_cluster_places_shares_survives_a_kill_and_grows(cli_cluster: _Cluster) -> None:
    first = cli_cluster.worker("gpu-a", "0")
    cli_cluster.worker("gpu-b", "1")
    with embserve.Runtime(backend=f"dask://127.0.0.1:{cli_cluster.port}") as rt:
        # The runtime may start before the workers join: replicas wait for room.
        handle = rt.run(Shard.bind(), name="shard")
        replicas = _running(rt)
        assert len(replicas) == 4
        by_worker: dict[str, set[tuple[str, ...]]] = {}
        for replica in replicas:
            by_worker.setdefault(replica.info["worker"], set()).add(tuple(replica.info["gpu_ids"]))
        # Each worker's replicas see that worker's own pinned GPU.
        assert sorted(sorted(ids) for ids in by_worker.values()) == [[("0",)], [("1",)]]
        assert sorted(len([r for r in replicas if r.info["worker"] == w]) for w in by_worker) == [
            2,
            2,
        ]
        answers = {handle.remote().result(timeout_s=10) for _ in range(40)}
        assert {gpus for _, gpus, _ in answers} == {("0",), ("1",)}

        # Kill one worker under load: every request ends, the survivors keep serving.
        stop = threading.Event()
        failures: list[BaseException] = []
        served: list[Any] = []

        def load() -> None:
            while not stop.is_set():
                try:
                    served.append(handle.remote().result(timeout_s=10))
                except ReplicaDiedError as exc:
                    failures.append(exc)

        callers = [threading.Thread(target=load) for _ in range(4)]
        for caller in callers:
            caller.start()
        _wait_for(lambda: len(served) > 20)
        os.kill(first.pid, signal.SIGKILL)
        _wait_for(lambda: len(_running(rt)) == 2)
        # No room for the lost half-GPUs until a worker joins: the status says which is short.
        _wait_for(lambda: "GPU=0.5" in rt.status().deployments["shard"].message)
        count = len(served)
        _wait_for(lambda: len(served) > count + 20)
        cli_cluster.worker("gpu-c", "2")
        _wait_for(lambda: len(_running(rt)) == 4)
        stop.set()
        for caller in callers:
            caller.join(timeout=20)
            assert not caller.is_alive()
        assert all(isinstance(f, ReplicaDiedError) for f in failures)
        gpus = sorted(tuple(r.info["gpu_ids"]) for r in _running(rt))
        assert gpus == [("1",), ("1",), ("2",), ("2",)]
        assert {handle.remote().result(timeout_s=10)[1] for _ in range(40)} == {("1",), ("2",)}

        # Losing the scheduler is a clear status.
        cli_cluster.scheduler.kill()
        _wait_for(lambda: "scheduler unreachable" in rt.status().backend)
        # Replicas already connected keep serving: requests never went through the scheduler.
        assert {handle.remote().result(timeout_s=10)[1] for _ in range(40)} == {("1",), ("2",)}
