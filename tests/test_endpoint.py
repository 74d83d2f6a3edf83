"""Traffic policies: weighted splits, shadow copies, atomic changes."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embserve
from embserve._endpoint import Endpoint


@given(
    weights=st.dictionaries(
        st.sampled_from(["a", "b", "c", "d"]), st.floats(0, 10), min_size=1
    ).filter(lambda w: sum(w.values()) > 0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=50, deadline=None)
def test_picks_follow_the_weights(weights: dict[str, float], seed: int) -> None:
    endpoint = Endpoint("e", None, weights, rng=random.Random(seed))
    draws = 4000
    counts = Counter(endpoint.pick() for _ in range(draws))
    total = sum(weights.values())
    for name, weight in weights.items():
        share = weight / total
        if share == 0:
            assert counts[name] == 0
        else:
            # five standard deviations of a binomial, plus a few draws for shares so small that
            # the normal approximation fails: never flaky, still catches a wrong split
            tolerance = 5 * (share * (1 - share) / draws) ** 0.5 + 5 / draws
            assert abs(counts[name] / draws - share) <= tolerance, (name, counts)


def test_shadow_shares_are_probabilities() -> None:
    endpoint = Endpoint("e", None, {"a": 1}, {"s": 0.25, "never": 0}, rng=random.Random(3))
    copies = Counter(name for _ in range(4000) for name in endpoint.shadow_targets())
    assert set(copies) == {"s"}
    assert 800 < copies["s"] < 1200


@pytest.mark.parametrize(
    ("traffic", "shadow", "error"),
    [
        ({}, {}, ValueError),
        ({"a": 0}, {}, ValueError),
        ({"a": -1}, {}, ValueError),
        ({"a": "1"}, {}, TypeError),
        ({"a": 1}, {"s": 1.5}, ValueError),
    ],
)
def test_bad_policies_are_refused(
    traffic: dict[str, float], shadow: dict[str, float], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Endpoint("e", None, traffic, shadow)


def test_set_traffic_splits_and_shadows_through_the_runtime() -> None:
    shadowed = threading.Semaphore(0)

    @embserve.deployment
    def v1(x: int) -> str:
        return "v1"

    @embserve.deployment
    def v2(x: int) -> str:
        return "v2"

    @embserve.deployment
    def v3(x: int) -> str:
        shadowed.release()
        return "v3"

    with embserve.Runtime(seed=7) as rt:
        handle = rt.run(v1.bind(), name="clf")
        rt.run(v2.bind(), name="clf-v2")
        rt.run(v3.bind(), name="clf-v3")
        rt.set_traffic("clf", {"clf": 0.5, "clf-v2": 0.5}, shadow={"clf-v3": 1.0})
        answers = Counter(handle.remote(i).result(timeout_s=5) for i in range(200))
        assert set(answers) == {"v1", "v2"}  # shadow results are discarded
        assert 60 < answers["v1"] < 140
        for _ in range(200):
            assert shadowed.acquire(timeout=5)
        assert rt.status().endpoints["clf"].shadow == {"clf-v3": 1.0}
        rt.set_traffic("clf", {"clf-v2": 1})
        assert {handle.remote(i).result(timeout_s=5) for i in range(20)} == {"v2"}
        with pytest.raises(KeyError, match="not running"):
            rt.set_traffic("clf", {"nope": 1})


@given(keys=st.lists(st.text(min_size=1, max_size=12), min_size=50, max_size=200, unique=True))
@settings(max_examples=30, deadline=None)
def test_a_routing_key_keeps_its_version_during_a_split(keys: list[str]) -> None:
    endpoint = Endpoint("clf", None, {"v1": 0.5, "v2": 0.5}, rng=random.Random(0))
    first = {key: endpoint.pick(key) for key in keys}
    assert all(endpoint.pick(key) == version for key, version in first.items() for _ in range(3))
    other = Endpoint("clf", None, {"v1": 0.5, "v2": 0.5}, rng=random.Random(1))
    assert all(other.pick(key) == version for key, version in first.items())  # any process
    assert set(first.values()) == {"v1", "v2"}  # keys are still split
