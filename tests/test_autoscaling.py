"""Autoscaling decisions on simulated time, and one real scale-up and scale-down."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embserve
from embserve.autoscaling import Autoscaler, AutoscalingPolicy
from tests.waiting import wait_until

POLICY = AutoscalingPolicy(
    min_replicas=1,
    max_replicas=5,
    target_ongoing_requests=2,
    upscale_delay_s=3,
    downscale_delay_s=10,
    metrics_interval_s=1,
    look_back_period_s=2,
)


def run(autoscaler: Autoscaler, loads: list[float], start: int) -> list[int]:
    """Feed one load sample a second; return the replica count after each."""
    current, counts = start, []
    for second, load in enumerate(loads):
        autoscaler.observe(float(second), load)
        current = autoscaler.decide(float(second), current)
        counts.append(current)
    return counts


def test_scales_up_only_after_the_upscale_delay() -> None:
    counts = run(Autoscaler(POLICY), [8.0] * 6, start=1)
    assert counts[:3] == [1, 1, 1]
    assert counts[3] == 4  # 8 requests / 2 per replica, once the wish held 3 s


def test_scales_down_only_after_the_downscale_delay() -> None:
    counts = run(Autoscaler(POLICY), [0.0] * 12, start=4)
    assert counts[:10] == [4] * 10
    assert counts[10] == 1


def test_a_short_burst_changes_nothing() -> None:
    loads = [2.0, 2.0, 9.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert set(run(Autoscaler(POLICY), loads, start=1)) == {1}


def test_scale_from_zero_is_immediate() -> None:
    policy = AutoscalingPolicy(min_replicas=0, max_replicas=3, upscale_delay_s=60)
    autoscaler = Autoscaler(policy)
    autoscaler.observe(0.0, 1.0)
    assert autoscaler.decide(0.0, 0) == 1


def test_policy_from_config_and_validation() -> None:
    policy = AutoscalingPolicy.from_config({"min_replicas": 2, "initial_replicas": 9})
    assert (policy.max_replicas, policy.start_replicas) == (2, 2)
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        embserve.deployment(autoscaling_config={"target_ongoing_requests": 0})


@given(
    loads=st.lists(st.floats(0, 40), min_size=1, max_size=80),
    start=st.integers(1, 5),
)
@settings(max_examples=100, deadline=None)
def test_bounds_and_delays_always_hold(loads: list[float], start: int) -> None:
    """Never outside [min, max]; never two changes closer than the shorter delay."""
    counts = run(Autoscaler(POLICY), loads, start=start)
    assert all(POLICY.min_replicas <= c <= POLICY.max_replicas for c in counts)
    changes = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    assert all(gap >= POLICY.upscale_delay_s for gap in gaps)


@given(load=st.floats(0, 40), start=st.integers(1, 5))
@settings(max_examples=50, deadline=None)
def test_constant_load_settles_and_stays(load: float, start: int) -> None:
    """No oscillation: under a constant load the count changes at most once."""
    counts = run(Autoscaler(POLICY), [load] * 60, start=start)
    changes = sum(counts[i] != counts[i - 1] for i in range(1, len(counts)))
    assert changes <= 1
    assert counts[-1] == min(max(int(-(-load // 2)), 1), 5)


def test_a_runtime_scales_a_deployment_up_and_down() -> None:
    release = asyncio.Event()

    @embserve.deployment(
        max_ongoing_requests=2,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 0,
            "downscale_delay_s": 0.05,
            "metrics_interval_s": 0.01,
            "look_back_period_s": 0.03,
        },
    )
    async def held() -> str:
        await release.wait()
        return "done"

    def running(rt: embserve.Runtime) -> int:
        return rt.status().deployments["held"].running_replicas

    with embserve.Runtime() as rt:
        handle = rt.run(held.bind())
        assert running(rt) == 1
        responses = [handle.remote() for _ in range(6)]
        wait_until(lambda: running(rt) == 3)
        assert rt.loop is not None
        rt.loop.call_soon_threadsafe(release.set)
        assert [r.result(timeout_s=10) for r in responses] == ["done"] * 6
        wait_until(lambda: running(rt) == 1)
