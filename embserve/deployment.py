"""Deployments, their options, and applications (a deployment bound to constructor arguments)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, overload

from embserve.autoscaling import AutoscalingPolicy, canonical_autoscaling_config
from embserve.batching import batch_capacity

__all__ = ["Application", "Deployment", "DeploymentConfig", "deployment"]

ROUTERS = ("power_of_two", "round_robin", "consistent_hash")
AUTOSCALING_KEYS = frozenset(f.name for f in dataclasses.fields(AutoscalingPolicy))
DEFAULT_MAX_ONGOING_REQUESTS = 5


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
    """The validated options of a deployment. See :func:`deployment` for their meaning."""

    num_replicas: int = 1
    autoscaling_config: Mapping[str, float] | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 1000
    resources: Mapping[str, float] = dataclasses.field(default_factory=dict)
    user_config: Any = None
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0
    request_timeout_s: float | None = None
    max_retries: int = 0
    version: str | None = None
    router: str | type[Any] = "power_of_two"
    route_prefix: str | None = None
    # Set when the deployment is run, not a user option: the name of the application (the
    # endpoint it was run under) that the deployment belongs to, for get_replica_context().
    app_name: str = ""
    # Set by Deployment from its batched methods (max_batch_size x max_concurrent_batches), not
    # a user option: the replica must admit that many requests or its batches never fill.
    batch_capacity: int = 0

    def __post_init__(self) -> None:
        _check_int("num_replicas", self.num_replicas, minimum=0)
        if self.max_ongoing_requests is not None:
            _check_int("max_ongoing_requests", self.max_ongoing_requests, minimum=1)
        _check_int("max_queued_requests", self.max_queued_requests, minimum=-1)
        _check_int("max_retries", self.max_retries, minimum=0)
        _check_seconds("health_check_period_s", self.health_check_period_s)
        _check_seconds("health_check_timeout_s", self.health_check_timeout_s)
        _check_seconds("graceful_shutdown_timeout_s", self.graceful_shutdown_timeout_s, zero=True)
        if self.request_timeout_s is not None:
            _check_seconds("request_timeout_s", self.request_timeout_s)
        if not isinstance(self.resources, Mapping):
            raise TypeError(
                f"resources must be a mapping such as {{'GPU': 0.5}}, got {self.resources!r}"
            )
        for key, amount in self.resources.items():
            if not isinstance(key, str) or not _is_number(amount) or amount < 0:
                raise ValueError(
                    f"resources must map names to non-negative numbers, got {key!r}: {amount!r}"
                )
        if self.route_prefix is not None and (
            not isinstance(self.route_prefix, str) or not self.route_prefix.startswith("/")
        ):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if self.version is not None and not isinstance(self.version, str):
            raise TypeError(f"version must be a str, got {type(self.version).__name__}")
        if isinstance(self.router, type):
            from embserve.router import Router  # the router module imports this one

            if not issubclass(self.router, Router):
                raise TypeError(f"router must be a Router subclass, got {self.router!r}")
        elif self.router not in ROUTERS:
            raise ValueError(
                f"router must be one of {', '.join(ROUTERS)} or a Router subclass, "
                f"got {self.router!r}"
            )
        if self.autoscaling_config is not None:
            _check_autoscaling(self.autoscaling_config)
            AutoscalingPolicy.from_config(self.autoscaling_config)

    @property
    def ongoing_limit(self) -> int:
        """``max_ongoing_requests``, or its default when not given."""
        if self.max_ongoing_requests is None:
            # Twice the batch capacity: the next batches fill while the running ones compute.
            return max(DEFAULT_MAX_ONGOING_REQUESTS, 2 * self.batch_capacity)
        return self.max_ongoing_requests

    @property
    def initial_replicas(self) -> int:
        """How many replicas to start with."""
        auto = self.autoscaling_config
        if auto is None:
            return self.num_replicas
        return AutoscalingPolicy.from_config(auto).start_replicas


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_seconds(name: str, value: object, *, zero: bool = False) -> None:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    assert isinstance(value, (int, float))
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else '> 0'}, got {value}")


_POSITIVE_AUTOSCALING_KEYS = {
    "target_ongoing_requests",
    "metrics_interval_s",
    "look_back_period_s",
    "upscaling_factor",
    "downscaling_factor",
}


def _check_autoscaling(config: Mapping[str, float]) -> None:
    if not isinstance(config, Mapping):
        raise TypeError("autoscaling_config must be a mapping")
    unknown = set(config) - AUTOSCALING_KEYS
    if unknown:
        raise ValueError(
            f"autoscaling_config has unknown keys {sorted(unknown)}; "
            f"known: {sorted(AUTOSCALING_KEYS)}"
        )
    for key, value in config.items():
        if not _is_number(value) or value < 0:
            raise ValueError(f"autoscaling_config[{key!r}] must be a non-negative number")
        if value == 0 and key in _POSITIVE_AUTOSCALING_KEYS:
            raise ValueError(f"autoscaling_config[{key!r}] must be > 0")
    low = config.get("min_replicas", 1)
    high = config.get("max_replicas", max(low, 1))
    if low > high:
        raise ValueError(f"autoscaling_config: min_replicas {low} > max_replicas {high}")


_OPTION_NAMES = frozenset(
    f.name
    for f in dataclasses.fields(DeploymentConfig)
    if f.name not in {"batch_capacity", "app_name"}
) | {"name"}
# Ray Serve's names, translated by _from_ray_names into ours.
_RAY_OPTION_NAMES = frozenset({"ray_actor_options", "max_concurrent_queries"})
_RAY_ACTOR_OPTIONS = frozenset({"num_cpus", "num_gpus", "resources", "memory"})


def _from_ray_names(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with Ray Serve's option names replaced by embserve's (a copy)."""
    options = dict(options)
    if "max_concurrent_queries" in options:
        # Ray Serve renamed it to max_ongoing_requests and warns the same way.
        warnings.warn(
            "max_concurrent_queries is deprecated; use max_ongoing_requests",
            DeprecationWarning,
            stacklevel=3,
        )
        value = options.pop("max_concurrent_queries")
        if options.get("max_ongoing_requests") is not None:
            raise TypeError("give max_ongoing_requests or max_concurrent_queries, not both")
        options["max_ongoing_requests"] = value
    actor = options.pop("ray_actor_options", None)
    if actor is not None:
        if options.get("resources"):
            raise TypeError("give resources or ray_actor_options, not both")
        options["resources"] = _resources_of_actor_options(actor)
    if options.get("autoscaling_config") is not None:
        options["autoscaling_config"] = canonical_autoscaling_config(options["autoscaling_config"])
    return options


