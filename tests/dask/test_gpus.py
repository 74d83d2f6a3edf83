"""GPUs on the Dask backend: per-device shares, each replica in a process of its own.

One in-process worker declaring ``GPU=2`` (no real GPU is needed: what is checked is what each
replica's process sees in ``CUDA_VISIBLE_DEVICES``), and the process of each replica killed,
cancelled and stopped as an operator or a failure would.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import distributed
import pytest

import embserve
from embserve_dask import DaskBackend
from tests.dask.clusters import loopback_cluster
from tests.processes import alive
from tests.waiting import wait_for, wait_until

# distributed's constructors are untyped; tests use them through this name.
Client: Any = distributed.Client


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One in-process worker declaring two GPUs and pinned to none (so they are 0 and 1)."""
    pinned = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        with loopback_cluster(
            n_workers=1, threads_per_worker=2, processes=False, resources={"GPU": 2}
        ) as local_cluster:
            yield local_cluster
    finally:
        if pinned is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = pinned


@pytest.fixture(scope="module")
def runtime(cluster: Any) -> Iterator[embserve.Runtime]:
    """One runtime on the cluster for the whole module."""
    with embserve.Runtime(backend=DaskBackend(cluster)) as rt:
        yield rt


@embserve.deployment(num_replicas=4, resources={"GPU": 0.5})
class Half:
    """Half a GPU each: says what its process sees."""

    def __call__(self) -> tuple[str, str | None, tuple[str, ...], int]:
        context = embserve.get_replica_context()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return context.replica_id, visible, context.gpu_ids, os.getpid()


@embserve.deployment(resources={"GPU": 0.5})
class OneMoreHalf:
    """A fifth half-GPU replica, for which there is no room."""

    def __call__(self) -> str:
        return "started"


@embserve.deployment
class NoGPU:
    """Asks for no GPU."""

    def __call__(self) -> tuple[str | None, tuple[str, ...]]:
        return os.environ.get("CUDA_VISIBLE_DEVICES"), embserve.get_replica_context().gpu_ids


def _running(rt: embserve.Runtime, name: str) -> dict[str, Any]:
    return {
        r.replica_id: r.info
        for r in rt.status().deployments[name].replicas
        if r.state.value == "RUNNING"
    }


def _answers_from_every_replica(handle: embserve.Handle, replica_ids: set[str]) -> dict[str, Any]:
    # Calls are routed to two sampled replicas at a time: call until each has answered.
    answers: dict[str, Any] = {}

    def all_answered() -> bool:
        for _ in range(8):
            answer = handle.remote().result(timeout_s=10)
            answers[answer[0]] = answer
        return replica_ids <= set(answers)

    wait_until(all_answered)
    return {replica_id: answers[replica_id] for replica_id in replica_ids}


@pytest.fixture(scope="module")
def half(runtime: embserve.Runtime) -> Iterator[embserve.Handle]:
    """The four half-GPU replicas, which fill the worker's two GPUs."""
    handle = runtime.run(Half.bind(), name="half")
    yield handle
    runtime.delete("half")


def test_half_gpu_replicas_share_devices_two_by_two_and_a_fifth_waits(
    runtime: embserve.Runtime, half: embserve.Handle
) -> None:
    infos = _running(runtime, "half")
    answers = _answers_from_every_replica(half, set(infos))
    visible = sorted(answer[1] for answer in answers.values())
    assert visible == ["0", "0", "1", "1"]
    for replica_id, (_, seen, gpu_ids, pid) in answers.items():
        # What the process sees is what its context and its status say it holds, and no more.
        assert gpu_ids == (seen,)
        assert infos[replica_id]["gpu_ids"] == [seen]
        assert infos[replica_id]["pid"] == pid != os.getpid()

    runtime.run(OneMoreHalf.bind(), name="more", wait=False)
    message = wait_for(lambda: runtime.status().deployments["more"].message)
    assert "GPU=0.5" in message and "most free on any worker is 0" in message, message
    assert not _running(runtime, "more")
    states = [r.state.value for r in runtime.status().deployments["more"].replicas]
    assert states == ["PENDING_ALLOCATION"]
    runtime.delete("more")


def test_a_replica_without_a_gpu_demand_sees_no_gpu(runtime: embserve.Runtime) -> None:
    handle = runtime.run(NoGPU.bind(), name="no-gpu")
    assert handle.remote().result(timeout_s=10) == ("", ())
    (info,) = _running(runtime, "no-gpu").values()
    assert info["gpu_ids"] == []
    runtime.delete("no-gpu")
    wait_until(lambda: not alive(info["pid"]))


def test_a_killed_replica_process_is_replaced_on_the_device_it_freed(
    runtime: embserve.Runtime, half: embserve.Handle
) -> None:
    before = _running(runtime, "half")
    victim_id, victim = sorted(before.items())[0]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: victim_id not in _running(runtime, "half"))
    wait_until(lambda: len(_running(runtime, "half")) == 4)
    after = _running(runtime, "half")
    assert not alive(victim["pid"])
    answers = _answers_from_every_replica(half, set(after))
    # The replacement holds the half GPU the dead one gave back.
    assert sorted(answer[1] for answer in answers.values()) == ["0", "0", "1", "1"]
    assert victim["pid"] not in {answer[3] for answer in answers.values()}


def test_cancelling_a_replica_task_stops_its_process(
    runtime: embserve.Runtime, half: embserve.Handle, cluster: Any
) -> None:
    replica = runtime._controllers["half"].running[0]
    pid = replica.info["pid"]
    with Client(cluster) as client:
        # Forced: the task belongs to the backend's client, not this one.
        client.cancel([distributed.Future(replica.future.key, client)], force=True)
    wait_until(lambda: not alive(pid))
    wait_until(lambda: replica.replica_id not in _running(runtime, "half"))
    wait_until(lambda: len(_running(runtime, "half")) == 4)
    assert half.remote().result(timeout_s=10)[1] in ("0", "1")
