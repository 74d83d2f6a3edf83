"""Invariants of the Dask backend's placement choice, on simulated clusters (no Dask needed)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from embserve.deployment import DeploymentConfig
from embserve.replica import ReplicaSpec
from embserve_dask import DaskBackend


def _spec(name: str, index: int, resources: dict[str, float]) -> ReplicaSpec:
    return ReplicaSpec(
        deployment=name,
        replica_id=f"{name}#{index}",
        target=object,
        init_args=(),
        init_kwargs={},
        config=DeploymentConfig(resources=resources),
    )


def _backend(gpus: list[float]) -> Any:
    backend = DaskBackend("tcp://127.0.0.1:1")
    backend._workers = {f"tcp://w{i}:1": {"GPU": g, "CPU": 4.0} for i, g in enumerate(gpus)}
    return backend


shares = st.sampled_from([0.25, 0.5, 1.0])


@settings(max_examples=100, deadline=None)
@given(
    gpus=st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=1, max_size=5),
    requests=st.lists(st.tuples(st.sampled_from("abc"), shares), max_size=20),
)
def test_placement_never_overcommits_and_waits_only_when_nothing_fits(
    gpus: list[float], requests: list[tuple[str, float]]
) -> None:
    backend = _backend(gpus)
    for index, (name, share) in enumerate(requests):
        spec = _spec(name, index, {"GPU": share})
        address, reason = backend._place(spec)
        free = {
            w: total["GPU"] - sum(r.get("GPU", 0.0) for _, r in backend._held.get(w, {}).values())
            for w, total in backend._workers.items()
        }
        if address is None:
            assert all(f < share for f in free.values())
            assert "GPU=" in reason
        else:
            assert free[address] >= share
            backend._hold(address, spec)
    for worker, held in backend._held.items():
        assert sum(r["GPU"] for _, r in held.values()) <= backend._workers[worker]["GPU"]


@settings(max_examples=50, deadline=None)
@given(workers=st.integers(1, 6), replicas=st.integers(0, 20))
def test_replicas_of_a_deployment_spread_evenly_when_resources_allow(
    workers: int, replicas: int
) -> None:
    backend = _backend([1.0] * workers)
    for index in range(replicas):
        spec = _spec("d", index, {})
        address, _ = backend._place(spec)
        assert address is not None
        backend._hold(address, spec)
    counts = [len(backend._held.get(w, {})) for w in backend._workers]
    assert max(counts) - min(counts) <= 1


def test_half_shares_pack_two_per_gpu() -> None:
    backend = _backend([1.0, 1.0])
    for index in range(4):
        spec = _spec("half", index, {"GPU": 0.5})
        address, _ = backend._place(spec)
        assert address is not None
        backend._hold(address, spec)
    assert sorted(len(h) for h in backend._held.values()) == [2, 2]
    address, reason = backend._place(_spec("half", 4, {"GPU": 0.5}))
    assert address is None
    assert "GPU=0.5" in reason and "most free on any worker is 0" in reason
