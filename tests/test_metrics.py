"""Metrics: every family after traffic, outcomes counted right, replica-side figures, and two
runtimes that never mix."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import embserve
from embserve.metrics import DURATION_BUCKETS, PENDING_MAX, Histogram

FAMILIES = {
    "embserve_requests",
    "embserve_request_duration_seconds",
    "embserve_queue_wait_seconds",
    "embserve_execution_seconds",
    "embserve_ongoing_requests",
    "embserve_queued_requests",
    "embserve_replicas",
    "embserve_batch_size",
    "embserve_shadow_requests",
    "embserve_replica_restarts",
    "embserve_model_loads",
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition: (name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


gates: dict[str, asyncio.Event] = {}


def open_gate(rt: embserve.Runtime, name: str) -> None:
    assert rt.loop is not None
    rt.loop.call_soon_threadsafe(gates[name].set)


@embserve.deployment(max_ongoing_requests=4, max_queued_requests=1, request_timeout_s=5)
class Metered:
    def __init__(self) -> None:
        self.name = embserve.get_replica_context().deployment
        gates[self.name] = asyncio.Event()

    async def __call__(self, how: str) -> str:
        if how == "fail":
            raise ValueError("no")
        if how == "hold":
            await gates[self.name].wait()
        return how

    @embserve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def batched(self, items: list[int]) -> list[int]:
        return items

    @embserve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        return model_id

    async def model(self) -> str:
        return str(await self.get_model(embserve.get_multiplexed_model_id()))


def test_every_family_is_there_after_traffic_and_outcomes_are_counted() -> None:
    with embserve.Runtime() as rt:
        handle = rt.run(Metered.options(max_ongoing_requests=4, max_queued_requests=0).bind())
        assert handle.remote("ok").result(timeout_s=5) == "ok"
        with pytest.raises(ValueError):
            handle.remote("fail").result(timeout_s=5)
        held = [handle.remote("hold") for _ in range(4)]
        with pytest.raises(embserve.BackPressureError):
            handle.remote("ok").result(timeout_s=5)  # every slot held, no queue: rejected
        open_gate(rt, "Metered")
        for response in held:
            assert response.result(timeout_s=5) == "hold"
        batched = [handle.batched.remote(i) for i in range(4)]
        assert [r.result(timeout_s=5) for r in batched] == [0, 1, 2, 3]
        for model_id in ("a", "b", "a"):
            assert handle.options(multiplexed_model_id=model_id).model.remote().result(5)
        text = rt.metrics()
    found = samples(text)
    names = {family.name for family in text_string_to_metric_families(text)}
    assert names >= FAMILIES, FAMILIES - names
    assert value(found, "embserve_requests_total", deployment="Metered", outcome="error") == 1
    assert value(found, "embserve_requests_total", deployment="Metered", outcome="rejected") >= 1
    ok = value(found, "embserve_requests_total", deployment="Metered", outcome="ok")
    assert ok == 1 + 4 + 4 + 3
    replica = "Metered#0"
    batch = (
        "embserve_batch_size_sum",
        dict(deployment="Metered", replica=replica, method="batched"),
    )
    assert value(found, batch[0], **batch[1]) == 4
    assert value(found, "embserve_model_loads_total", deployment="Metered", replica=replica) == 2
    calls = value(
        found,
        "embserve_execution_seconds_count",
        deployment="Metered",
        replica=replica,
        method="__call__",
    )
    assert calls == 6  # ok, fail, 4 held
    assert value(found, "embserve_replicas", deployment="Metered", state="RUNNING") == 1


def test_timeouts_and_cancellations_have_their_outcomes() -> None:
    with embserve.Runtime() as rt:
        handle = rt.run(Metered.options(request_timeout_s=0.05).bind())
        with pytest.raises(embserve.RequestTimeoutError):
            handle.remote("hold").result(timeout_s=5)
        rt.run(Metered.options(name="cancelled", request_timeout_s=None).bind())
        other = rt.get_handle("cancelled")
        response = other.remote("hold")
        assert other.remote("ok").result(timeout_s=5) == "ok"  # the first one is running
        response.cancel()
        open_gate(rt, "Metered")
        found = samples(rt.metrics())
    assert value(found, "embserve_requests_total", deployment="Metered", outcome="timeout") == 1
    cancelled = value(found, "embserve_requests_total", deployment="cancelled", outcome="cancelled")
    assert cancelled == 1


def test_two_runtimes_metrics_never_mix() -> None:
    @embserve.deployment
    def alone(x: int) -> int:
        return x

    with embserve.Runtime() as one, embserve.Runtime() as two:
        one.run(alone.bind(), name="one")
        two.run(alone.bind(), name="two")
        for _ in range(3):
            one.get_handle("one").remote(1).result(timeout_s=5)
        first, second = samples(one.metrics()), samples(two.metrics())
    assert value(first, "embserve_requests_total", deployment="one", outcome="ok") == 3
    assert ("embserve_requests_total", (("deployment", "one"), ("outcome", "ok"))) not in second
    assert value(second, "embserve_requests_total", deployment="two", outcome="ok") == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([*DURATION_BUCKETS, 0.0]),  # on a bound: in that bound's bucket
            st.floats(min_value=0, max_value=100, allow_nan=False),
        ),
        max_size=PENDING_MAX * 2,
    )
)
def test_a_histogram_puts_each_observation_in_the_bucket_of_the_first_bound_it_is_under(
    values: list[float],
) -> None:
    histogram = Histogram()
    for value in values:
        histogram.observe(value)  # flushed along the way once PENDING_MAX are pending
    expected = [0] * (len(DURATION_BUCKETS) + 1)
    for value in values:
        index = next((i for i, b in enumerate(DURATION_BUCKETS) if value <= b), -1)
        expected[index] += 1
    assert histogram.counts == expected
    assert histogram.count == len(values)
    assert histogram.sum == pytest.approx(math.fsum(values))
