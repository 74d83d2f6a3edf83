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
    backend._set_workers({f"tcp://w{i}:1": {"GPU": g, "CPU": 4.0} for i, g in enumerate(gpus)})
    return backend


def _held(backend: Any) -> dict[str, int]:
    return {w: len(pool.allocations) for w, pool in backend._pools.items()}


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
        if address is None:
            # Nothing fits on any device of any worker: the pools' own arithmetic says so.
            assert all(p.shortage({"GPU": share}) for p in backend._pools.values())
            assert "GPU=" in reason
        else:
            allocation = backend._hold(address, spec)
            assert len(allocation.gpu_ids) == max(1, int(share))
    for pool in backend._pools.values():
        assert all(free >= 0 for free in pool.gpu_free().values())
        shares: dict[str, float] = {}
        for allocation in pool.allocations.values():
            for gpu_id, part in allocation.gpu_shares.items():
                shares[gpu_id] = shares.get(gpu_id, 0.0) + part
        assert all(total <= 1.0 + 1e-9 for total in shares.values())


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
    counts = list(_held(backend).values())
    assert max(counts) - min(counts) <= 1


def test_half_shares_pack_two_per_gpu() -> None:
    backend = _backend([1.0, 1.0])
    for index in range(4):
        spec = _spec("half", index, {"GPU": 0.5})
        address, _ = backend._place(spec)
        assert address is not None
        assert backend._hold(address, spec).gpu_ids == ("0",)
    assert sorted(_held(backend).values()) == [2, 2]
    address, reason = backend._place(_spec("half", 4, {"GPU": 0.5}))
    assert address is None
    assert "GPU=0.5" in reason and "most free on any worker is 0" in reason


def test_shares_on_a_worker_with_two_gpus_go_to_one_device_each() -> None:
    backend = _backend([2.0])
    devices = []
    for index in range(4):
        spec = _spec("half", index, {"GPU": 0.5})
        address, _ = backend._place(spec)
        assert address == "tcp://w0:1"
        devices.extend(backend._hold(address, spec).gpu_ids)
    assert sorted(devices) == ["0", "0", "1", "1"]
    backend._release("tcp://w0:1", "half#0")
    assert backend._place(_spec("half", 5, {"GPU": 0.5}))[0] == "tcp://w0:1"


def test_a_share_that_fits_in_total_but_on_no_device_waits_and_says_why() -> None:
    backend = _backend([2.0])
    for index in range(2):
        spec = _spec("big", index, {"GPU": 0.6})
        backend._hold("tcp://w0:1", spec)
    address, reason = backend._place(_spec("half", 0, {"GPU": 0.5}))
    assert address is None
    assert "GPU=0.5" in reason and "free per GPU: 0: 0.4, 1: 0.4" in reason
