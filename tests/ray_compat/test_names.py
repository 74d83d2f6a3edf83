"""Ray Serve's option and type names are accepted and mean what they mean there."""

from __future__ import annotations

import pytest

import embserve
from embserve.autoscaling import Autoscaler, AutoscalingPolicy
from embserve.handle import (
    DeploymentHandle,
    DeploymentResponse,
    DeploymentResponseGenerator,
    Handle,
    Response,
    ResponseStream,
)


def test_handle_and_response_types_have_ray_serves_names() -> None:
    assert DeploymentHandle is Handle
    assert DeploymentResponse is Response
    assert DeploymentResponseGenerator is ResponseStream


def test_ray_actor_options_become_resources() -> None:
    @embserve.deployment(
        ray_actor_options={"num_cpus": 2, "num_gpus": 0.5, "resources": {"tpu": 1}, "memory": 1e9}
    )
    def model(x: int) -> int:
        return x

    assert dict(model.config.resources) == {"CPU": 2, "GPU": 0.5, "tpu": 1}
    assert dict(model.options(ray_actor_options={"num_cpus": 1}).config.resources) == {"CPU": 1}
    with pytest.raises(TypeError, match="runtime_env"):
        model.options(ray_actor_options={"runtime_env": {}})
    with pytest.raises(TypeError, match="not both"):
        model.options(ray_actor_options={"num_cpus": 1}, resources={"CPU": 1})


def test_max_concurrent_queries_is_max_ongoing_requests_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="max_ongoing_requests"):

        @embserve.deployment(max_concurrent_queries=7)
        def model(x: int) -> int:
            return x

    assert model.config.max_ongoing_requests == 7
    with pytest.warns(DeprecationWarning):
        assert model.options(max_concurrent_queries=3).config.max_ongoing_requests == 3


def test_route_prefix_on_the_decorator_is_used_when_run_gives_none() -> None:
    @embserve.deployment(route_prefix="/hello")
    def hello() -> str:
        return "hi"

    with pytest.raises(ValueError, match="route_prefix"):
        hello.options(route_prefix="hello")
    with embserve.Runtime() as rt:
        rt.run(hello.bind())
        assert rt.routes() == {"/hello": "hello"}


def test_rays_autoscaling_keys_are_mapped_or_accepted() -> None:
    config = {
        "min_replicas": 1,
        "max_replicas": 10,
        "target_num_ongoing_requests_per_replica": 4,
        "smoothing_factor": 0.5,
        "downscaling_factor": 0.25,
        "metrics_interval_s": 2,
        "aggregation_function": "mean",
    }
    with pytest.warns(DeprecationWarning, match="target_ongoing_requests"):

        @embserve.deployment(autoscaling_config=config)
        def model(x: int) -> int:
            return x

    policy = AutoscalingPolicy.from_config(model.config.autoscaling_config or {})
    assert policy.target_ongoing_requests == 4
    assert (policy.upscaling_factor, policy.downscaling_factor) == (0.5, 0.25)
    assert policy.metrics_interval_s == 2


def test_scaling_factors_move_part_of_the_way_at_each_decision() -> None:
    policy = AutoscalingPolicy(
        min_replicas=1,
        max_replicas=20,
        target_ongoing_requests=1,
        upscaling_factor=0.5,
        downscaling_factor=0.5,
        upscale_delay_s=0,
        downscale_delay_s=0,
    )
    scaler = Autoscaler(policy)
    scaler.observe(0.0, 10.0)  # wants 10 from 2: half-way is 6
    assert scaler.decide(0.0, 2) == 6
    scaler.observe(1.0, 2.0)  # wants 2 from 6: half-way is 4
    assert scaler.decide(1.0, 6) == 4
    scaler.observe(2.0, 3.0)  # wants 3 from 4: a step of at least one
    assert scaler.decide(2.0, 4) == 3


def test_handle_options_accepts_use_new_handle_api() -> None:
    handle = Handle("rt", "model")
    assert handle.options(use_new_handle_api=True) == handle


def test_replica_context_has_rays_names() -> None:
    @embserve.deployment
    class Where:
        def __call__(self) -> tuple[str, str, str, str]:
            context = embserve.get_replica_context()
            return context.app_name, context.deployment, context.replica_tag, context.replica_id

    @embserve.deployment
    class Front:
        def __init__(self, where: embserve.Handle) -> None:
            self.where = where

        async def __call__(self) -> tuple[str, str, str, str]:
            result: tuple[str, str, str, str] = await self.where.remote()
            return result

    with embserve.Runtime() as rt:
        app, deployment, tag, replica_id = (
            rt.run(Front.bind(Where.bind()), name="shop").remote().result(timeout_s=5)
        )
    assert (app, deployment) == ("shop", "Where")
    assert tag == replica_id