def _resources_of_actor_options(actor: Any) -> dict[str, float]:
    if not isinstance(actor, Mapping):
        raise TypeError(f"ray_actor_options must be a mapping, got {actor!r}")
    unknown = set(actor) - _RAY_ACTOR_OPTIONS
    if unknown:
        raise TypeError(
            f"ray_actor_options {sorted(unknown)} are not offered by embserve; "
            f"it maps {sorted(_RAY_ACTOR_OPTIONS)} onto resources"
        )
    resources = dict(actor.get("resources") or {})
    if actor.get("num_cpus"):
        resources["CPU"] = actor["num_cpus"]
    if actor.get("num_gpus"):
        resources["GPU"] = actor["num_gpus"]
    # "memory" is accepted and not reserved: no embserve backend accounts for memory (a Dask
    # cluster can declare a custom resource for it, asked for through "resources").
    return resources


class Deployment:
    """A function or class plus the options its replicas run with.

    Made by :func:`deployment`; copied with changes by :meth:`options`; bound to constructor
    arguments by :meth:`bind`, which gives the :class:`Application` that a runtime runs.
    """

    def __init__(self, target: Callable[..., Any], name: str, config: DeploymentConfig) -> None:
        capacity, why = batch_capacity(target)
        given = config.max_ongoing_requests
        if given is not None and given < capacity:
            raise ValueError(
                f"deployment {name!r}: max_ongoing_requests={given} is smaller than "
                f"{capacity}, but {why}, so a replica must admit at least {capacity} requests "
                f"for a batch to fill; raise max_ongoing_requests to >= {capacity} or leave it "
                "unset, or lower max_batch_size"
            )
        if config.batch_capacity != capacity:
            config = dataclasses.replace(config, batch_capacity=capacity)
        self.target = target
        self.name = name
        self.config = config

    @property
    def is_class(self) -> bool:
        """Whether the deployment wraps a class (one instance per replica) or a function."""
        return inspect.isclass(self.target)

    def options(self, **changes: Any) -> Deployment:
        """A copy of this deployment with some options changed; options are validated here."""
        _check_option_names(changes)
        changes = _from_ray_names(changes)
        name = changes.pop("name", self.name)
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty str")
        if "num_replicas" in changes and changes["num_replicas"] is not None:
            changes.setdefault("autoscaling_config", None)
        return Deployment(self.target, name, dataclasses.replace(self.config, **changes))

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Bind constructor arguments; bound deployments among them arrive as handles."""
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"deployment {self.name!r} cannot be called directly: use "
            f"{self.name}.bind(...) and call it through the handle that Runtime.run returns"
        )

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r})"


def _check_option_names(options: Mapping[str, Any]) -> None:
    unknown = set(options) - _OPTION_NAMES - _RAY_OPTION_NAMES
    if unknown:
        raise TypeError(
            f"unknown deployment option(s) {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}"
        )


class Application:
    """A deployment bound to its constructor arguments: what :meth:`Runtime.run` takes."""

    def __init__(
        self, deployment: Deployment, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        self.deployment = deployment
        self.args = args
        self.kwargs = dict(kwargs)

    @property
    def name(self) -> str:
        """The name of the bound deployment."""
        return self.deployment.name

    def walk(self) -> Iterator[Application]:
        """This application's bound dependencies, depth first, then itself."""
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Application):
                yield from value.walk()
        yield self

    def __repr__(self) -> str:
        return f"Application({self.deployment.name!r})"


