"""Autoscaling: how many replicas a deployment wants, from the requests it holds over time.

The decision is an event-fed state machine with no clock of its own: the controller feeds it
samples with the time they were taken (``observe``) and asks for a decision (``decide``), so its
tests run on simulated time. It scales on the mean load over ``look_back_period_s`` and only
after the wish to change has held for ``upscale_delay_s`` / ``downscale_delay_s``; every change
restarts both delays. Those two rules are what keep it from adding and removing the same replica
in a loop (ray#18925, ray#33416).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import deque
from collections.abc import Mapping
from typing import Any

__all__ = ["IGNORED_RAY_KEYS", "Autoscaler", "AutoscalingPolicy", "canonical_autoscaling_config"]


@dataclasses.dataclass(frozen=True)
class AutoscalingPolicy:
    """The keys of ``autoscaling_config`` (Ray Serve's names), with their defaults."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    # Ray Serve's multiplicative factors: a step of 0.5 moves half-way to the wanted count.
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0

    @classmethod
    def from_config(cls, config: Mapping[str, float]) -> AutoscalingPolicy:
        """Build from a validated ``autoscaling_config`` mapping."""
        values: dict[str, float | int | None] = dict(config)
        for key in ("min_replicas", "max_replicas", "initial_replicas"):
            if values.get(key) is not None:
                values[key] = int(values[key])  # type: ignore[arg-type]
        if "max_replicas" not in values:
            values["max_replicas"] = max(int(values.get("min_replicas", 1) or 1), 1)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def start_replicas(self) -> int:
        """Replicas to start with."""
        start = self.min_replicas if self.initial_replicas is None else self.initial_replicas
        return min(max(start, self.min_replicas), self.max_replicas)


# Ray Serve's other names for our keys, and keys it accepts that have no meaning here.
_RAY_ALIASES = {
    "smoothing_factor": ("upscaling_factor", "downscaling_factor"),
    "upscale_smoothing_factor": ("upscaling_factor",),
    "downscale_smoothing_factor": ("downscaling_factor",),
    "target_num_ongoing_requests_per_replica": ("target_ongoing_requests",),
}
#: Keys Ray Serve accepts that are accepted here and ignored: embserve's autoscaler averages
#: over ``look_back_period_s`` (no other aggregation), has no pluggable policy, and leaves zero
#: replicas after ``downscale_delay_s`` like any other count.
IGNORED_RAY_KEYS = frozenset({"aggregation_function", "policy", "downscale_to_zero_delay_s"})


def canonical_autoscaling_config(config: Any) -> Any:
    """``config`` with Ray Serve's alias keys renamed to ours and its ignored keys dropped.

    ``target_num_ongoing_requests_per_replica`` warns as it does in Ray Serve. Anything that is
    not a mapping is returned as it is, for validation to refuse.
    """
    if not isinstance(config, Mapping):
        return config
    plain = dict(config)
    if "target_num_ongoing_requests_per_replica" in plain:
        warnings.warn(
            "target_num_ongoing_requests_per_replica is deprecated; use target_ongoing_requests",
            DeprecationWarning,
            stacklevel=4,
        )
    for alias, names in _RAY_ALIASES.items():
        if alias in plain:
            value = plain.pop(alias)
            for name in names:
                plain.setdefault(name, value)
    for key in IGNORED_RAY_KEYS:
        plain.pop(key, None)
    return plain


class Autoscaler:
    """Decides a deployment's number of replicas from load samples fed to it."""

    def __init__(self, policy: AutoscalingPolicy) -> None:
        self.policy = policy
        self._samples: deque[tuple[float, float]] = deque()
        self._direction = 0  # +1 while more replicas are wanted, -1 while fewer, and since when
        self._since = 0.0

    def observe(self, now: float, load: float) -> None:
        """Record the requests the deployment holds (running and queued) at time ``now``."""
        self._samples.append((now, load))
        horizon = now - self.policy.look_back_period_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def desired(self, current: int) -> int:
        """The replica count the recent mean load asks for, within the policy's bounds."""
        policy = self.policy
        if not self._samples:
            return min(max(current, policy.min_replicas), policy.max_replicas)
        mean = sum(load for _, load in self._samples) / len(self._samples)
        wanted = math.ceil(mean / policy.target_ongoing_requests - 1e-9)
        if wanted > current and policy.upscaling_factor != 1.0:
            step = (wanted - current) * policy.upscaling_factor
            wanted = min(wanted, current + max(1, math.ceil(step - 1e-9)))
        elif wanted < current and policy.downscaling_factor != 1.0:
            step = (current - wanted) * policy.downscaling_factor
            wanted = max(wanted, current - max(1, math.floor(step + 1e-9)))
        if current == 0 and self._samples[-1][1] > 0:
            wanted = max(wanted, 1)  # requests wait with no replica at all: no delay
        return min(max(wanted, policy.min_replicas), policy.max_replicas)

    def decide(self, now: float, current: int) -> int:
        """The replica count to run now: ``current`` unless a change has been due long enough."""
        wanted = self.desired(current)
        if wanted == current:
            self._direction = 0
            return current
        if current == 0:
            return self._changed(wanted)
        direction = 1 if wanted > current else -1
        if direction != self._direction:
            self._direction, self._since = direction, now
        delay = self.policy.upscale_delay_s if direction > 0 else self.policy.downscale_delay_s
        if now - self._since >= delay:
            return self._changed(wanted)
        return current

    def _changed(self, count: int) -> int:
        # A change restarts the delays and forgets the load measured at the old size.
        self._direction = 0
        self._samples.clear()
        return count
