"""Capacity accounting of the local backends: placement, shortages, waiting, GPU detection."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embserve
from embserve.local import LocalBackend
from embserve.resources import Allocation, ResourcePool, acquire, default_capacity, detect_gpus
from tests.waiting import wait_for

T = TypeVar("T")

# -- placement ------------------------------------------------------------------------------


def test_four_halves_pack_two_per_gpu_and_a_fifth_waits_with_its_reason() -> None:
    pool = ResourcePool({"CPU": 8, "GPU": 2})
    placed = [pool.try_acquire(f"r{i}", {"GPU": 0.5}) for i in range(4)]
    assert [a.gpu_ids for a in placed if a] == [("0",), ("0",), ("1",), ("1",)]
    assert pool.try_acquire("r4", {"GPU": 0.5}) is None
    reason = pool.shortage({"GPU": 0.5})
    assert reason is not None and reason.startswith("GPU:")
    assert pool.gpu_free() == {"0": 0.0, "1": 0.0}
    pool.release("r2")
    fifth = pool.try_acquire("r4", {"GPU": 0.5})
    assert fifth is not None and fifth.gpu_ids == ("1",)


def test_a_share_that_does_not_fit_beside_another_takes_another_gpu() -> None:
    pool = ResourcePool({"GPU": 2})
    first = pool.try_acquire("a", {"GPU": 0.6})
    second = pool.try_acquire("b", {"GPU": 0.5})
    assert first is not None and second is not None
    assert first.gpu_ids != second.gpu_ids
    # Best fit: a 0.4 fills the GPU with 0.4 free rather than the one with 0.5 free.
    third = pool.try_acquire("c", {"GPU": 0.4})
    assert third is not None and third.gpu_ids == first.gpu_ids


def test_whole_gpus_are_not_shared() -> None:
    pool = ResourcePool({"GPU": 2})
    half = pool.try_acquire("half", {"GPU": 0.5})
    assert half is not None
    assert pool.try_acquire("two", {"GPU": 2}) is None
    one = pool.try_acquire("one", {"GPU": 1})
    assert one is not None and one.gpu_ids == ("1",) and one.gpu_shares == {"1": 1.0}
    assert pool.try_acquire("more", {"GPU": 0.5}) is not None  # beside "half" on GPU 0
    assert pool.try_acquire("full", {"GPU": 0.1}) is None


def test_ten_tenths_fill_exactly_one_gpu() -> None:
    pool = ResourcePool({"GPU": 1})
    assert all(pool.try_acquire(f"r{i}", {"GPU": 0.1}) for i in range(10))
    assert pool.try_acquire("r10", {"GPU": 0.1}) is None
    assert pool.gpu_free() == {"0": 0.0}


def test_cpu_and_custom_resources_are_counted_and_named_when_short() -> None:
    pool = ResourcePool({"CPU": 2, "GPU": 0, "disk": 3})
    assert pool.try_acquire("a", {"CPU": 1.5, "disk": 2}) is not None
    assert pool.shortage({"CPU": 1}) == "CPU: asks 1, 0.5 of 2 free"
    assert pool.shortage({"disk": 2}) == "disk: asks 2, 1 of 3 free"
    assert pool.shortage({"CPU": 0.5, "disk": 1}) is None
    assert pool.free() == {"CPU": 0.5, "disk": 1.0, "GPU": 0.0}
    pool.release("a")
    assert pool.free() == {"CPU": 2.0, "disk": 3.0, "GPU": 0.0}


@pytest.mark.parametrize(
    ("demand", "words"),
    [
        ({"GPU": 3}, "GPU: asks 3, the capacity has 2"),
        ({"GPU": 1.5}, "neither a share"),
        ({"TPU": 1}, "TPU: asks 1, the capacity has 0"),
        ({"CPU": 5}, "CPU: asks 5, the capacity has 4"),
    ],
)
def test_demands_that_can_never_fit_say_why(demand: dict[str, float], words: str) -> None:
    pool = ResourcePool({"CPU": 4, "GPU": 2})
    reason = pool.never_fits(demand)
    assert reason is not None and words in reason


def test_an_owner_holds_one_allocation_and_release_is_idempotent() -> None:
    pool = ResourcePool({"CPU": 2})
    assert pool.try_acquire("a", {"CPU": 1}) is not None
    with pytest.raises(ValueError, match="already holds"):
        pool.try_acquire("a", {"CPU": 1})
    assert pool.release("a") is not None
    assert pool.release("a") is None
    assert pool.free()["CPU"] == 2.0


def test_bad_capacities_are_refused() -> None:
    with pytest.raises(ValueError, match="number of devices"):
        ResourcePool({"GPU": 1.5})
    with pytest.raises(ValueError, match=">= 0"):
        ResourcePool({"CPU": -1})
    with pytest.raises(ValueError, match="gpu_ids"):
        ResourcePool({"GPU": 2}, gpu_ids=["0"])


def ignore(reason: str) -> None:
    """A notify callback for tests that do not read reasons."""


# -- waiting --------------------------------------------------------------------------------


def test_waiters_are_granted_on_release_and_told_why_they_still_wait() -> None:
    pool = ResourcePool({"GPU": 1, "CPU": 4})
    assert pool.try_acquire("a", {"GPU": 1}) is not None
    granted: list[Allocation] = []
    told: list[str] = []
    pool.wait("b", {"GPU": 0.5}, group="dep", grant=granted.append, notify=told.append)
    assert not granted and told and told[-1].startswith("GPU:")
    assert pool.waiting() == {"dep": told[-1]}
    pool.release("a")
    assert [g.owner for g in granted] == ["b"]
    assert pool.waiting() == {}


def test_a_small_waiter_may_pass_a_big_one_that_does_not_fit() -> None:
    pool = ResourcePool({"GPU": 2})
    assert pool.try_acquire("x", {"GPU": 1}) is not None
    assert pool.try_acquire("y", {"GPU": 1}) is not None
    granted: list[str] = []
    pool.wait(
        "big", {"GPU": 2}, group="big", grant=lambda a: granted.append(a.owner), notify=ignore
    )
    pool.wait(
        "small", {"GPU": 0.5}, group="s", grant=lambda a: granted.append(a.owner), notify=ignore
    )
    pool.release("x")
    assert granted == ["small"]
    assert pool.cancel("big") and not pool.cancel("big")


def test_acquire_waits_with_a_pending_reason_and_cleans_up_on_cancel() -> None:
    async def scenario() -> None:
        pool = ResourcePool({"GPU": 1})
        pending: dict[str, str] = {}
        first = await acquire(pool, "a", {"GPU": 1}, group="d", pending=pending)
        assert first.gpu_ids == ("0",) and pending == {}
        waiting = asyncio.ensure_future(acquire(pool, "b", {"GPU": 1}, group="d", pending=pending))
        cancelled = asyncio.ensure_future(
            acquire(pool, "c", {"GPU": 0.5}, group="e", pending=pending)
        )
        await asyncio.sleep(0)  # let both queue: an event-loop turn, not a wait for time
        assert pending["d"].startswith("waiting for resources: GPU")
        assert "e" in pending
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert "e" not in pending
        pool.release("a")
        second = await waiting
        assert second.owner == "b" and pending == {}
        assert set(pool.allocations) == {"b"}
        with pytest.raises(embserve.DeploymentFailedError, match="GPU: asks 2"):
            await acquire(pool, "z", {"GPU": 2}, group="z", pending=pending)

    asyncio.run(scenario())


_demands = st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.6, 1.0, 2.0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _demands, st.integers(0, 7)), max_size=40))
def test_gpu_shares_never_overflow_and_no_fitting_waiter_is_left(
    steps: list[tuple[bool, float, int]],
) -> None:
    pool = ResourcePool({"GPU": 3})
    held: dict[str, Allocation] = {}
    waiting: dict[str, float] = {}
    for index, (take, amount, victim) in enumerate(steps):
        if take or not held:
            owner = f"r{index}"
            pool.wait(
                owner,
                {"GPU": amount},
                group=owner,
                grant=lambda a: held.__setitem__(a.owner, a),
                notify=ignore,
            )
            if owner not in held:
                waiting[owner] = amount
        else:
            owner = sorted(held)[victim % len(held)]
            pool.release(owner)
            del held[owner]
        waiting = {o: a for o, a in waiting.items() if o not in held}
        use = dict.fromkeys(pool.gpu_ids, 0.0)
        for allocation in held.values():
            demand = allocation.demand["GPU"]
            assert len(allocation.gpu_ids) == max(1, int(demand))
            for gpu_id, share in allocation.gpu_shares.items():
                use[gpu_id] += share
                assert share == (1.0 if demand >= 1 else demand)
        for gpu_id, used in use.items():
            assert used <= 1.0 + 1e-9
            assert abs(pool.gpu_free()[gpu_id] - (1.0 - used)) < 1e-9
        for amount in waiting.values():
            assert pool.shortage({"GPU": amount}) is not None


# -- detection ------------------------------------------------------------------------------


@pytest.fixture
def fresh_detection() -> Iterator[None]:
    detect_gpus.cache_clear()
    yield
    detect_gpus.cache_clear()


def test_gpus_come_from_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, fresh_detection: None
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,-1,4")
    assert detect_gpus() == ("2", "3")
    assert default_capacity() == {"CPU": float(os.cpu_count() or 1), "GPU": 2.0}
    pool = ResourcePool({"GPU": 2})
    assert pool.gpu_ids == ("2", "3")


def test_gpus_come_from_nvidia_smi_when_nothing_is_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_detection: None
) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho 'GPU 0: Fake A (UUID: GPU-1)'\necho 'GPU 1: Fake B (UUID: GPU-2)'\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus() == ("0", "1")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    detect_gpus.cache_clear()
    assert detect_gpus() == ()


# -- the local backend ----------------------------------------------------------------------


@embserve.deployment(num_replicas=4, resources={"GPU": 0.5})
def where() -> tuple[str, tuple[str, ...]]:
    """The replica's id and the GPUs its context says it holds."""
    context = embserve.get_replica_context()
    return context.replica_id, context.gpu_ids


