"""Deployment options are validated when the decorator runs; bind builds applications."""

from __future__ import annotations

from typing import Any

import pytest

import embserve
from embserve.deployment import DEFAULT_MAX_ONGOING_REQUESTS


@embserve.deployment
class Plain:
    def __call__(self, x: int) -> int:
        return x


@embserve.deployment(num_replicas=3, max_ongoing_requests=2, resources={"GPU": 0.5})
def scaled(x: int) -> int:
    return x


def test_bare_decorator_uses_defaults() -> None:
    assert Plain.name == "Plain"
    assert Plain.is_class
    assert Plain.config.num_replicas == 1
    assert Plain.config.ongoing_limit == DEFAULT_MAX_ONGOING_REQUESTS


def test_decorator_with_options() -> None:
    assert scaled.name == "scaled"
    assert not scaled.is_class
    assert scaled.config.num_replicas == 3
    assert scaled.config.ongoing_limit == 2
    assert scaled.config.resources == {"GPU": 0.5}


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"num_replicas": -1}, ValueError, "num_replicas"),
        ({"num_replicas": 1.5}, TypeError, "num_replicas"),
        ({"max_ongoing_requests": 0}, ValueError, "max_ongoing_requests"),
        ({"max_queued_requests": -2}, ValueError, "max_queued_requests"),
        ({"request_timeout_s": 0}, ValueError, "request_timeout_s"),
        ({"request_timeout_s": "1"}, TypeError, "request_timeout_s"),
        ({"health_check_period_s": -1}, ValueError, "health_check_period_s"),
        ({"graceful_shutdown_timeout_s": float("nan")}, TypeError, "graceful_shutdown_timeout_s"),
        ({"resources": {"GPU": -1}}, ValueError, "resources"),
        ({"resources": ["GPU"]}, TypeError, "resources"),
        ({"router": "random"}, ValueError, "router"),
        ({"version": 3}, TypeError, "version"),
        (
            {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}},
            ValueError,
            "min_replicas",
        ),
        ({"autoscaling_config": {"bogus": 1}}, ValueError, "bogus"),
        ({"num_replica": 2}, TypeError, "num_replica"),
    ],
)
def test_bad_options_fail_when_the_decorator_runs(
    options: dict[str, Any], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=names):
        embserve.deployment(**options)


def test_options_copies_with_changes_and_validates() -> None:
    changed = Plain.options(num_replicas=2, name="Other")
    assert (changed.name, changed.config.num_replicas) == ("Other", 2)
    assert (Plain.name, Plain.config.num_replicas) == ("Plain", 1)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        Plain.options(max_ongoing_requests=0)
    with pytest.raises(TypeError, match="unknown"):
        Plain.options(replicas=2)


def test_bind_walks_dependencies_first() -> None:
    child = scaled.bind()
    app = Plain.bind(child, key=Plain.options(name="Third").bind())
    assert [node.name for node in app.walk()] == ["scaled", "Third", "Plain"]


def test_deployment_is_not_callable_directly() -> None:
    with pytest.raises(TypeError, match="bind"):
        Plain(1)


def test_decorating_twice_is_an_error() -> None:
    with pytest.raises(TypeError, match="options"):
        embserve.deployment(Plain)


def test_autoscaling_config_sets_initial_replicas() -> None:
    auto = embserve.deployment(autoscaling_config={"min_replicas": 2, "max_replicas": 4})(
        Plain.target
    )
    assert auto.config.initial_replicas == 2