_T = TypeVar("_T", bound=Callable[..., Any])


@overload
def deployment(_target: _T, /) -> Deployment: ...


@overload
def deployment(
    _target: None = None, /, *, name: str | None = None, **options: Any
) -> Callable[[Callable[..., Any]], Deployment]: ...


def deployment(
    _target: Callable[..., Any] | None = None, /, *, name: str | None = None, **options: Any
) -> Deployment | Callable[[Callable[..., Any]], Deployment]:
    """Turn a function or class into a :class:`Deployment`.

    Use bare (``@embserve.deployment``) or with options (``@embserve.deployment(num_replicas=2)``).
    Options, validated here (a bad one raises ``TypeError`` or ``ValueError`` naming it):

    - ``name``: defaults to the function's or class's name.
    - ``num_replicas`` (default 1) or ``autoscaling_config`` (Ray Serve's keys).
    - ``max_ongoing_requests``: requests one replica runs at once (default 5), strictly enforced.
    - ``max_queued_requests``: requests waiting for a free replica before callers get
      :class:`~embserve.BackPressureError` (default 1000; -1 for no bound).
    - ``resources``: e.g. ``{"CPU": 1, "GPU": 0.5}``, placed by the backend.
    - ``user_config``: passed to the replica's ``reconfigure(config)`` at start and on change.
    - ``health_check_period_s``, ``health_check_timeout_s``: how often ``check_health()`` runs
      and how long it may take before the replica is replaced.
    - ``graceful_shutdown_timeout_s``: how long a stopping replica may finish in-flight requests.
    - ``request_timeout_s``: end-to-end bound of one request, queueing included.
    - ``max_retries``: times a request that started on a replica that died is retried
      (for idempotent work; requests that had not started are always retried).
    - ``version``: replicas of the same version are reconfigured in place, not replaced.
    - ``router``: ``"power_of_two"`` (default), ``"round_robin"``, ``"consistent_hash"``
      (calls with the same ``handle.options(routing_key=...)`` stay on one replica), or a
      :class:`~embserve.router.Router` subclass of your own.
    - ``route_prefix``: the HTTP route :func:`embserve.run` and :meth:`Runtime.run
      <embserve.Runtime.run>` serve it at when they are given none.

    Ray Serve's names are accepted too: ``ray_actor_options`` (``num_cpus``, ``num_gpus`` and
    ``resources`` become ``resources``; ``memory`` is accepted and not reserved) and
    ``max_concurrent_queries`` (``max_ongoing_requests``, with a ``DeprecationWarning``).
    """
    _check_option_names(options)
    config = DeploymentConfig(**_from_ray_names(options))

    def wrap(target: Callable[..., Any]) -> Deployment:
        if isinstance(target, Deployment):
            raise TypeError("@deployment applied twice; use .options(...) to change options")
        if not callable(target):
            raise TypeError(f"@deployment needs a function or class, got {target!r}")
        dep_name = name if name is not None else getattr(target, "__name__", None)
        if not isinstance(dep_name, str) or not dep_name:
            raise TypeError("name must be a non-empty str")
        return Deployment(target, dep_name, config)

    if _target is not None:
        return wrap(_target)
    return wrap