def test_local_backend_places_fractional_gpus_and_a_pending_deployment_starts_later() -> None:
    with embserve.Runtime(backend=LocalBackend(resources={"CPU": 4, "GPU": 2})) as rt:
        handle = rt.run(where.bind(), name="where")
        seen: dict[str, tuple[str, ...]] = {}
        deadline = 200
        while len(seen) < 4 and deadline:
            replica_id, gpus = handle.remote().result(timeout_s=5)
            seen[replica_id] = gpus
            deadline -= 1
        assert sorted(seen.values()) == [("0",), ("0",), ("1",), ("1",)]
        late = rt.run(where.options(num_replicas=1).bind(), name="late", wait=False)
        message = wait_for(lambda: rt.status().deployments["late"].message, timeout_s=10)
        assert message.startswith("waiting for resources: GPU")
        assert rt.status().deployments["late"].running_replicas == 0
        rt.delete("where")
        assert late.remote().result(timeout_s=10)[1] in (("0",), ("1",))
        assert rt.status().deployments["late"].message == ""


def test_local_backend_fails_a_deployment_that_can_never_fit() -> None:
    backend = LocalBackend(resources={"CPU": 1})
    with (
        embserve.Runtime(backend=backend) as rt,
        pytest.raises(embserve.DeploymentFailedError, match="CPU: asks 2"),
    ):
        rt.run(where.options(num_replicas=1, resources={"CPU": 2}).bind())
